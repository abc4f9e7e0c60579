"""`python -m gd.evaluate +exp=groupdiff4 ckpt=...` with no sampler flags runs the released evaluation, and a
checkpoint in the released code's layout samples through it."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf

from gd.evaluate import resolve_modes
from gd.sample import generate
from tests.sample.conftest import compose_cfg

# A tiny SiT in the released checkpoint's shape (learn_sigma off, "cond" sample table of 4 rows), 3 channels so the
# released guidance on the first 3 channels applies, decoded as pixels.
TINY_RELEASED = ["model.name=SiT-S/2", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                 "model.input_size=8", "model.in_channels=3", "model.num_classes=10", "model.learn_sigma=false",
                 "sample.decoder=pixels", "sample.num_images=20", "sample.batch_groups=3", "sample.steps=5",
                 "sample.precision=fp32", "sample.device=cpu", "sample.progress=false", "sample.png=false"]


def test_groupdiff4_composes_to_the_released_evaluation() -> None:
    """The sampler and metric settings of +exp=groupdiff4 without flags are the released SiT evaluation. Catches
    an experiment that falls back to cfg 1.0 (no guided, grouped unconditional branch at all), the "sigma" SDE,
    REPA's interval, or clean-mode FID against an ADM reference batch."""
    cfg = compose_cfg(["+exp=groupdiff4", "ckpt=/x/ema.pt"])
    s = cfg.sample
    assert (s.method, s.steps, s.diffusion_form, s.sample_eps, s.last_step, s.last_step_size) == (
        "sde", 250, "SBDM", 0.0, "Mean", 0.04)
    assert (s.cfg_scale, list(s.cfg_interval), s.cfg_channels, s.precision) == (2.585, [0.25, 0.75], 3, "bf16")
    assert (s.mode, s.group_size, cfg.model.sample_embed, cfg.model.max_group_size) == ("l", 4, "cond", 4)
    assert (cfg.diffusion.class_dropout, cfg.diffusion.mix, cfg.diffusion.loss_reduction) == (0.0, "micro", "mean")
    assert (list(cfg.train.betas), cfg.train.grad_clip, cfg.train.weight_decay) == ([0.9, 0.95], 3.0, 0.01)
    m = OmegaConf.merge(cfg.metrics, {"reference": "/data/VIRTUAL_imagenet256_labeled.npz"})
    assert resolve_modes(m) == ("legacy_tensorflow", True)
    assert resolve_modes(OmegaConf.merge(cfg.metrics, {"reference": "/data/val_folder"})) == ("clean", False)
    assert resolve_modes(OmegaConf.merge(m, {"mode": "clean", "use_precomputed": False})) == ("clean", False)
    g16 = compose_cfg(["+exp=groupdiff16", "ckpt=/x/ema.pt"]).sample
    assert (g16.group_size, g16.cfg_scale) == (16, 2.585)


def test_released_checkpoint_samples_with_the_released_settings(tmp_path) -> None:
    """A file in the released layout, sampled by gd.sample under +exp=groupdiff4 (only the model's size and the
    step count changed): the images come out finite and byte-identical on a second run in the same process, so
    the sample-embedding slots come from the seeded per-chunk generator and not the global RNG."""
    from gd.models import build_model

    torch.manual_seed(0)
    model = build_model("SiT-S/2", hidden_size=32, depth=1, num_heads=2, input_size=8, in_channels=3,
                        num_classes=10, learn_sigma=False, max_group_size=4, sample_embed="cond")
    with torch.no_grad():  # slots that matter: a large table and live adaLN layers (adaLN-Zero starts at 0)
        model.sample_embed.normal_(0.0, 3.0)
        for block in [*model.blocks, model.final_layer]:
            block.adaLN_modulation[-1].weight.normal_(0.0, 0.2)
        model.final_layer.linear.weight.normal_(0.0, 0.2)
    state = {("denoiser.sample_embedder.embedding_table.weight" if k == "sample_embed" else f"denoiser.{k}"): v
             for k, v in model.state_dict().items()}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state, "model_ema": state, "epoch": 1}, ckpt)

    outs = []
    for run in ("a", "b"):
        cfg = compose_cfg(["+exp=groupdiff4", f"ckpt={ckpt}", f"sample.out={tmp_path / run}",
                           f"run.root={tmp_path}/runs", *TINY_RELEASED])
        result = generate(cfg, rank=0, world_size=1)
        settings = result["settings"]
        assert settings["model"]["sample_embed"] == "cond" and settings["diffusion_form"] == "SBDM"
        outs.append(np.load(result["npz"])["arr_0"])
    assert outs[0].shape == (20, 8, 8, 3) and outs[0].std() > 0
    assert np.array_equal(outs[0], outs[1])
