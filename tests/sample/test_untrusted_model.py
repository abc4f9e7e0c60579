"""gd.sample / gd.evaluate load a checkpoint's model through the same checks as gd.models.load_model: a config out of
bounds, one larger than its weights, or expanded weights are refused before anything is allocated. Each case runs
under an address-space cap (tests.memory_limit), so a regression fails with an allocation error."""
from __future__ import annotations

import json

import pytest
import torch

from gd.models import build_model, save_model
from gd.models.checkpoints import FORMAT
from tests.memory_limit import run_capped

TINY = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, max_group_size=4,
            sample_embed="tokens")
LOAD = """
import json
from omegaconf import OmegaConf
from gd.models import CheckpointError
from gd.sample import load_sampling_model
cfg = OmegaConf.create({"model": json.loads(sys.argv[2]), "diffusion": {"objective": "flow"},
                        "sample": {"model_overrides": {}}})
try:
    load_sampling_model(cfg, __import__("pathlib").Path(sys.argv[1]))
except CheckpointError as err:
    print("REFUSED", err)
else:
    print("LOADED")
"""


def _load_capped(path) -> str:
    done = run_capped(LOAD, str(path), json.dumps({"name": "SiT-S/2", **TINY}))
    assert done.stdout.startswith(("REFUSED", "LOADED")), done.stdout + done.stderr[-3000:]
    return done.stdout


def _tiny_export(path, **config_changes) -> None:
    save_model(build_model("SiT-S/2", **TINY), path)
    payload = torch.load(path, weights_only=True)
    payload["config"] = {**payload["config"], **config_changes}
    torch.save(payload, path)


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_size": 10**6}, r"hidden_size=1000000: expected an integer in [4, 16384]"),
    # in bounds, ~100 GB for real: only the meta-device build sees that a 2-block, 64-wide state does not fit
    ({"hidden_size": 16384, "depth": 8, "num_heads": 16}, "the weights do not fit the model its config describes"),
])
def test_an_export_whose_config_does_not_fit_is_refused(tmp_path, changes, needle):
    """Fails before the fix: load_sampling_model called build_model(**config) with the file's config as it was
    (gd.evaluate tried to allocate 4 TB for hidden_size=10**6; here, an allocation error under the cap)."""
    path = tmp_path / "ema.pt"
    _tiny_export(path, **changes)
    out = _load_capped(path)
    assert out.startswith("REFUSED") and needle in out, out


def test_a_model_json_beside_a_flat_file_is_checked_too(tmp_path):
    """Fails before the fix: the sidecar config of a flat state dict was built without any check."""
    model = build_model("SiT-S/2", **TINY)
    torch.save(model.state_dict(), tmp_path / "ema.pt")
    (tmp_path / "model.json").write_text(json.dumps({**model.config, "hidden_size": 10**6}))
    out = _load_capped(tmp_path / "ema.pt")
    assert out.startswith("REFUSED") and "hidden_size=1000000" in out, out


def test_expanded_weights_are_refused(tmp_path):
    """Fails before the fix: a ~100 KB export with an in-bounds config (hidden 8192, depth 8) and zero-stride
    weights of the right shapes passed every check and its ~40 GB model was allocated."""
    config = dict(TINY, input_size=32, hidden_size=8192, depth=8, num_heads=16, num_classes=1000)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model("SiT-S/2", **config).state_dict().items()}
    path = tmp_path / "ema.pt"
    torch.save({"format": FORMAT, "config": {"name": "SiT-S/2", **config},
                "model": {k: torch.zeros(()).expand(s) for k, s in shapes.items()}}, path)
    out = _load_capped(path)
    assert out.startswith("REFUSED") and "has overlapping elements" in out, out


def test_a_sound_export_still_loads_for_sampling(tmp_path):
    path = tmp_path / "ema.pt"
    _tiny_export(path)
    assert _load_capped(path).startswith("LOADED")
