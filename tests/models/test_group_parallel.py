"""Group parallelism (gd.models.group_parallel): a group's members split over P gloo ranks must give exactly the
single-process model's outputs and gradients, send the bytes comm_bytes says, and keep what the memory formula
says. The distributed tests spawn P processes (a FileStore in tmp_path, no ports) that run every case once."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.multiprocessing as mp

from gd.bench.group_parallel import BenchConfig, CommCounter, cost_rows
from gd.models.group_parallel import GroupParallel, check_heads, comm_bytes, members_per_rank
from tests.models.conftest import inputs, tiny
from tests.models.group_parallel_worker import CASES, run, zero_step

TOL = 1e-10
TIMEOUT = 300


def spawn(fn, world: int, out) -> None:
    """``fn(rank, world, store, out)`` on ``world`` processes; a failure or a hang fails the test."""
    context = mp.spawn(fn, args=(world, str(out / "store"), str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            # Ranks that disagree on which collectives to run block in gloo without its timeout firing.
            for proc in context.processes:
                proc.kill()
            pytest.fail(f"{world} ranks did not finish in {TIMEOUT} s (mismatched collectives?)")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P{p}")
def spawned(request, tmp_path_factory):
    """Every case of group_parallel_worker on P ranks: {rank: result}."""
    p = request.param
    out = tmp_path_factory.mktemp(f"gp{p}")
    spawn(run, p, out)
    return p, {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(p)}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ulysses", "allgather"])
def test_outputs_and_gradients_equal_one_process(spawned, impl):
    """Outputs, input grads and every parameter grad (summed over the group-parallel ranks) equal the unsplit
    model's in float64 for N=4 and 8, limited group_layers, a mixed timestep window with gradient checkpointing,
    and a window that excludes every group. Catches: wrong member/head order in the exchanges (tokens attending
    to the wrong keys), a missing or wrong backward collective (dK/dV of other ranks' queries lost), the sample
    embedding indexed by the local instead of the global slot, the window's anchor taken from each rank's own
    first member, collectives that deadlock when layers or groups skip group attention, and (compiled case,
    aot_eager, fullgraph) exchanges that torch.compile cannot trace or traces without their backward."""
    p, results = spawned
    for rank, result in results.items():
        for name, *_ in CASES:
            r = result[impl][name]
            where = f"P={p} rank {rank} {impl} {name}"
            assert r["scale"] > 0.1 and r["grad_scale"] > 0.1, f"{where}: trivial outputs or gradients {r}"
            assert r["params_checked"] > 20, where
            for key in ("out", "x_grad", "param_grad"):
                assert r[key] < TOL, f"{where}: {key} differs by {r[key]:.3g}"
            if "window_mixed" in name:
                assert r["window_matters"] > 1e-3, f"{where}: the window did not change the output; the case is moot"


@pytest.mark.slow
def test_allgather_takes_heads_ulysses_refuses(spawned):
    """All-gather keeps every head on every rank, so a head count P does not divide is exact too. Catches an
    all-gather path that silently depends on H % P."""
    p, results = spawned
    for rank, result in results.items():
        r = result["allgather_uneven_heads"]
        assert max(r["out"], r["x_grad"], r["param_grad"]) < TOL, f"P={p} rank {rank}: {r}"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ulysses", "allgather"])
def test_counted_bytes_match_comm_bytes(spawned, impl):
    """Bytes counted from the collectives actually called in one forward + backward equal comm_bytes per group
    layer times the group layers (2, then 1 with group_layers=[1, 2]). Catches a formula that forgets the backward
    or the output exchange, or an implementation that sends more than it should (e.g. gathering q too)."""
    p, results = spawned
    expected_calls = {"ulysses": {"all_to_all_single": 4}, "allgather": {"all_gather_into_tensor": 1,
                                                                         "reduce_scatter_tensor": 1}}[impl]
    for rank, result in results.items():
        for key, layers in (("all_layers", 2), ("one_layer", 1)):
            r = result[impl]["bytes"][key]
            assert r["counted"] == r["expected"] > 0, f"P={p} rank {rank} {impl} {key}: {r}"
            assert r["calls"] == {k: v * layers for k, v in expected_calls.items()}, r


@pytest.mark.slow
def test_activation_memory_per_rank(spawned):
    """Saved-for-backward bytes per rank against one process holding the same N/P images in groups of N/P:
    Ulysses adds one activation a per group layer (a = this rank's share of one activation: the attention output
    kept in head layout for the kernel's backward and, after the return all-to-all, in member layout for proj);
    all-gather adds the gathered K, V instead, 2*P*a per group layer. These are the terms of gd.bench.group_parallel's
    memory formula; catches a formula that does not describe the implementation (or an exchange that keeps its
    send buffers alive for backward)."""
    p, results = spawned
    for rank, result in results.items():
        u, g = result["ulysses"]["memory"], result["allgather"]["memory"]
        layers, share = u["layers"], u["share"]
        assert u["split"] - u["local"] == share * layers, f"P={p} rank {rank}: {u}"
        assert g["split"] - g["local"] == 2 * p * share * layers, f"P={p} rank {rank}: {g}"


@pytest.mark.slow
def test_refusals_name_the_values(spawned):
    """N not divisible by P and (Ulysses only) heads not divisible by P are refused with both values named."""
    p, results = spawned
    for rank, result in results.items():
        for impl in ("ulysses", "allgather"):
            e = result[impl]["errors"]
            assert f"group_size N={e['bad_n']} is not divisible by group_parallel P={p}" in e["group_size"], e
            assert result[impl]["deepcopy_shares_context"]
        e = result["ulysses"]["errors"]
        assert f"num_heads={e['bad_heads']}" in e["heads"] and f"P={p}" in e["heads"], e
        assert "heads" not in result["allgather"]["errors"]


@pytest.mark.slow
def test_zero_over_the_world_gives_the_group_gradient(tmp_path):
    """The gradient contract with DeepSpeed, on 4 ranks (2 replicas x P=2) under ZeRO-2 with no mpu: ZeRO
    averages over all 4 ranks, which gives the gradient of the replicas' mean loss (SGD lr 1: update = -grad)
    when each rank's loss is a per-image mean over its own images, or gd.diffusion's per-group sum scaled by P;
    unscaled, the per-group sum gives 1/P of it. Catches a trainer that wires group parallelism into ZeRO with
    the wrong normalisation, and collectives whose backward does not survive DeepSpeed's hooks."""
    spawn(zero_step, 4, tmp_path)
    r = json.loads((tmp_path / "zero.json").read_text())
    for key in ("image_meanx1", "group_sumx2"):
        assert r[key]["scale"] > 1.0 and r[key]["err"] < 1e-5 * r[key]["scale"], (key, r[key])
    assert r["group_sumx1"]["ratio"] == pytest.approx(0.5, abs=1e-6), r["group_sumx1"]


def test_degree_one_is_the_plain_path():
    """P=1 leaves the model on today's code path: bitwise equal outputs and no collective at all. Catches a
    context of degree 1 that still routes attention through the exchanges."""
    model = tiny(group_t_window=[0.2, 0.9])
    x, t, y = inputs(8)
    plain = model(x, t, y, 4)
    model.set_group_parallel(GroupParallel(None, 1, 0))
    assert model.group_parallel is None and all(b.attn.group_parallel is None for b in model.blocks)
    counter = CommCounter()
    with counter:
        same = model(x, t, y, 4)
    assert torch.equal(plain, same) and counter.calls == {}


def test_validation_messages():
    """The pure checks give the values and the fix; comm_bytes refuses what the attention would refuse."""
    assert members_per_rank(16, 4) == 4
    with pytest.raises(ValueError, match="group_size N=6 is not divisible by group_parallel P=4"):
        members_per_rank(6, 4)
    with pytest.raises(ValueError, match=r"num_heads=6 is not divisible by group_parallel P=4.*impl='allgather'"):
        check_heads(6, 4, "ulysses")
    check_heads(6, 4, "allgather")
    with pytest.raises(ValueError, match="num_heads=16 is not divisible by group_parallel P=3"):
        comm_bytes("ulysses", 6, 256, 1152, 16, 3)
    with pytest.raises(ValueError, match="impl='ring'"):
        comm_bytes("ring", 16, 256, 1152, 16, 2)


def test_cost_table_attention_share_and_memory():
    """The cost table, written out for SiT-XL/2 (L=256, C=1152, 28 group layers, bf16) at N=16: the attention
    share is QK^T + PV over the forward total, and activation memory is the documented formula, falling as 1/P
    for Ulysses (plus one activation per group layer) while all-gather keeps a 2*N*L*C K, V term per layer. Catches
    a share computed over the wrong key length or a memory column that mixes up N, N/P and the two terms."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(BenchConfig)
    e0, e_block = 3.0, 20.0
    rows = {r["N"]: r for r in cost_rows(cfg, e0, e_block)}
    l, c, depth, elem = 256, 1152, 28, 2
    for n in (1, 16, 64):
        attention = depth * 4.0 * l * (n * l) * c
        assert rows[n]["attention_share"] == pytest.approx(attention / rows[n]["flops"], rel=1e-12)
    mem = rows[16]["memory"]
    assert mem["none1"] == 16 * l * c * elem * (e0 + depth * e_block)
    for p in (2, 4, 8):
        assert mem[f"ulysses{p}"] == 16 // p * l * c * elem * (e0 + depth * e_block + depth)
        assert mem[f"allgather{p}"] == mem[f"ulysses{p}"] + depth * 16 * l * c * elem * (2 * p - 1) / p
    assert set(rows[4]["memory"]) == {"none1", "ulysses2", "allgather2", "ulysses4", "allgather4"}
