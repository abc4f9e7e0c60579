"""gd.sample / gd.evaluate with diffusion.objective=ddpm (DiT): a chunk against a float64 DDPM loop written out,
determinism across resume and ranks for ddpm and ddim, the refusal of a mismatched sampler before any work, and
+exp=groupdiff4_dit composing to the released DiT evaluation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gd.evaluate import resolve_modes
from gd.models import build_model, save_model
from gd.rng import mix_seed, seeded_generator
from gd.sample import Layout, chunk_latents, generate, load_sampling_model, sampling_objective
from tests.diffusion.ddpm_toy import ABAR, evenly_kept
from tests.models.conftest import randomize
from tests.models.reference import reference_forward
from tests.models.test_released import reference_slots, released_checkpoint
from tests.sample.conftest import compose_cfg, sample_overrides
from tests.sample.test_sample import tree_bytes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/fixtures/threads.py)


TINY_DIT = dict(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3, learn_sigma=True,
                class_dropout_prob=0.1)


def reference_chunk(state: dict, model, seed: int, chunk: int, slots: np.ndarray, labels: torch.Tensor,
                    kept: list[int], scale: float, channels: int | None, interval, sizes: tuple[int, int],
                    embed: str) -> torch.Tensor:
    """A chunk of GroupDiff-l DDPM sampling in float64, written out: per-slot starting noise from (seed, 0, slot),
    the float64 reference forward at the original index, CFG on the first `channels` ε channels inside `interval`,
    the posterior from Gaussian conditioning (precision 1 / (1 - ᾱ_prev) + α / β over the kept steps' β), the
    learned log-variance between log β̃ and log β, noise from the chunk's generator (stream 1) and "cond" slots
    from its stream 2, drawn per forward call in the released way."""
    c, size = model.in_channels, model.input_size
    x = torch.stack([torch.randn(c, size, size, generator=torch.Generator().manual_seed(mix_seed(seed, 0, int(j))))
                     for j in slots]).double()
    noise_gen, slot_gen = seeded_generator(seed, 1, chunk), seeded_generator(seed, 2, chunk)
    cfg = dict(patch_size=model.patch_size, in_channels=c, heads=model.num_heads, depth=model.depth,
               learn_sigma=True, full_output=True, embed=embed)
    b = len(slots)

    def forward(t: int, y: torch.Tensor, n: int) -> torch.Tensor:
        s = reference_slots(slot_gen, b, n, model.max_group_size) if embed == "cond" else None
        return reference_forward(state, cfg, x, torch.full((b,), float(t)), y, n, slots=s)

    for k in reversed(range(len(kept))):
        t = kept[k]
        cond = forward(t, labels, sizes[0])
        eps, v = cond[:, :c].clone(), cond[:, c:]
        if scale != 1.0 and (interval is None or interval[0] <= t <= interval[1]):
            uncond = forward(t, torch.full_like(labels, model.num_classes), sizes[1])
            g = c if channels is None else channels
            eps[:, :g] = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
        a, a_prev = ABAR[t], (ABAR[kept[k - 1]] if k > 0 else 1.0)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if k == 0:
            return x0  # q(x_{-1} | x_0): the step to the data returns the x_0 estimate, no noise
        beta = 1.0 - a / a_prev
        var_q = 1.0 / (1.0 / (1.0 - a_prev) + (1.0 - beta) / beta)
        mean = var_q * (math.sqrt(a_prev) * x0 / (1.0 - a_prev) + math.sqrt(1.0 - beta) * x / beta)
        log_var = (v + 1) / 2 * math.log(beta) + (1 - (v + 1) / 2) * math.log(var_q)
        x = mean + torch.exp(0.5 * log_var) * torch.randn(x.shape, generator=noise_gen).double()
    raise AssertionError("unreachable")


@pytest.mark.parametrize("layout_kind", ["official", "released"])
def test_chunk_matches_the_float64_ddpm_reference(tmp_path, layout_kind):
    """One chunk (chunk 1 of 3: groups of 2 of 3 classes) of gd.sample's DDPM path from a file in facebookresearch/
    DiT's layout (no sample embedding; DiT's guidance on the first 3 ε channels, cfg_interval [400, 1000] so the
    last step at t = 0 is unguided) and in the released GroupDiff DiT layout ("cond" slots; all 4 ε channels,
    every step), over 3 respaced steps (original 999, 500, 0), GroupDiff-l: equal to the written-out loop within
    float32 error. Catches a guidance interval in respaced indices or flow time, guidance on the variance channels,
    wrong respaced posterior coefficients or variance, noise at the last step, and slots or noise drawn from other
    generators than the chunk's."""
    torch.manual_seed(0)
    official = layout_kind == "official"
    embed = "none" if official else "cond"
    src = randomize(build_model("SiT-S/2", **TINY_DIT, sample_embed=embed, max_group_size=4), seed=9, std=0.1)
    path = tmp_path / "ckpt.pt"
    if official:
        torch.save(src.state_dict(), path)
    else:
        released_checkpoint(path, src, src)
    sample = {"method": "ddpm", "steps": 3, "cfg_scale": 1.5 if official else 1.65, "eta": 0.0,
              "cfg_interval": [400, 1000] if official else None, "cfg_channels": 3 if official else None,
              "model_overrides": {}}
    cfg = OmegaConf.create({"model": {"name": "SiT-S/2", **TINY_DIT, "sample_embed": embed, "max_group_size": 4},
                            "diffusion": {"objective": "ddpm"}, "sample": sample})
    model, info = load_sampling_model(cfg, path)
    objective = sampling_objective(cfg, info["config"])
    sampler = objective.sampler(cfg.sample)
    assert sampler.diffusion.timestep_map.tolist() == [0, 500, 999] == evenly_kept(3)
    layout = Layout(num_images=12, num_classes=3, group_size=2, batch_groups=2)
    with torch.no_grad():
        got = chunk_latents(sampler, objective.network(model), model, layout, 1, 7, (1, 2), torch.device("cpu"))
    slots = layout.chunk_slots(1)
    labels = torch.as_tensor(layout.slot_labels(slots))
    assert slots.tolist() == [4, 5, 6, 7] and labels.tolist() == [2, 2, 0, 0]
    ref = reference_chunk(src.state_dict(), src, 7, 1, slots, labels, [0, 500, 999], float(sample["cfg_scale"]),
                          sample["cfg_channels"], sample["cfg_interval"], (1, 2), embed)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory) -> Path:
    """A tiny DiT-shaped model (1 channel, pixels) exported by the trainer's writer with objective ddpm."""
    torch.manual_seed(0)
    model = randomize(build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=1,
                                  num_heads=2, max_group_size=4, learn_sigma=True), seed=1, std=0.1)
    path = tmp_path_factory.mktemp("ddpm_ckpt") / "ema.pt"
    save_model(model, path, objective="ddpm")
    return path


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_ddpm_and_ddim_are_identical_after_resume_and_on_two_ranks(ddpm_ckpt, tmp_path, method, eta):
    """gd.sample with objective=ddpm writes byte-identical outputs whether run at once, interrupted after 2 of 5
    chunks and resumed, or split over 2 ranks (in one process, rank 1 first), with the sampler's noise (ancestral
    DDPM, DDIM at eta 0.5) and the "cond" slots from per-chunk generators. Catches noise or slots drawn from a
    global or per-rank generator, a chunk redone on resume, and settings that do not say which objective made
    the samples."""
    def cfg(out: Path):
        return compose_cfg(sample_overrides(ddpm_ckpt, out, method=method, eta=eta) + ["diffusion=ddpm_groupdiff_l"])

    ref = generate(cfg(tmp_path / "ref"), rank=0, world_size=1)
    assert ref["settings"]["objective"] == "ddpm" and ref["settings"]["method"] == method
    assert ref["settings"]["eta"] == eta and ref["generated"] == 5
    generate(cfg(tmp_path / "ranks"), rank=1, world_size=2)
    generate(cfg(tmp_path / "ranks"), rank=0, world_size=2)

    def stop_after_two(chunk: int, images: int) -> None:
        if chunk >= 1:
            raise _Stop

    with pytest.raises(_Stop):
        generate(cfg(tmp_path / "killed"), rank=0, world_size=1, on_chunk=stop_after_two)
    assert len(list((tmp_path / "killed" / "chunks").glob("*.npz"))) == 2
    resumed = generate(cfg(tmp_path / "killed"), rank=0, world_size=1)
    assert resumed["generated"] == 3 and resumed["skipped"] == 2
    expected = tree_bytes(tmp_path / "ref")
    assert tree_bytes(tmp_path / "ranks") == expected and tree_bytes(tmp_path / "killed") == expected
    images = np.load(ref["npz"])["arr_0"]
    assert images.shape == (40, 8, 8, 3) and images.std() > 0


def test_mismatched_sampler_is_refused_before_any_work(tiny_ckpt, tmp_path):
    """A flow model's config with sample.method=ddpm, and a DDPM config with the SDE, fail naming both before the
    checkpoint is read (even a missing one) and before the output folder exists."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="sample.method='ddpm' samples the ddpm objective, but diffusion.objective="
                                         "flow"):
        generate(compose_cfg(sample_overrides(tmp_path / "missing.pt", out, method="ddpm")), rank=0, world_size=1)
    with pytest.raises(ValueError, match="sample.method='sde' samples the flow objective, but diffusion.objective="
                                         "ddpm"):
        generate(compose_cfg(sample_overrides(tiny_ckpt, out) + ["diffusion=ddpm_groupdiff_l"]), rank=0,
                 world_size=1)
    assert not out.exists()


def test_groupdiff4_dit_composes_to_the_released_dit_evaluation(tmp_path):
    """``+exp=groupdiff4_dit`` with no sampler flags is the released DiT-XL GroupDiff-l-4 evaluation (DDPM over
    DiT's 250 respaced steps, CFG 1.65 on every step and all 4 ε channels, unconditional branch in groups of 4,
    bf16) on DiT's objective with groupdiff4's recipe, and a released-layout DiT file samples through it (model
    size and step count shrunk). Catches an experiment that falls back to the flow sampler or SiT's interval,
    guidance on 3 channels, a DDPM model without learned variance, and a recipe that drifts from groupdiff4's."""
    cfg = compose_cfg(["+exp=groupdiff4_dit", "ckpt=/x/ema.pt"])
    s, d, m, t = cfg.sample, cfg.diffusion, cfg.model, cfg.train
    assert (s.method, s.steps, s.cfg_scale, s.cfg_interval, s.cfg_channels, s.precision, s.decoder) == (
        "ddpm", 250, 1.65, None, None, "bf16", "sdvae")
    assert (s.mode, s.group_size, d.objective, d.num_timesteps, d.schedule, d.sigma_tv) == ("l", 4, "ddpm", 1000,
                                                                                           "linear", 0)
    assert (m.name, m.learn_sigma, m.max_group_size, m.sample_embed, m.class_dropout_prob) == (
        "SiT-XL/2", True, 4, "cond", 0.1)
    sit = compose_cfg(["+exp=groupdiff4", "ckpt=/x/ema.pt"])
    for key in ("p_group", "class_dropout", "mix", "loss_reduction", "sigma_tv_draw"):
        assert d[key] == sit.diffusion[key], key
    assert OmegaConf.to_container(t) == OmegaConf.to_container(sit.train)
    assert OmegaConf.to_container(cfg.data) == OmegaConf.to_container(sit.data)  # unresolved: the cache is per run
    sampler = sampling_objective(cfg, cfg.model).sampler(s)
    assert sampler.diffusion.timestep_map.tolist() == evenly_kept(250) and sampler.diffusion.learned_variance
    m_ref = OmegaConf.merge(cfg.metrics, {"reference": "/data/VIRTUAL_imagenet256_labeled.npz"})
    assert resolve_modes(m_ref) == ("legacy_tensorflow", True)
    base = compose_cfg(["+exp=dit_xl2_baseline", "ckpt=/x/ema.pt"])
    assert (base.diffusion.mode, base.diffusion.class_dropout, base.diffusion.objective) == ("none", 0.1, "ddpm")
    assert base.sample == OmegaConf.merge(cfg.sample, {"mode": "none", "group_size": 1, "out": base.sample.out,
                                                       "ckpt": base.sample.ckpt})

    model = randomize(build_model("SiT-S/2", hidden_size=32, depth=1, num_heads=2, input_size=8, in_channels=3,
                                  num_classes=10, learn_sigma=True, max_group_size=4), seed=2, std=0.1)
    path = tmp_path / "gdiff-l-4-dit-xl-2.pth"
    released_checkpoint(path, model, model)
    run = compose_cfg(["+exp=groupdiff4_dit", f"ckpt={path}", f"sample.out={tmp_path / 'out'}",
                       f"run.root={tmp_path}/runs", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                       "model.name=SiT-S/2", "model.input_size=8", "model.in_channels=3", "model.num_classes=10",
                       "sample.decoder=pixels", "sample.num_images=20", "sample.batch_groups=3", "sample.steps=5",
                       "sample.precision=fp32", "sample.device=cpu", "sample.progress=false", "sample.png=false"])
    result = generate(run, rank=0, world_size=1)
    assert result["settings"]["objective"] == "ddpm" and result["settings"]["cfg_scale"] == 1.65
    images = np.load(result["npz"])["arr_0"]
    assert images.shape == (20, 8, 8, 3) and images.std() > 0
