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
