"""The released GroupDiff recipe's model side: the sample embedding in the conditioning vector with random slots,
and checkpoints in the released code's layout, checked against a float64 reference of the released forward."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gd.models import build_model
from gd.models.checkpoints import CheckpointError, load_pretrained
from tests.models.conftest import TINY, inputs, randomize
from tests.models.reference import reference_forward

COND = {**TINY, "sample_embed": "cond", "max_group_size": 4, "learn_sigma": False}


def cond_model(seed: int = 0) -> torch.nn.Module:
    return randomize(build_model("SiT-S/2", **COND), seed)


def reference_slots(gen: torch.Generator, batch: int, group_size: int, max_group_size: int) -> torch.Tensor:
    """The released slot draw written out: per group, sort max_group_size uniform keys and take the first N."""
    out = []
    for _ in range(batch // group_size):
        keys = torch.rand(max_group_size, generator=gen).tolist()
        order = sorted(range(max_group_size), key=lambda j: keys[j])
        out.extend(order[:group_size])
    return torch.tensor(out)


def ref_cfg(model: torch.nn.Module) -> dict:
    return dict(patch_size=model.patch_size, in_channels=model.in_channels, heads=model.num_heads, depth=model.depth,
                learn_sigma=model.learn_sigma, embed="cond")


@pytest.mark.parametrize("n", [1, 4])
def test_cond_embedding_equals_float64_reference(n: int) -> None:
    """c = t + y + s[slot] feeding adaLN, at N = 1 too. Catches the embedding added to the tokens, skipped at N = 1,
    or indexed by member position instead of the drawn slot."""
    model = cond_model().double()
    x, t, y = inputs(8)
    slots = model.draw_slots(8, n, torch.Generator().manual_seed(3))
    assert torch.equal(slots, reference_slots(torch.Generator().manual_seed(3), 8, n, 4))
    out = model(x.double(), t.double(), y, group_size=n, slots=slots)
    ref = reference_forward(model.state_dict(), ref_cfg(model), x, t, y, n, slots=slots)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    other = (slots + 1) % 4
    assert not torch.allclose(model(x.double(), t.double(), y, group_size=n, slots=other), out)


def test_slot_draw_is_a_random_permutation_per_group() -> None:
    """Each group's slots are distinct, every slot is equally likely at every member position (chi-square over
    many draws), N = 1 images spread over all max_group_size slots, and a seeded generator replays them.
    Catches fixed slots (member i -> row i), repeated slots within a group, or a draw that never reaches the
    upper rows."""
    model = build_model("SiT-S/2", **COND)
    gen = torch.Generator().manual_seed(0)
    draws = model.draw_slots(4 * 5000, 4, gen).view(5000, 4)
    assert all(len(set(row.tolist())) == 4 for row in draws[:500])
    for pos in range(4):
        counts = torch.bincount(draws[:, pos], minlength=4).double()
        chi2 = float(((counts - 1250.0) ** 2 / 1250.0).sum())
        assert chi2 < 16.3, f"position {pos}: counts {counts.tolist()} (chi2 {chi2:.1f}, p < 0.001)"
    single = torch.bincount(model.draw_slots(4000, 1, gen), minlength=4)
    assert single.min() > 850
    a = model.draw_slots(16, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, model.draw_slots(16, 2, torch.Generator().manual_seed(7)))


def test_cond_forward_without_slots_draws_them_at_random() -> None:
    """The released forward: without explicit slots each call draws new ones (the trainer and gd.sample pass
    seeded ones instead)."""
    model = cond_model()
    x, t, y = inputs(8)
    torch.manual_seed(0)
    a = model(x, t, y, group_size=4)
    b = model(x, t, y, group_size=4)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="slots has shape"):
        model(x, t, y, group_size=4, slots=torch.zeros(3, dtype=torch.long))


def test_cond_embedding_init_is_normal_002_and_tokens_is_zero() -> None:
    """Released: N(0, 0.02) (a zero init would make the slots indistinguishable at the start); tokens: zero, so an
    official model stays exact."""
    cond = build_model("SiT-XL/2", max_group_size=16, sample_embed="cond").sample_embed
    cond = cond.detach()
    assert abs(float(cond.std()) - 0.02) < 0.002 and abs(float(cond.mean())) < 0.002
    assert build_model("SiT-S/2", sample_embed="tokens").sample_embed.abs().sum() == 0
    assert build_model("SiT-S/2", sample_embed=False).sample_embed is None
    with pytest.raises(ValueError, match="sample_embed='x'"):
        build_model("SiT-S/2", sample_embed="x")


def released_checkpoint(path, ema: torch.nn.Module, raw: torch.nn.Module) -> None:
    """A file in the released code's layout: {model, model_ema, optimizer, loss_scaler, epoch,
    last_elapsed_time}, parameters under ``denoiser.``, the sample table as ``sample_embedder.embedding_table``."""

    def layout(model: torch.nn.Module) -> dict:
        out = {}
        for k, v in model.state_dict().items():
            name = "sample_embedder.embedding_table.weight" if k == "sample_embed" else k
            out[f"denoiser.{name}"] = v.clone()
        return out

    torch.save({"model": layout(raw), "model_ema": layout(ema), "optimizer": {"state": {}, "param_groups": []},
                "loss_scaler": {"scale": 65536.0}, "epoch": 3, "last_elapsed_time": 12.5}, path)


def test_released_checkpoint_samples_through_reverse_time(tmp_path) -> None:
    """A released GroupDiff SiT file loads (EMA entry, prefix, renamed table) into the released model shape and
    gd.sample wraps it in FromReverseTime: u(x, tau) = -v'(x, 1 - tau), v' the released forward in float64.
    Catches the raw weights picked over the EMA, the time not reversed or the sign not flipped, and the sample
    table dropped or loaded into the wrong place."""
    from gd.sample import load_sampling_model

    ema, raw = cond_model(seed=1), cond_model(seed=2)
    path = tmp_path / "checkpoint-last.pth"
    released_checkpoint(path, ema, raw)
    cfg = OmegaConf.create({"model": {"name": "SiT-S/2", **COND}, "sample": {"model_overrides": {}}})
    model, info = load_sampling_model(cfg, path)
    assert info["entry"] == "model_ema" and info["source"].startswith("released GroupDiff")
    x, tau, y = inputs(8)
    slots = reference_slots(torch.Generator().manual_seed(5), 8, 4, 4)
    with torch.no_grad():
        got = model.double()(x.double(), tau.double(), y, 4, slots=slots)
    released = reference_forward(ema.state_dict(), ref_cfg(ema), x, 1.0 - tau.double(), y, 4, slots=slots)
    torch.testing.assert_close(got, -released, rtol=1e-9, atol=1e-9)


def test_released_checkpoint_into_the_wrong_model_names_what_to_set(tmp_path) -> None:
    """learn_sigma on (8 output channels) or a table of another size: one error listing the shapes; nothing
    loaded."""
    path = tmp_path / "ckpt.pth"
    released_checkpoint(path, cond_model(), cond_model())
    wrong = build_model("SiT-S/2", **{**COND, "learn_sigma": True, "max_group_size": 8})
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"(?s)sample_embed: checkpoint \(4, 64\).*final_layer.linear.weight"
                                              r".*learn_sigma=false model.sample_embed=cond model.max_group_size=4"):
        load_pretrained(wrong, path)
    assert all(torch.equal(v, wrong.state_dict()[k]) for k, v in before.items())


def test_cond_model_refuses_a_file_without_sample_embedding(tmp_path) -> None:
    """An official SiT file into a "cond" model would silently add a random N(0, 0.02) vector to every
    conditioning vector: refused, naming sample_embed='none'."""
    src = build_model("SiT-S/2", **{**TINY, "sample_embed": "none"})
    path = tmp_path / "official.pt"
    torch.save(src.state_dict(), path)
    with pytest.raises(CheckpointError, match="sample_embed='none'"):
        load_pretrained(build_model("SiT-S/2", **{**TINY, "sample_embed": "cond"}), path)


def test_file_of_no_known_layout_names_the_layouts(tmp_path) -> None:
    """A dict that is neither an export, an official state dict or train.py dict, nor a released checkpoint gets
    one error listing what was expected."""
    path = tmp_path / "other.pt"
    torch.save({"weights": [1, 2, 3], "step": 7}, path)
    with pytest.raises(CheckpointError, match="(?s)expected.*gd export.*official.*model_ema"):
        load_pretrained(build_model("SiT-S/2", **TINY), path)


def test_cond_model_compiles_without_graph_breaks() -> None:
    """The released forward under torch.compile(fullgraph=True), slots given or drawn inside (dynamic batch):
    catches a data-dependent branch or an RNG call that cannot trace."""
    model = cond_model()
    x, t, y = inputs(8)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    slots = model.draw_slots(8, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled(x, t, y, group_size=4, slots=slots),
                               model(x, t, y, group_size=4, slots=slots), rtol=1e-4, atol=1e-4)
    assert compiled(x, t, y, group_size=4).shape == x.shape[:1] + (4, 8, 8)
