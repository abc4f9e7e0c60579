"""Spawned worker for test_group_parallel: a tiny float64 SiT whose groups are split over P gloo ranks, compared
with the same model run on the whole batch in one process (the reference path, itself checked against the
explicit-loop reference in test_sit.py). Every rank writes what it measured to ``out/rank<r>.json``."""
from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist

from gd.bench.group_parallel import CommCounter, saved_bytes
from gd.models import build_model
from gd.models.group_parallel import IMPLS, GroupParallel, comm_bytes, new_group_parallel
from tests.models.conftest import randomize

TINY = dict(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10, max_group_size=8,
            learn_sigma=False, sample_embed="tokens")
LO, HI = 0.3, 0.7
# (name, N, groups, model overrides, timesteps): "mixed" puts group 1's anchor outside [LO, HI] and groups 0, 2
# inside, and every other member on the other side of its anchor, so a rank that took its own first member as
# the anchor would attend differently; "outside" puts every group outside (no group attention at all).
CASES = [
    ("N4", 4, 2, {}, "random"),
    ("N4_cond_embed", 4, 2, {"sample_embed": "cond"}, "random"),
    ("N8_window_mixed_cond_embed", 8, 3, {"group_t_window": [LO, HI], "sample_embed": "cond"}, "mixed"),
    ("N8", 8, 2, {}, "random"),
    ("N8_group_layers", 8, 2, {"group_layers": [1, 2]}, "random"),
    ("N4_window_mixed", 4, 3, {"group_t_window": [LO, HI]}, "mixed"),
    ("N8_window_mixed_layers_ckpt", 8, 3, {"group_t_window": [LO, HI], "group_layers": [0, 1],
                                           "grad_checkpointing": True}, "mixed"),
    ("N8_window_outside", 8, 2, {"group_t_window": [LO, HI]}, "outside"),
    ("N4_window_mixed_compiled", 4, 3, {"group_t_window": [LO, HI]}, "mixed"),
]


def timesteps(kind: str, groups: int, n: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.rand(groups, n, generator=gen, dtype=torch.float64)
    if kind == "random":
        return t.reshape(-1)
    anchors = [0.5, 0.9, 0.4] if kind == "mixed" else [0.9, 0.1, 0.95]
    for g in range(groups):
        inside = LO <= anchors[g] <= HI
        t[g] = (0.85 + 0.1 * t[g]) if inside else (0.4 + 0.2 * t[g])  # members opposite to the anchor
        t[g, 0] = anchors[g]
    return t.reshape(-1)


def local_rows(groups: int, n: int, ctx: GroupParallel) -> torch.Tensor:
    """Batch rows this rank holds: members r*N/P .. (r+1)*N/P - 1 of every group."""
    return torch.arange(groups * n).view(groups, ctx.degree, n // ctx.degree)[:, ctx.rank].reshape(-1)


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    return randomize(build_model("SiT-S/2", **{**TINY, **overrides}), seed).double()


def compare(name: str, n: int, groups: int, overrides: dict, kind: str, ctx: GroupParallel) -> dict:
    """Max abs differences of outputs, input grads and group-summed parameter grads against one process."""
    gen = torch.Generator().manual_seed(7)
    b = groups * n
    x = torch.randn(b, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = timesteps(kind, groups, n, gen)
    y = torch.randint(0, 11, (b,), generator=gen)
    w = torch.randn(b, 4, 8, 8, generator=gen, dtype=torch.float64)  # loss = sum(out * w): a fixed cotangent
    model = tiny_model(**overrides)

    # "cond" sample embedding: one permutation per group, the ranks each passing their members' slots of it.
    slots = model.draw_slots(b, n, torch.Generator().manual_seed(7))
    xr = x.clone().requires_grad_()
    ref = model(xr, t, y, n, slots=slots)
    (ref * w).sum().backward()
    ref_grads = {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    window_matters = None
    if "group_t_window" in overrides:
        unwindowed = tiny_model(**{**overrides, "group_t_window": None})
        with torch.no_grad():
            window_matters = float((unwindowed(x, t, y, n, slots=slots) - ref).abs().max())

    model.set_group_parallel(ctx)
    rows = local_rows(groups, n, ctx)
    xl = x[rows].clone().requires_grad_()
    # Compiled: the collectives must trace into the forward and backward graphs (aot_eager traces autograd).
    fwd = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False) if "compiled" in name else model
    local = model.draw_slots(len(rows), n, torch.Generator().manual_seed(7))
    assert torch.equal(local, slots[rows]), "draw_slots does not give this rank its members' slots"
    out = fwd(xl, t[rows], y[rows], n, slots=local)
    (out * w[rows]).sum().backward()
    param_err, checked = 0.0, 0
    for k, p in model.named_parameters():
        grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(grad, group=ctx.group)  # replicated over the group-parallel ranks: their sum is the grad
        expected = torch.zeros_like(p) if ref_grads[k] is None else ref_grads[k]
        param_err = max(param_err, float((grad - expected).abs().max()))
        checked += 1
    out, ref = out.detach(), ref.detach()
    return {
        "out": float((out - ref[rows]).abs().max()),
        "x_grad": float((xl.grad - xr.grad[rows]).abs().max()),
        "param_grad": param_err,
        "params_checked": checked,
        "scale": float(ref.abs().max()),
        "grad_scale": max(float(g.abs().max()) for g in ref_grads.values() if g is not None),
        "window_matters": window_matters,
    }


def count_bytes(n: int, groups: int, group_layers: list[int], ctx: GroupParallel) -> dict:
    """Bytes sent by this rank in one forward + backward (counted) against comm_bytes x group layers."""
    model = tiny_model(group_layers=group_layers)
    model.set_group_parallel(ctx)
    gen = torch.Generator().manual_seed(3)
    m = n // ctx.degree
    x = torch.randn(groups * m, 4, 8, 8, generator=gen, dtype=torch.float64)
    counter = CommCounter()
    with counter:
        model(x, torch.rand(groups * m, generator=gen, dtype=torch.float64), torch.zeros(groups * m, dtype=torch.long),
              n).sum().backward()
    layers = group_layers[1] - group_layers[0]
    expected = layers * comm_bytes(ctx.impl, n, model.num_patches, model.hidden_size, model.num_heads, ctx.degree,
                                   torch.float64, groups)
    return {"counted": counter.total, "expected": expected, "calls": dict(counter.calls)}


def activation_bytes(n: int, groups: int, ctx: GroupParallel) -> dict:
    """Bytes autograd saves on this rank, and what one process saves for the same N/P images in groups of N/P."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    m = n // ctx.degree
    x = torch.randn(groups * m, 4, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t, y = torch.rand(groups * m, generator=gen, dtype=torch.float64), torch.zeros(groups * m, dtype=torch.long)
    exclude = [*model.parameters(), *model.buffers()]
    local, _ = saved_bytes(lambda: model(x, t, y, m), exclude)
    model.set_group_parallel(ctx)
    split, _ = saved_bytes(lambda: model(x, t, y, n), exclude)
    a = groups * m * model.num_patches * model.hidden_size * 8  # this rank's share of one activation, bytes
    return {"local": local, "split": split, "share": a, "layers": model.depth}


def errors(ctx: GroupParallel) -> dict:
    """The messages of the two refusals: N not divisible by P, and (Ulysses) heads not divisible by P."""
    p = ctx.degree
    found = {}
    model = tiny_model()
    model.set_group_parallel(ctx)
    bad_n = p + 1
    try:
        model(torch.zeros(2 * bad_n, 4, 8, 8, dtype=torch.float64), torch.zeros(2 * bad_n, dtype=torch.float64),
              torch.zeros(2 * bad_n, dtype=torch.long), bad_n)
    except ValueError as err:
        found["group_size"] = str(err)
    heads = 3 * p // 2
    try:
        tiny_model(hidden_size=12 * heads, num_heads=heads).set_group_parallel(ctx)
    except ValueError as err:
        found["heads"] = str(err)
    found["bad_n"], found["bad_heads"] = bad_n, heads
    return found


def run(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    result: dict = {}
    for impl in IMPLS:
        ctx = new_group_parallel(world, impl)
        result[impl] = {name: compare(name, n, g, o, kind, ctx) for name, n, g, o, kind in CASES}
        result[impl]["bytes"] = {"all_layers": count_bytes(8, 2, [0, 2], ctx),
                                 "one_layer": count_bytes(8, 2, [1, 2], ctx)}
        result[impl]["memory"] = activation_bytes(8, 2, ctx)
        result[impl]["errors"] = errors(ctx)
        model = tiny_model()
        model.set_group_parallel(ctx)
        result[impl]["deepcopy_shares_context"] = copy.deepcopy(model).blocks[0].attn.group_parallel is ctx
    # All-gather needs no H % P: the heads Ulysses refuses still give exact results.
    ctx = new_group_parallel(world, "allgather")
    heads = 3 * world // 2
    result["allgather_uneven_heads"] = compare("uneven_heads", 8, 2, {"hidden_size": 12 * heads, "num_heads": heads},
                                               "random", ctx)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def zero_step(rank: int, world: int, store: str, out: str, degree: int = 2) -> None:
    """One DeepSpeed ZeRO-2 step (fp32, SGD with lr 1, no clipping) of a group-parallel tiny SiT whose ZeRO group
    is the whole world (no mpu: D = world/P replicas x P group-parallel ranks). Rank 0 writes the update and the
    single-process gradient of the replicas' mean loss for each loss form, to be compared by the test."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    import deepspeed

    n, groups, replicas = 4, 2, world // degree
    ctx = new_group_parallel(degree)
    replica, m = rank // degree, n // degree

    def batch(d: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(100 + d)
        b = groups * n
        return (torch.randn(b, 4, 8, 8, generator=gen), torch.rand(b, generator=gen),
                torch.randint(0, 10, (b,), generator=gen), torch.randn(b, 4, 8, 8, generator=gen))

    def loss(out: torch.Tensor, w: torch.Tensor, form: str, members: int) -> torch.Tensor:
        per_image = (out * w).flatten(1).sum(1)
        if form == "image_mean":
            return per_image.mean()
        return per_image.view(groups, members).sum(1).mean()  # gd.diffusion.group_loss's form

    result = {}
    for form, scale in (("image_mean", 1.0), ("group_sum", 1.0), ("group_sum", float(degree))):
        model = randomize(build_model("SiT-S/2", **{**TINY, "hidden_size": 32}), 0)
        start = {k: p.detach().clone() for k, p in model.named_parameters()}
        model.set_group_parallel(ctx)
        config = {"train_micro_batch_size_per_gpu": groups * m, "gradient_accumulation_steps": 1,
                  "train_batch_size": groups * m * world, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=config, dist_init_required=False)
        x, t, y, w = batch(replica)
        rows = torch.arange(groups * n).view(groups, degree, m)[:, ctx.rank].reshape(-1)
        slots = model.draw_slots(groups * m, n, torch.Generator().manual_seed(replica))  # this rank's members' slots
        engine.backward(scale * loss(engine(x[rows], t[rows], y[rows], n, slots=slots), w[rows], form, m))
        engine.step()
        if rank == 0:
            ref = randomize(build_model("SiT-S/2", **{**TINY, "hidden_size": 32}), 0)
            for d in range(replicas):
                x, t, y, w = batch(d)
                slots = ref.draw_slots(groups * n, n, torch.Generator().manual_seed(d))
                (loss(ref(x, t, y, n, slots=slots), w, form, n) / replicas).backward()
            update = {k: p.detach() - start[k] for k, p in engine.module.named_parameters()}
            grads = {k: p.grad for k, p in ref.named_parameters()}
            dot = sum(float((-update[k] * g).sum()) for k, g in grads.items())
            result[f"{form}x{scale:g}"] = {
                "err": max(float((update[k] + g).abs().max()) for k, g in grads.items()),
                "scale": max(float(g.abs().max()) for g in grads.values()),
                "ratio": dot / sum(float((g * g).sum()) for g in grads.values()),
            }
        del engine
    if rank == 0:
        with open(os.path.join(out, "zero.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
