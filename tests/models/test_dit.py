"""DiT checkpoints sampled with the DDPM objective: files in facebookresearch/DiT's layout and in the released GroupDiff
DiT layout, written from random weights, loaded by gd.sample and checked against the float64 reference forward at
DDPM timestep indices; the group time window in DDPM indices; the objective an export records."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gd.diffusion.convert import FromReverseTime
from gd.diffusion.objectives import build_objective
from gd.models import build_model, save_model
from gd.models.checkpoints import CheckpointError, load_pretrained
from gd.sample import load_sampling_model
from tests.models.conftest import randomize
from tests.models.reference import reference_forward
from tests.models.test_released import reference_slots, released_checkpoint

# DiT's shapes in miniature: 4 latent channels, learn_sigma (8 output channels), a null row in the label table.
DIT = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, learn_sigma=True,
           class_dropout_prob=0.1)
T_MIXED = torch.tensor([999, 998, 500, 0])  # DDPM indices: noisiest, ..., least noisy


def sampling_cfg(objective: str = "ddpm", **model):
    return OmegaConf.create({"model": {"name": "SiT-S/2", **DIT, **model}, "diffusion": {"objective": objective},
                             "sample": {"model_overrides": {}}})


def ref_cfg(model, **extra) -> dict:
    return dict(patch_size=model.patch_size, in_channels=model.in_channels, heads=model.num_heads, depth=model.depth,
                learn_sigma=True, full_output=True, **extra)


def batch(b: int, seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 11, (b,), generator=gen)


def test_official_dit_file_is_called_with_ddpm_indices_and_all_channels(tmp_path):
    """A flat state dict in DiT-XL-2-256x256.pt's layout (no sample embedding, 1001-row label table in miniature,
    2C output channels) sampled with objective=ddpm: the model gets the DDPM index itself and returns ε and the
    variance values, equal to the float64 reference. Catches the flow bridge (t -> 1 - t, sign flip) applied to a
    DDPM model, the variance channels cut off (the official SiT's forward), and t rescaled to [0, 1]."""
    src = randomize(build_model("SiT-S/2", **DIT, sample_embed="none"), seed=3)
    state = src.state_dict()
    assert state["y_embedder.embedding_table.weight"].shape[0] == 11 and "sample_embed" not in state
    assert state["final_layer.linear.weight"].shape[0] == 2 * 2 * 8  # patch 2 x patch 2 x 2C
    path = tmp_path / "DiT-S-2-8.pt"
    torch.save(state, path)
    model, info = load_sampling_model(sampling_cfg(sample_embed="none"), path)
    assert info["source"] == "official" and not isinstance(model, FromReverseTime)
    net = build_objective({"objective": "ddpm"}, model.config).network(model.double())
    x, y = batch(4)
    out = net(x, T_MIXED, y, 1)
    ref = reference_forward(state, ref_cfg(model), x, T_MIXED.double(), y, 1)
    assert out.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_released_dit_file_loads_in_ddpm_time(tmp_path):
    """A checkpoint in the released GroupDiff DiT layout ({model, model_ema, ...}, ``denoiser.`` keys, the sample
    table as sample_embedder, 8 output channels) loads its EMA weights and runs unwrapped at DDPM indices: equal to
    the released forward (float64 reference, "cond" embedding with the same slots) for a group of 4 at t = 900 and
    one at t = 30. Catches the raw weights taken over the EMA, the reverse-time bridge of the released SiTs applied
    to the DiT, and the sample table dropped. The same file into a learn_sigma=false model names what to set."""
    cond = dict(sample_embed="cond", max_group_size=4)
    ema = randomize(build_model("SiT-S/2", **DIT, **cond), seed=1)
    raw = randomize(build_model("SiT-S/2", **DIT, **cond), seed=2)
    path = tmp_path / "gdiff-l-4-dit.pth"
    released_checkpoint(path, ema, raw)
    model, info = load_sampling_model(sampling_cfg(**cond), path)
    assert info["entry"] == "model_ema" and info["source"] == "released GroupDiff (DDPM time)"
    assert not isinstance(model, FromReverseTime)
    x, y = batch(8, seed=5)
    t = torch.tensor([900] * 4 + [30] * 4)
    slots = reference_slots(torch.Generator().manual_seed(6), 8, 4, 4)
    with torch.no_grad():
        out = build_objective({"objective": "ddpm"}, model.config).network(model.double())(x, t, y, 4, slots=slots)
    ref = reference_forward(ema.state_dict(), ref_cfg(ema, embed="cond"), x, t.double(), y, 4, slots=slots)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(CheckpointError, match="released GroupDiff DiT file needs model.learn_sigma=true "
                                              "model.sample_embed=cond model.max_group_size=4"):
        load_pretrained(build_model("SiT-S/2", **{**DIT, **cond, "learn_sigma": False}), path)


def test_group_window_in_ddpm_indices_matches_reference():
    """model.group_t_window under the DDPM objective is in DDPM indices: [600, 999] (the paper's first 40% of
    denoising) groups the members of an anchor at t = 700 and runs an anchor at t = 100 per image, as the float64
    reference does. Catches a window clipped to flow time [0, 1] (which would group neither) or compared against
    fractions of T. The objectives refuse a window in the other objective's units."""
    window = [600.0, 999.0]
    model = randomize(build_model("SiT-S/2", **DIT, sample_embed="none", group_t_window=window), seed=7).double()
    x, y = batch(8, seed=8)
    t = torch.tensor([700, 650, 720, 990, 100, 90, 400, 120])
    out = model(x, t, y, group_size=4, full_output=True)
    ref = reference_forward(model.state_dict(), ref_cfg(model, t_window=window), x, t.double(), y, 4)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    alone = reference_forward(model.state_dict(), ref_cfg(model), x, t.double(), y, 1)
    assert not torch.allclose(out[:4], alone[:4]) and torch.allclose(out[4:], alone[4:], rtol=1e-9, atol=1e-9)
    build_objective({"objective": "ddpm"}, {"group_t_window": window})
    with pytest.raises(ValueError, match=r"group_t_window=\[0.0, 0.4\] looks like flow time"):
        build_objective({"objective": "ddpm"}, {"group_t_window": [0.0, 0.4]})
    with pytest.raises(ValueError, match="with diffusion.objective=flow it is .* in flow time"):
        build_objective({"objective": "flow"}, {"group_t_window": window})


def test_export_records_its_objective_and_sampling_with_the_other_is_refused(tmp_path):
    """The trainer's export says which objective trained it; sampling it under the other objective fails naming
    both, before any model is built; an export without the record (written before it existed) loads under
    either. Catches a DDPM run evaluated with the flow sampler (every FID wasted)."""
    model = build_model("SiT-S/2", **DIT, sample_embed="none")
    tagged, plain = tmp_path / "tagged" / "ema.pt", tmp_path / "plain" / "ema.pt"
    tagged.parent.mkdir()
    plain.parent.mkdir()
    save_model(model, tagged, objective="ddpm")
    save_model(model, plain)
    assert torch.load(tagged, weights_only=True)["objective"] == "ddpm"
    with pytest.raises(ValueError, match="trained with diffusion.objective=ddpm, but this config samples with "
                                         "diffusion.objective=flow"):
        load_sampling_model(sampling_cfg("flow"), tagged)
    loaded, info = load_sampling_model(sampling_cfg("ddpm"), tagged)
    assert info["source"] == "gd export" and loaded.learn_sigma
    for objective in ("flow", "ddpm"):
        load_sampling_model(sampling_cfg(objective), plain)
