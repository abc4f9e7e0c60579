"""The held-out probes (gd.train.probes) against independent references: member selectivity of hand-built models
whose attention is forced (own member only: share 1; zero queries and keys: exactly 1/N) and an explicit float64
loop, the probe losses against a float64 loop of the flow objective on the same fixed draws, repeatability, the
probe times against the time distribution, and a tiny training run that logs the probes every probe_every steps."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from gd.diffusion.objective import TimeSampler
from gd.diffusion.objectives import DDPMObjective, FlowObjective
from gd.models import GroupAttentionStats, build_model
from gd.train.probes import ProbeSet, full_weights, measure_probes
from tests.models.conftest import TINY, tiny
from tests.train.conftest import clean_streaming_shm, overrides

N = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/fixtures/threads.py)


def _set(m: int = 16, n: int = N, classes: int = 3, times: int = 3, seed: int = 0) -> ProbeSet:
    gen = torch.Generator().manual_seed(5)
    records = [(torch.randn(4, 8, 8, generator=gen), i % classes) for i in range(4 * m)]
    return ProbeSet.from_records(records, m, n, times=times, seed=seed)


def _forced_own_member(model: torch.nn.Module) -> torch.nn.Module:
    """Blocks are identities (adaLN-Zero init) and every layer's attention input is LayerNorm(pos + slot embedding):
    member i's tokens carry 1000 e_i, and every head's queries and keys read channels 0..N-1, so a token's score
    with its own member's keys exceeds any other's by ~16 (softmax ratio ~1e7)."""
    with torch.no_grad():
        model.x_embedder.proj.weight.zero_()
        model.sample_embed.zero_()
        for i in range(model.max_group_size):
            model.sample_embed[i, i] = 1000.0
        c, d = model.hidden_size, model.hidden_size // model.num_heads
        for block in model.blocks:
            w, b = block.attn.qkv.weight, block.attn.qkv.bias
            w[: 2 * c].zero_()
            b[: 2 * c].zero_()
            for part in (0, c):  # queries, keys
                for head in range(model.num_heads):
                    for ch in range(N):
                        w[part + head * d + ch, ch] = 1.0
    return model


def test_own_share_is_one_when_attention_is_forced_onto_the_member():
    model = _forced_own_member(build_model("SiT-S/2", **{**TINY, "learn_sigma": False}))
    out = measure_probes(model, FlowObjective(), _set(), batch=8)
    for kind in ("class", "random"):
        for layer in (0, 1):
            assert out[f"probe_own_{kind}_l{layer}"] == pytest.approx(1.0, abs=1e-4)
        assert out[f"probe_own_{kind}"] == pytest.approx(1.0, abs=1e-4)
    assert out["probe_own_uniform"] == 0.25


def test_own_share_is_exactly_uniform_with_zero_queries_and_keys():
    model = tiny(seed=3, learn_sigma=False)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.hidden_size].zero_()
            block.attn.qkv.bias[: 2 * model.hidden_size].zero_()
    out = measure_probes(model, FlowObjective(), _set(), batch=8)
    for kind in ("class", "random"):
        for layer in (0, 1):
            assert out[f"probe_own_{kind}_l{layer}"] == pytest.approx(1 / N, abs=1e-6)
        assert out[f"probe_s_cross_{kind}"] == pytest.approx(0.0, abs=1e-6)  # every neighbour gets 1/N too


def _loop_own_share(model, x, t, y, n, layer):
    """Own-member attention share from explicit loops over groups, heads and queries (float64)."""
    captured = {}
    hook = model.blocks[layer].attn.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
    model(x, t, y, group_size=n)
    hook.remove()
    h = captured["h"].double()
    attn = model.blocks[layer].attn
    qkv = h @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    b, length, c3 = qkv.shape
    c, heads = c3 // 3, attn.num_heads
    d = c // heads
    total, count = 0.0, 0
    for g in range(b // n):
        seq = qkv[g * n:(g + 1) * n].reshape(n * length, c3)
        for hd in range(heads):
            q, k = seq[:, hd * d:(hd + 1) * d], seq[:, c + hd * d:c + (hd + 1) * d]
            for i in range(n * length):
                p = torch.softmax(k @ q[i] / d ** 0.5, dim=0)
                member = i // length
                total += p[member * length:(member + 1) * length].sum().item()
                count += 1
    return total / count


def test_own_share_matches_loop_reference_and_skips_per_image_layers():
    model = tiny(seed=2, group_layers=[1, 2]).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=gen)
    with torch.no_grad(), GroupAttentionStats(model, layers=[0, 1]) as stats:
        model(x, t, y, group_size=N)
    share = stats.own_share()
    assert share[0] is None  # block 0 attends per image: no group to measure
    with torch.no_grad():
        want = _loop_own_share(model, x, t, y, N, 1)
    assert share[1] == pytest.approx(want, abs=1e-6)  # (the probe computes in fp32)
    assert abs(want - 1 / N) > 1e-3


def _loop_loss(model, ps: ProbeSet, uncond: bool, n: int, order: torch.Tensor | None) -> float:
    """The flow training loss at the probe's fixed draws: t_k = (k + 1/2) / K (uniform training times), image i's
    noise ps.noise(k)[i], groups of n consecutive images of ``order``; float64, one group per call."""
    m, total = ps.x.shape[0], 0.0
    idx = torch.arange(m) if order is None else order
    for k in range(ps.times):
        t = (k + 0.5) / ps.times
        x, noise = ps.x.double(), ps.noise(k).double()
        for g in range(m // n):
            rows = idx[g * n:(g + 1) * n]
            x1, eps = x[rows], noise[rows]
            y = torch.full((n,), model.num_classes) if uncond else ps.y[rows]
            v = model(t * x1 + (1 - t) * eps, torch.full((n,), t, dtype=torch.float64), y, group_size=n)
            total += ((v - (x1 - eps)) ** 2).mean(dim=(1, 2, 3)).sum().item()
    return total / (ps.times * m)


def test_probe_losses_match_float64_loop_of_the_flow_objective():
    model = tiny(seed=4, learn_sigma=False).double()
    ps = _set()
    out = measure_probes(model, FlowObjective(), ps, batch=8)
    with torch.no_grad():
        want = {"cond": _loop_loss(model, ps, False, 1, None), "uncond": _loop_loss(model, ps, True, 1, None),
                "uncond_class": _loop_loss(model, ps, True, N, None),
                "uncond_random": _loop_loss(model, ps, True, N, ps.random_order())}
    for name, value in want.items():
        assert out[f"probe_loss_{name}"] == pytest.approx(value, rel=1e-5)
    assert out["probe_loss_class_minus_alone"] == pytest.approx(want["uncond_class"] - want["uncond"], rel=1e-4)
    assert out["probe_loss_random_minus_alone"] == pytest.approx(want["uncond_random"] - want["uncond"], rel=1e-4)
    assert len({round(v, 6) for v in want.values()}) == 4  # the four branches really differ on this model


@pytest.mark.parametrize("objective,overrides_", [(FlowObjective(), {}), (DDPMObjective(), {"learn_sigma": True})])
def test_probes_are_identical_when_measured_twice_and_leave_the_model_as_found(objective, overrides_):
    model = tiny(seed=5, sample_embed="cond", **overrides_).train()
    ps = _set()
    rng = torch.get_rng_state()
    first = measure_probes(model, objective, ps, batch=8)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # no global draw, train mode restored
    again = measure_probes(copy.deepcopy(model), objective, _set(), batch=16)  # rebuilt set, other chunking
    assert first.keys() == again.keys() and {"probe_loss_uncond_random", "probe_own_class_l1"} <= first.keys()
    assert all(first[k] == pytest.approx(again[k], rel=1e-5, abs=1e-7) for k in first)
    assert measure_probes(model, objective, ps, batch=8) == first  # bit for bit at the same chunking


def test_probe_set_groups_and_errors():
    ps = _set(m=16, classes=3)
    groups = ps.y.view(-1, N)
    assert torch.all(groups == groups[:, :1])  # same-class groups
    assert groups[:, 0].tolist() == [0, 1, 2, 0]  # in the order the buckets filled (records cycle 0, 1, 2)
    assert torch.equal(ps.random_order(), _set(m=16, classes=3).random_order())
    assert not torch.equal(ps.random_order(), _set(m=16, classes=3, seed=1).random_order())
    with pytest.raises(ValueError, match="train.probe_images=10: expected a positive multiple of the probe group "
                                         "size 4"):
        _set(m=10)
    with pytest.raises(ValueError, match="holds only 8 images in complete same-class groups of 4"):
        ProbeSet.from_records([(torch.zeros(4, 8, 8), i % 2) for i in range(10)], 12, N)


def test_probe_times_are_the_time_distributions_stratum_midpoints():
    for sampler in (TimeSampler("uniform"), TimeSampler("logit_normal", 0.3, 1.2), TimeSampler("uniform", shift=3.0)):
        u = torch.tensor([0.1, 0.25, 0.5, 0.9])
        draws = sampler.sample(200_000, torch.Generator().manual_seed(0))
        below = (draws[None, :] <= sampler.quantile(u)[:, None]).double().mean(1)
        assert below.tolist() == pytest.approx(u.tolist(), abs=5e-3)  # the empirical CDF at the quantiles is u
    assert FlowObjective().probe_times(4).tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert DDPMObjective().probe_times(4).tolist() == [125, 375, 625, 875]


@pytest.mark.slow
def test_training_run_logs_the_probes_every_probe_every_steps(fm_shards, tmp_path):
    """A tiny ZeRO-3 run (the gathered-weights path) logs every probe key at steps 2 and 4 from a pure same-class
    probe set read from the run's shards; the logged values are the training model's at that step."""
    import gc

    from gd.train.callbacks import Callback
    from gd.train.trainer import Trainer
    from tests.train.test_components import compose

    run = tmp_path / "run"
    seen = {}

    class Remeasure(Callback):
        """The probes of a plain torch copy of the step's gathered weights."""

        def on_step_end(self, trainer, step):
            if step % 2:
                return
            with full_weights(trainer.engine.module, zero3=True):
                state = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
            kwargs = dict(trainer.model_config)
            model = build_model(kwargs.pop("name"), **kwargs)
            model.load_state_dict(state)
            seen[step] = measure_probes(model, trainer.objective, trainer.held_out.probes)

    cfg = compose(*overrides(fm_shards, run, "train.global_batch=8", "train.steps=4", "train.ckpt_every=100",
                             "train.zero_stage=3", "train.probe_every=2", "train.probe_images=16"))
    trainer = Trainer(cfg, callbacks=[Remeasure()])
    ps = trainer.held_out.probes
    assert ps.x.shape == (16, 1, 8, 8) and torch.all(ps.y.view(-1, 4) == ps.y.view(-1, 4)[:, :1])
    trainer.train()
    del trainer
    gc.collect()
    clean_streaming_shm(fm_shards)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe_loss_cond" in r]
    assert [r["step"] for r in probes] == [2, 4]
    for rec in probes:
        for key in ("probe_loss_uncond", "probe_loss_uncond_class", "probe_loss_uncond_random",
                    "probe_loss_class_minus_alone", "probe_loss_random_minus_alone", "probe_own_class_l0",
                    "probe_own_class_l1", "probe_own_random", "probe_own_uniform"):
            assert key in rec
        assert rec["probe_own_uniform"] == 0.25 and 0.0 < rec["probe_own_class_l0"] <= 1.0
        assert rec["probe_loss_class_minus_alone"] == pytest.approx(
            rec["probe_loss_uncond_class"] - rec["probe_loss_uncond"])
        want = seen[rec["step"]]
        assert {k: rec[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert probes[0]["probe_loss_cond"] != probes[1]["probe_loss_cond"]  # the model trained in between
