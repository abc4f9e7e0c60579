"""Single-process checks of the trainer's components: config generation and validation, the EMA against a float64
loop, the non-finite guard, and (world of 1, in-process DeepSpeed) NaN skipping and stop/resume."""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch

from gd.train.checkpoint import CheckpointMismatchError, model_signature
from gd.train.ema import ShardedEMA
from gd.diffusion.plan import batch_layout
from gd.train.engine import GuardedAdamW, deepspeed_config
from tests.train.conftest import clean_streaming_shm, overrides
from tests.train.faults import callbacks


def compose(*args: str):
    from gd.train.__main__ import compose_config

    return compose_config(list(args))


# ---- config ------------------------------------------------------------------------------------------------
def test_layout_and_deepspeed_config():
    t = {"global_batch": 256, "micro_batch": 32, "zero_stage": 3, "precision": "bf16", "grad_clip": 1.0}
    layout = batch_layout(t, world_size=4, group_size=16)
    assert layout.grad_accum == 2
    ds = deepspeed_config(t, layout)
    assert ds["train_batch_size"] == 256 and ds["train_micro_batch_size_per_gpu"] == 32
    # GuardedAdamW clips and checks for NaN/inf; DeepSpeed's per-parameter versions and its timer syncs are off.
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["bf16"]["check_grad_overflow"]
    assert ds["zero_allow_untested_optimizer"] and not ds["timers"]["throughput"]["enabled"]
    z2 = deepspeed_config({**t, "zero_stage": 2}, layout)["zero_optimization"]
    assert z2["compute_grad_norm"] is False and z2["reduce_scatter"] is False
    assert "compute_grad_norm" not in deepspeed_config({**t, "zero_stage": 1}, layout)["zero_optimization"]
    with pytest.raises(ValueError, match="zero_stage=0 with train.precision=bf16 .*bf16_autocast"):
        deepspeed_config({**t, "zero_stage": 0}, layout)
    auto = deepspeed_config({**t, "precision": "bf16_autocast", "zero_stage": 0,
                             "deepspeed": {"zero_optimization": {"stage": 1}}}, layout)
    assert auto["torch_autocast"]["enabled"] and "bf16" not in auto
    assert auto["zero_optimization"]["stage"] == 1  # train.deepspeed has the last word
    with pytest.raises(ValueError, match="precision='fp16'"):
        deepspeed_config({**t, "precision": "fp16"}, layout)


def test_gradient_overlap_is_on_exactly_when_there_is_communication():
    """conf/train/default.yaml's ZeRO-2 communication (docs/communication.md): with more than one process the
    gradient buckets (5e7 elements, ~14 for SiT-XL/2's 675M parameters) are reduced during the backward; one process
    has nothing to overlap. An explicit true/false wins; anything else is refused. Catches: the single-process
    default applied to multi-node runs, or a bucket as large as the model (nothing left to overlap)."""
    from omegaconf import OmegaConf

    t = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "conf/train/default.yaml"))
    t.update(global_batch=256, micro_batch=32)

    def zero(world: int, **ds) -> dict:
        cfg = {**t, "ds": {**t["ds"], **ds}}
        return deepspeed_config(cfg, batch_layout(cfg, world_size=world, group_size=1))["zero_optimization"]

    assert zero(8)["stage"] == 2 and zero(8)["overlap_comm"] is True and zero(1)["overlap_comm"] is False
    assert zero(8)["reduce_bucket_size"] == 50_000_000 and zero(8)["reduce_scatter"] is False
    assert zero(8, overlap_comm=False)["overlap_comm"] is False and zero(1, overlap_comm=True)["overlap_comm"] is True
    with pytest.raises(ValueError, match=r"train.ds.overlap_comm='yes': expected true, false or null"):
        zero(8, overlap_comm="yes")


@pytest.mark.parametrize("global_batch,micro,world,n,needle", [
    (256, 48, 2, 4, "global_batch=256 is not divisible by train.micro_batch=48 x world size 2"),
    (256, 32, 3, 4, "world size 3 = 96"),
    (256, 32, 2, 3, "micro_batch=32 images is not divisible by diffusion.group_size=3"),
])
def test_layout_rejects_bad_batches(global_batch, micro, world, n, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("=", "=")):
        batch_layout({"global_batch": global_batch, "micro_batch": micro}, world, n)


@pytest.mark.parametrize("extra,needle", [
    (["train.global_batch=12", "train.micro_batch=8"], "global_batch=12 is not divisible by train.micro_batch=8"),
    (["train.micro_batch=6", "train.global_batch=12"], "micro_batch=6 images is not divisible by diffusion.group_size=4"),
    (["train.group_parallel=3"], "diffusion.group_size=4 is not divisible by train.group_parallel=3"),
])
def test_train_fails_before_any_work(tmp_path, extra, needle):
    """A bad batch layout is refused by the config check, before the data (data.root does not even exist: reaching
    the loaders would raise FileNotFoundError instead) and before the run directory is made."""
    from gd.train import train

    run = tmp_path / "run"
    cfg = compose(*overrides(tmp_path / "no-shards", run, *extra))
    with pytest.raises(ValueError, match=needle):
        train(cfg)
    assert not run.exists()



def test_missing_shards_are_refused_before_the_run_dir_is_made(tmp_path):
    """Fails before the fix: the run directory was created (for the nodes' shared-folder check) before the loaders
    looked at data.root, so a start refused for its data left an empty run dir behind."""
    from gd.train import train

    run = tmp_path / "runs" / "run"
    cfg = compose(*overrides(tmp_path / "no-shards", run))
    with pytest.raises(FileNotFoundError, match=r"no shards at .*no-shards"):
        train(cfg)
    assert not (tmp_path / "runs").exists()

def test_refuses_checkpoint_of_another_model(tmp_path):
    from gd.train import train

    run = tmp_path / "run"
    other = compose(*overrides(tmp_path, run, "model.hidden_size=96"))
    ckpt = run / "checkpoints" / "step_00000008"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 8, "world_size": 1,
                                                "model_signature": model_signature(other.model)}))
    (run / "checkpoints" / "latest").write_text("step_00000008\n")
    with pytest.raises(CheckpointMismatchError, match="hidden_size: checkpoint 96 vs config 64"):
        train(compose(*overrides(tmp_path, run)))


def test_refuses_checkpoint_of_another_group_parallel_degree(tmp_path):
    """A checkpoint written with train.group_parallel=2 holds the replica's queued batches and loader states: a
    resume with another P is refused naming both, before any process group or data."""
    from gd.train import train

    run = tmp_path / "run"
    cfg = compose(*overrides(tmp_path, run))
    ckpt = run / "checkpoints" / "step_00000008"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 8, "world_size": 1, "group_parallel": 2,
                                                "model_signature": model_signature(cfg.model)}))
    (run / "checkpoints" / "latest").write_text("step_00000008\n")
    with pytest.raises(CheckpointMismatchError, match="written with train.group_parallel=2, this run has 1"):
        train(cfg)


# ---- EMA ---------------------------------------------------------------------------------------------------
def test_sharded_ema_matches_float64_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    decay, world = 0.8, 3
    shards = [ShardedEMA(model, decay, rank_world=(r, world)) for r in range(world)]
    ref = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for e in shards:
            e.update()
        for k, p in model.named_parameters():
            for i in range(p.numel()):  # explicit loop: ema = d * ema + (1 - d) * p
                ref[k].view(-1)[i] = decay * ref[k].view(-1)[i] + (1 - decay) * float(p.detach().view(-1)[i])
    gathered = torch.stack([e.local_state() for e in shards])  # what all_gather would assemble
    for name, _ in model.named_parameters():
        e = shards[0]
        full = gathered[:, e.offsets[name]:e.offsets[name] + e.chunks[name]].reshape(-1)[:e.numels[name]]
        torch.testing.assert_close(full.double().view(e.shapes[name]), ref[name], rtol=1e-6, atol=1e-6)
    single = ShardedEMA(model, decay)
    state = {k: v.float() for k, v in ref.items()}
    single.load_full_state(state)
    for k, v in single.full_state().items():
        assert torch.equal(v, state[k])
    with pytest.raises(ValueError, match="missing"):
        single.load_full_state({})


# ---- non-finite guard ----------------------------------------------------------------------------------------
def test_guarded_adamw_skips_nonfinite_and_matches_adamw_otherwise():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    guard = GuardedAdamW(a.parameters(), partitioned=False, lr=1e-2, weight_decay=0.1, foreach=True)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(2):
        for m, opt in ((a, guard), (b, plain)):
            opt.zero_grad()
            m(torch.ones(2, 4)).pow(2).sum().backward()
            opt.step()
    assert not guard.last_skipped and math.isfinite(guard.last_grad_norm)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)  # decoupled decay then AdamW without decay is torch AdamW's own order
    before = [p.detach().clone() for p in a.parameters()]
    guard.zero_grad()
    a(torch.full((2, 4), float("nan"))).sum().backward()
    guard.step()
    assert guard.last_skipped and guard.skipped_total == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    assert all(s["step"] == 2 for s in guard.state.values())


def test_guarded_adamw_clips_by_global_norm():
    """Clipping equals the formula written out (norm of all gradients, coefficient max_norm / (norm + 1e-6),
    applied only when below 1) followed by an unclipped torch AdamW."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    guard = GuardedAdamW(a.parameters(), partitioned=False, lr=1e-2, max_norm=0.5)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    for scale in (10.0, 1e-3):  # first step clipped, second not
        x = torch.randn(4, 6) * scale
        for m, opt in ((a, guard), (b, plain)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
        grads = [p.grad.double() for p in b.parameters()]
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        coef = 0.5 / (norm + 1e-6)
        if coef < 1:
            for p in b.parameters():
                p.grad.mul_(coef)
        guard.step()
        plain.step()
        assert guard.last_grad_norm == pytest.approx(norm, rel=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one parameter group, got 2"):
        GuardedAdamW([{"params": [a.weight]}, {"params": [a.bias]}], partitioned=False, lr=1e-3)


# ---- in-process DeepSpeed (world of 1) ----------------------------------------------------------------------------
def _free_streaming(shards: Path) -> None:
    """Drop the finished run's datasets and their shared memory before the next run opens the same shards."""
    gc.collect()
    clean_streaming_shm(shards)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop(fm_shards, tmp_path):
    from gd.train import train
    from gd.train.guard import NonFiniteError

    run = tmp_path / "nan"
    base = overrides(fm_shards, run, "train.global_batch=8", "train.steps=6", "train.ckpt_every=100")
    result = train(compose(*base, callbacks(NanInputs={"steps": [2, 3]}), "train.max_nonfinite=3"))
    _free_streaming(fm_shards)
    assert result["skipped_steps"] == 2 and math.isfinite(result["loss"])
    recs = {r["step"]: r for r in _records(run) if "loss" in r}
    assert recs[2]["skipped_steps"] == 0 and recs[3]["skipped_steps"] == 1 and recs[4]["skipped_steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in recs.values() if r["step"] not in (3, 4))
    ema = torch.load(run / "ema.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in ema.values())

    run2 = tmp_path / "nan_stop"
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        train(compose(*overrides(fm_shards, run2, "train.global_batch=8", "train.steps=6",
                                 callbacks(NanInputs={"steps": [1, 2, 3]}), "train.max_nonfinite=2")))
    _free_streaming(fm_shards)


class _RecordingData:
    """The trainer's data source, recording which stream each micro-batch came from and its true labels."""

    def __init__(self, inner):
        self.inner, self.loaders, self.calls = inner, inner.loaders, []

    def prefetch(self, groups, plains):
        self.inner.prefetch(groups, plains)

    def next(self, grouped):
        x, y = self.inner.next(grouped)
        self.calls.append((grouped, y.clone()))
        return x, y


@pytest.mark.slow
def test_trainer_feeds_the_model_what_the_plan_says(fm_shards, tmp_path):
    """The trainer's GroupDiff wiring, recorded at the model's input over 16 steps of 2 accumulated micro-batches
    (released recipe, p_group 0.5): each micro-batch reads the stream its plan names; group micro-batches reach the
    model as groups of N with every label null, equal t within a group (sigma_tv 0) and distinct sample-embedding
    slots per group; conditional ones reach it at group size 1 with their true labels (no class dropout). Catches
    a stream swapped, labels not nulled or dropped on conditional images, the group size not passed, or the plan
    decided per step where it is per micro-batch."""
    from gd.train.data import StreamingData
    from gd.train.trainer import Trainer

    cfg = compose(*overrides(fm_shards, tmp_path / "run", "train.global_batch=16", "train.micro_batch=8",
                             "train.steps=16", "train.ckpt_every=100", "diffusion.p_group=0.5"))
    seen = []
    trainer = Trainer(cfg)
    trainer.data = _RecordingData(trainer.data)
    assert isinstance(trainer.data.inner, StreamingData) and trainer.layout.grad_accum == 2
    hook = trainer.model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[1].detach().clone(), args[2].clone(), kw["group_size"],
                                         kw["slots"].clone())), with_kwargs=True)
    trainer.train()
    hook.remove()
    _free_streaming(fm_shards)
    plan, null = trainer.plan, cfg.model.num_classes
    assert len(seen) == len(trainer.data.calls) == 32
    kinds = set()
    for i, ((t, y, n, slots), (grouped, true_y)) in enumerate(zip(seen, trainer.data.calls)):
        step, micro = divmod(i, 2)
        mp = plan.micro(step, 0, micro)
        assert grouped == mp.is_group, f"step {step} micro {micro}: read the wrong stream"
        kinds.add(grouped)
        if grouped:
            assert n == 4 and torch.all(y == null)
            assert torch.all(t.view(-1, 4) == t.view(-1, 4)[:, :1])
            assert all(len(set(g.tolist())) == 4 for g in slots.view(-1, 4))
        else:
            assert n == 1 and torch.equal(y, true_y) and not torch.any(y == null)
        assert slots.min() >= 0 and slots.max() < cfg.model.max_group_size
    assert kinds == {True, False}
    recs = [r for r in _records(tmp_path / "run") if "loss" in r]
    fracs = [r["group_frac"] for r in recs]
    assert fracs == [float(plan.group_micro_batches(s, 1).mean()) for s in range(16)]
    assert any(0.0 < f < 1.0 for f in fracs)  # a step mixed a group and a conditional micro-batch


@pytest.mark.slow
def test_stop_requested_checkpoints_and_resumes(fm_shards, tmp_path):
    from gd.train import train

    run = tmp_path / "stop"
    cfg = compose(*overrides(fm_shards, run, "train.global_batch=8", "train.steps=6", "train.ckpt_every=100",
                             "train.s_cross_every=2"))
    polls = iter(range(100))
    result = train(cfg, stop_requested=lambda: next(polls) >= 2)
    _free_streaming(fm_shards)
    assert result["preempted"] and result["step"] == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (run / "ema.pt").exists()
    result = train(cfg)
    _free_streaming(fm_shards)
    assert not result["preempted"] and result["step"] == 6 and (run / "ema.pt").is_file()
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    scores = [r for r in _records(run) if "s_cross" in r]  # step 6 is a group step of this seed's plan
    assert scores and all(0.0 <= r["s_cross"] <= 1.0 for r in scores)


@pytest.mark.slow
def test_logged_s_cross_is_the_loop_reference_on_the_probed_batch(fm_shards, tmp_path):
    """The S_cross the trainer logs (per layer and mean) equals the explicit-loop float64 score of the training model
    on the last group batch at t = 0.5 with the probe's seeded noise and slots. Catches the probe scoring another
    batch, another t, the EMA instead of the trained weights, or layers mislabelled."""
    import copy

    from gd.train.callbacks import Callback
    from gd.train.trainer import Trainer
    from tests.models.test_flops_score import _loop_score

    run = tmp_path / "run"
    checked = []

    class Check(Callback):
        def on_step_end(self, trainer, step):
            rec = next((r for r in _records(run) if r["step"] == step and "s_cross" in r), None)
            if rec is None:
                return
            x1, y, n = trainer.probe._last
            gen = torch.Generator().manual_seed(0)
            noise = torch.randn(x1.shape, generator=gen)
            slots = trainer.model.draw_slots(x1.shape[0], n, gen)
            model = copy.deepcopy(trainer.model).double().eval()
            t = torch.full((x1.shape[0],), 0.5, dtype=torch.float64)
            xt = 0.5 * x1.double() + 0.5 * noise.double()
            want = [_loop_score(model, xt, t, y, n, layer, slots=slots) for layer in range(model.depth)]
            got = [rec[f"s_cross_l{layer}"] for layer in range(model.depth)]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6) and rec["s_cross"] == pytest.approx(sum(want) / 2)
            checked.append(step)

    cfg = compose(*overrides(fm_shards, run, "train.global_batch=8", "train.steps=6", "train.ckpt_every=100",
                             "train.s_cross_every=2", "diffusion.p_group=0.5"))
    Trainer(cfg, callbacks=[Check()]).train()
    _free_streaming(fm_shards)
    assert checked, "no S_cross was logged"


@pytest.mark.slow
def test_bench_prints_reference_and_engine_rows(capsys):
    """Both rows measured, and each row's TFLOP/s and MFU are its img/s x 3 x the forward FLOPs at N = 4 / peak (1
    in the tiny config): catches FLOPs taken at N = 1 or without the backward's factor."""
    from gd.bench.train import compose_bench, main
    from gd.models.flops import forward_flops

    args = [a for a in overrides(Path("unused"), Path("unused")) if not a.startswith("diffusion")]
    bench = ["bench.isolate=false", "bench.steps=2", "bench.warmup=1", "bench.batch=8", "bench.group_sizes=[4]",
             "bench.compile=[false]", "bench.variants=[z2_fp32]"]
    main([*args, *bench])
    table = capsys.readouterr().out.split("| mode |")[-1].strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in table] == ["reference", "engine"]
    from gd.bench.train import measure
    from gd.models import build_model
    from gd.train.engine import init_distributed
    from gd.train.trainer import model_kwargs

    cfg = compose_bench([*args, *bench])
    kwargs = model_kwargs(cfg.model)
    flops = 3 * forward_flops(build_model(kwargs.pop("name"), **kwargs), 4)
    for spec in ({"mode": "reference", "variant": "-", "n": 4, "compile": False},
                 {"mode": "engine", "variant": "z2_fp32", "n": 4, "compile": False}):
        row = measure(cfg, spec, init_distributed().device)
        assert not row["error"] and row["ips"] > 0, row
        assert row["tflops"] == pytest.approx(row["ips"] * flops / 1e12, rel=1e-9)
        assert row["mfu"] == pytest.approx(row["tflops"] / float(cfg.train.peak_tflops), rel=1e-12)


# ---- EMA of the fp32 master weights under DeepSpeed bf16 (world of 1, in-process) ------------------------------------
def _fp32_masters(engine, stage: int) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights, read through DeepSpeed's own accessors (independent of ShardedEMA)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone().view(p.ds_shape if stage == 3 else p.shape)
            for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ema_tracks_fp32_masters_under_bf16(stage):
    from tests.train.bf16_ema_worker import bf16_engine_with_ema

    engine, ema = bf16_engine_with_ema(stage)
    masters, state = _fp32_masters(engine, stage), ema.full_state()
    assert state.keys() == masters.keys()
    rounded = 0
    for name, master in masters.items():
        assert torch.equal(state[name], master.float().cpu()), f"{name}: EMA (decay 0) is not the fp32 master"
        rounded += int((master.bfloat16().float() != master).sum())
    assert rounded > 0, "the masters equal their bf16 rounding: the test could not tell them apart"
    del engine, ema
    gc.collect()


@pytest.mark.slow
def test_stop_file_is_honoured_once_then_removed(fm_shards, tmp_path):
    import signal

    from gd.train.__main__ import main

    run = tmp_path / "stopfile"
    run.mkdir()
    (run / "STOP").write_text("")
    args = overrides(fm_shards, run, "train.global_batch=8", "train.steps=3", "train.ckpt_every=100")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        assert main(args) == 0
        _free_streaming(fm_shards)
        assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
        assert not (run / "STOP").exists() and not (run / "ema.pt").exists()
        assert main(args) == 0  # the next launch trains on instead of stopping after one step
        _free_streaming(fm_shards)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003" and (run / "ema.pt").is_file()
    assert [r["step"] for r in _records(run) if "loss" in r] == [1, 2, 3]


# The released rule on SiT (names written out, not derived from gd.train.engine.decays).
DECAYED = {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
           "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"}


def test_decay_rule_names_exactly_the_released_matrices():
    """On SiT-XL/2 (meta device): the decayed parameters are the qkv, proj, fc1, fc2 and adaLN weights of every
    block and the final layer's linear and adaLN weights, nothing else (5 per block and 2 in the final layer)."""
    from gd.models import build_model
    from gd.train.engine import decays

    with torch.device("meta"):
        model = build_model("SiT-XL/2")
    names = {n for n, p in model.named_parameters() if decays(n, p)}
    kinds = {".".join(n.split(".")[2:]) if n.startswith("blocks.") else n for n in names}
    assert kinds == {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                     "adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"}
    assert len(names) == 5 * 28 + 2


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (0, "bf16_autocast"), (1, "fp32"), (1, "bf16"),
                                             (2, "bf16_autocast"), (3, "fp32")])
def test_weight_decay_only_on_matrices_under_every_engine(stage, precision):
    """One DeepSpeed step with zero gradients: AdamW's update is 0, so each fp32 master must be exactly
    ``p * (1 - lr * wd)`` for the decayed matrices and must not move for the rest (biases, the patch, timestep, class
    and sample embeddings): the released recipe's rule, applied through views that alias the optimizer's storage.
    Catches decay on biases or embeddings, no decay at all, or views into a copy under some ZeRO stage."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from gd.models import build_model
    from gd.train.engine import build_engine, init_distributed

    d = init_distributed()
    torch.manual_seed(0)
    model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, hidden_size=32,
                        depth=1, num_heads=2, max_group_size=4)
    with torch.no_grad():
        model.sample_embed.fill_(1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = {"zero_stage": stage, "precision": precision, "global_batch": 4, "micro_batch": 4, "lr": 1e-2,
         "weight_decay": 0.5, "grad_clip": 1.0}
    engine, opt = build_engine(model, t, batch_layout(t, 1), d.device)
    x = torch.randn(4, 1, 8, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    out = engine(x, torch.rand(4), torch.randint(0, 10, (4,)), group_size=4)
    engine.backward(0.0 * out.float().sum())
    engine.step()
    assert not opt.last_skipped and opt.last_grad_norm == 0.0 and len(opt.param_groups) == 1
    factor = torch.tensor(1.0 - 1e-2 * 0.5)
    for name, p in engine.module.named_parameters():
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                master = p.detach().float().clone()
        elif stage == 0:
            master = p.detach()
        else:
            master = safe_get_full_fp32_param(p).detach().view(p.shape)
        start = before[name].bfloat16().float() if precision == "bf16" else before[name]  # masters of bf16 weights
        want = start * factor if name in DECAYED else start
        assert torch.equal(master, want), name
    del engine, opt
    gc.collect()


@pytest.mark.slow
@pytest.mark.long
def test_engine_compile_trains_like_eager():
    """``train.compile=true`` (DeepSpeed's engine.compile(), inductor on this CPU): conditional (N=1) and group
    (N=4) steps alternate, as in GroupDiff-l training, and the losses and weights follow the eager run."""
    from gd.models import build_model
    from gd.train.engine import build_engine, init_distributed

    d = init_distributed()
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("SiT-S/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
                            hidden_size=32, depth=2, num_heads=2, max_group_size=4)
        t = {"zero_stage": 2, "precision": "fp32", "global_batch": 8, "micro_batch": 8, "lr": 1e-3,
             "weight_decay": 0.01, "grad_clip": 1.0, "compile": compiled}
        engine, _ = build_engine(model, t, batch_layout(t, 1), d.device)
        losses = []
        for s in range(3):
            gen = torch.Generator().manual_seed(s)
            x = torch.randn(8, 1, 8, 8, generator=gen)
            n = 4 if s % 2 else 1
            out = engine(x, torch.rand(8, generator=gen), torch.randint(0, 10, (8,), generator=gen),
                         group_size=n, slots=model.draw_slots(8, n, gen))  # seeded, as the trainer draws them
            loss = (out - x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        runs[compiled] = (losses, {n: p.detach().clone() for n, p in engine.module.named_parameters()})
        del engine
        gc.collect()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weight, rtol=1e-5, atol=1e-6)
