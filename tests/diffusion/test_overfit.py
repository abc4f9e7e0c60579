"""A tiny SiT trained with the batch plan (group steps on) overfits a handful of latents in seconds on CPU,
and samples through gd.diffusion.sample with GroupDiff-l guidance."""
from __future__ import annotations

import pytest
import torch

from gd.diffusion import BatchPlan, CallStats, group_loss, sample

models = pytest.importorskip("gd.models")

N = 4


def _tiny():
    torch.manual_seed(0)
    return models.build_model("SiT-S/2", depth=2, hidden_size=64, num_heads=4, input_size=8, in_channels=1,
                              num_classes=4, max_group_size=N, class_dropout_prob=0.1, learn_sigma=False)


def test_tiny_sit_overfits_with_group_steps() -> None:
    model = _tiny()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 1, 8, 8, generator=gen)  # 2 groups of 4, group-major
    labels = torch.tensor([0] * 4 + [1] * 4)
    plan = BatchPlan("l", group_size=N, p_group=0.3, class_dropout_prob=0.1, num_classes=4, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    # a handful of examples to memorise: the latents under a small fixed pool of (t, noise) draws
    pool_gen = torch.Generator().manual_seed(2)
    pool = [(torch.rand(8, generator=pool_gen), torch.randn(latents.shape, generator=pool_gen)) for _ in range(3)]

    def eval_loss() -> float:
        with torch.no_grad():
            loss, _ = group_loss(model, latents, labels, 1, t=pool[0][0], noise=pool[0][1])
        return float(loss)

    first = eval_loss()
    group_steps = 0
    for step in range(300):
        sp = plan.step(step)
        group_steps += sp.is_group
        y = plan.labels(step, labels)
        t, noise = pool[step % len(pool)]
        loss, _ = group_loss(model, latents, y, sp.group_size, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    last = eval_loss()
    assert group_steps > 30
    assert last < first / 10, (first, last)


def test_tiny_sit_samples_with_groupdiff_l_guidance() -> None:
    model = _tiny().eval()
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([2] * 4 + [3] * 4)
    stats = CallStats()
    out = sample(model, noise, y, method="sde", steps=10, cfg_scale=2.0, cfg_interval=(0.3, 1.0), group_size=1,
                 uncond_group_size=N, generator=torch.Generator().manual_seed(1), stats=stats)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert stats.nfe == 10 and 0 < stats.guided_nfe < 10
    assert stats.forward_calls == 10 + stats.guided_nfe  # group sizes differ: two calls where guided
