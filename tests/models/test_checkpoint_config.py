"""An exported model file's embedded config is untrusted: bounds and shapes are checked before any allocation."""
from __future__ import annotations

import pytest
import torch

from gd.models import CheckpointError, load_model, save_model
from gd.models import checkpoints as ckpt

from .conftest import inputs, tiny


@pytest.fixture
def export(tmp_path):
    model = tiny(seed=2)
    path = tmp_path / "ema.pt"
    save_model(model, path)
    return model, path


def _rewrite(path, **config_changes) -> None:
    payload = torch.load(path, weights_only=True)
    payload["config"] = {**payload["config"], **config_changes}
    torch.save(payload, path)


@pytest.fixture
def builds(monkeypatch):
    """Devices on which load_model built a model (it must build on 'meta' first, for real only after the checks)."""
    seen: list[str] = []
    real = ckpt.build_model

    def recording(name, **kwargs):
        seen.append(str(torch.get_default_device()))
        return real(name, **kwargs)

    monkeypatch.setattr(ckpt, "build_model", recording)
    return seen


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_size": 10**6}, r"hidden_size=1000000: expected an integer in \[4, 16384\]"),
    ({"depth": 10**5, "num_heads": "16"}, r"depth=100000: .*\n  num_heads='16': expected an integer"),
    ({"mlp_ratio": float("inf")}, r"mlp_ratio=inf"),
    ({"learn_sigma": "yes"}, r"learn_sigma='yes': expected true or false"),
    ({"exec": "os.system"}, r"unknown keys \['exec'\]"),
])
def test_config_out_of_bounds_is_refused_before_building(export, builds, changes, needle):
    """Fails before the fix: load_model built whatever the file's config said (hidden_size=10**6 allocates ~10**13
    parameters) before looking at a single shape."""
    _, path = export
    _rewrite(path, **changes)
    with pytest.raises(CheckpointError, match=needle):
        load_model(path)
    assert builds == []


def test_config_that_does_not_fit_the_weights_is_refused_on_the_meta_device(export, builds):
    """Fails before the fix: a config within bounds but larger than its weights (depth 24 for a 2-block state) was
    allocated in full, and only load_state noticed."""
    _, path = export
    _rewrite(path, depth=24, hidden_size=1024, num_heads=16)
    with pytest.raises(CheckpointError, match=r"do not fit the model its config describes .*\n  missing keys"):
        load_model(path)
    assert builds == ["meta"]


def test_a_sound_export_still_loads(export, builds):
    model, path = export
    loaded = load_model(path)
    assert builds == ["meta", "cpu"]
    x, t, y = inputs(2)
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


# A config inside CONFIG_BOUNDS whose real model is ~40 GB (hidden 8192, depth 8, 1000 classes).
LARGE = dict(input_size=32, in_channels=4, hidden_size=8192, depth=8, num_heads=16, num_classes=1000,
             max_group_size=4, sample_embed="tokens")
LOAD = """
from gd.models import CheckpointError, load_model
try:
    load_model(sys.argv[1])
except CheckpointError as err:
    print("REFUSED", err)
else:
    print("LOADED")
"""


def large_shapes(**config) -> dict[str, torch.Size]:
    from gd.models.sit import build_model  # not ckpt.build_model, which the `builds` fixture records

    with torch.device("meta"):
        return {k: v.shape for k, v in build_model("SiT-S/2", **config).state_dict().items()}


def test_expanded_weights_are_refused_before_building(tmp_path):
    """Fails before the fix: `torch.zeros(()).expand(shape)` keeps a 4-byte storage through torch.save/torch.load,
    so a ~100 KB file had every shape of a ~40 GB model; the meta-device check passed and load_model allocated it
    all (here: an allocation error under the address-space cap instead of the refusal)."""
    from tests.memory_limit import run_capped

    state = {k: torch.zeros(()).expand(shape) for k, shape in large_shapes(**LARGE).items()}
    path = tmp_path / "ema.pt"
    torch.save({"format": ckpt.FORMAT, "config": {"name": "SiT-S/2", **LARGE}, "model": state}, path)
    assert path.stat().st_size < 200_000
    done = run_capped(LOAD, str(path))
    assert done.stdout.startswith("REFUSED"), done.stdout + done.stderr[-3000:]
    first = next(iter(state))
    assert f"tensor {first!r} (shape {tuple(state[first].shape)}, strides" in done.stdout
    assert "has overlapping elements" in done.stdout


def test_weights_sharing_one_storage_are_refused(tmp_path, builds):
    """Fails before the fix: every weight a view of one storage as large as the largest weight passes a per-tensor
    size check, yet the model built to fit them needs the sum (depth x the file, for a deep model)."""
    config = dict(LARGE, hidden_size=128, depth=4, num_heads=4, num_classes=10)
    shapes = large_shapes(**config)
    flat = torch.zeros(max(s.numel() for s in shapes.values()))
    state = {k: flat[:s.numel()].view(s) for k, s in shapes.items()}
    path = tmp_path / "ema.pt"
    torch.save({"format": ckpt.FORMAT, "config": {"name": "SiT-S/2", **config}, "model": state}, path)
    with pytest.raises(CheckpointError, match=rf"need \d+ bytes but share a storage of {flat.numel() * 4} bytes"):
        load_model(path)
    assert builds == []


def test_transposed_and_sliced_weights_still_load(export, tmp_path):
    """Dense views that are not contiguous (a transpose, every other row of a larger tensor) store each element
    once and are accepted."""
    model, path = export
    payload = torch.load(path, weights_only=True)
    w = payload["model"]["final_layer.linear.weight"]
    payload["model"]["final_layer.linear.weight"] = w.t().contiguous().t()
    b = payload["model"]["final_layer.linear.bias"]
    payload["model"]["final_layer.linear.bias"] = torch.stack([b, torch.zeros_like(b)], 1)[:, 0]
    torch.save(payload, tmp_path / "views.pt")
    loaded = load_model(tmp_path / "views.pt")
    x, t, y = inputs(2)
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
