"""Group parallelism: one group's attention computed by P ranks, each holding N/P of its members.

Layout. A group-parallel process group has P ranks; rank r of it holds members r*N/P .. (r+1)*N/P - 1 of every
group (contiguous slices, so the group's token sequence is the ranks' local sequences concatenated in rank order
and member i's global slot is r*N/P + i). Locally x is (G*N/P, L, C), group-major like the unsplit batch.
Everything in a SiT block except the attention product is per token (or per image) and runs locally; only the
attention over a group's N*L tokens needs the other ranks. :func:`new_group_parallel` builds the groups from P
consecutive ranks (a node's GPUs for P <= 8, so the exchanges stay on NVLink).

Two exact implementations of that attention, both autograd-correct (their collectives are torch's functional
collectives, whose backward is the adjoint collective and which torch.compile traces as collectives):

* ``ulysses`` (DeepSpeed-Ulysses): an all-to-all turns the local packed qkv (members-sharded, all heads) into
  the whole group's sequence for H/P heads, attention runs locally over all N*L keys, and a second all-to-all
  turns the output back into this rank's members with all heads. Backward: the same two all-to-alls in reverse.
  Needs H % P == 0 (SiT-XL/2 has 16 heads: P in 1, 2, 4, 8, 16).
* ``allgather``: each rank attends its own queries to the whole group's keys and values, all-gathered from the
  group (backward: a reduce-scatter of dK, dV). Works for any P.

Choice: ``ulysses`` is the default. Per attention layer, forward + backward, with a = G*(N/P)*L*C elements (this
rank's share of one activation), a rank sends (:func:`comm_bytes`, checked against counted collectives):

    ulysses    8 a (P-1)/P      (qkv 3a and output a each way, (P-1)/P of each all-to-all leaves the rank)
    allgather  4 a (P-1)        (K,V 2a to each of P-1 peers forward; the reduce-scatter of dK,dV backward)

The ratio is 2/P: equal at P=2, Ulysses half at P=4 and a quarter at P=8 (SiT-XL/2, N=16, bf16: 13.5 MiB vs
27 MiB per layer at P=4). Ulysses also keeps activation memory at ~1/P: attention saves this rank's H/P heads of
q, k, v over the group (3a, the size of its local qkv) and the output once per layout (2a, one a more than an
unsplit layer), while all-gather saves the gathered K, V (2aP per layer, i.e. the whole group's, at every P;
tests/models/test_group_parallel.py checks both terms). The attention FLOPs per rank are the same for both (1/P
of the group's). ``allgather`` stays for head counts P does not divide.

Why not ``deepspeed.sequence.layer.DistributedAttention`` (0.19.8): it exchanges q, k and v in three all-to-alls
plus one for the output (same bytes, twice the collectives of the packed-qkv exchange here); it goes through
``deepspeed.comm`` and, for uneven heads, DeepSpeed's global ``groups`` state, while gd.models must import and
sample where DeepSpeed is not installed (the GPU machines here); and its ``_SeqAllToAll`` is an autograd
Function that fills a preallocated buffer with ``dist.all_to_all_single``, the pattern its own
``_dim_zero_all_to_all`` docstring reports torch.compile traces into a silent zero gradient (the trainer has
``train.compile``). The exchange itself is the same: a sequence-sharded (B, S/P, H, D) tensor becomes a
head-sharded (B, S, H/P, D) one.

Gradients. Parameters are replicated over the group-parallel ranks. After backward, rank r's parameter gradient
is its local uses' share of the gradient of the sum of all P ranks' losses (the collectives' backward carries
the cross-rank terms), so the gradient of the group's loss is the SUM of the P ranks' gradients. ZeRO over the
whole world (no mpu: D replicas x P ranks, DeepSpeed averages over all D*P) therefore gives the right gradient
when the P ranks' losses add up to P times the group loss: a per-image mean over the rank's own images, or
gd.diffusion's per-group sum (mean over groups) multiplied by P; unscaled, the latter gives 1/P of the gradient
(test_zero_over_the_world_gives_the_group_gradient, real ZeRO-2 on 4 ranks). DeepSpeed's sequence-parallel mode
(an mpu with get_sequence_parallel_* / get_sequence_data_parallel_*) instead divides by D only, i.e. sums over
the P ranks, which suits the unscaled per-group sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from gd.distributed.layout import IMPLS, ParallelLayout, check_heads, members_per_rank
from gd.models.attention import _attend, attend


# torch 2.14 renamed the tensor all-gathers to *_single; the GPU machines run torch 2.11.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


@dataclass(frozen=True, eq=False)
class GroupParallel:
    """This rank's place in a group-parallel process group of ``degree`` P ranks (``rank`` in 0..P-1)."""

    group: dist.ProcessGroup | None
    degree: int
    rank: int
    impl: str = "ulysses"

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"group parallel impl={self.impl!r}: expected one of {IMPLS}")
        if self.degree < 1 or not 0 <= self.rank < self.degree:
            raise ValueError(f"group parallel degree={self.degree}, rank={self.rank}: expected 0 <= rank < degree")
        if self.degree > 1:
            size = dist.get_world_size(self.group)
            if size != self.degree:
                raise ValueError(f"group parallel degree={self.degree} but its process group has {size} ranks")

    def __deepcopy__(self, memo: dict) -> GroupParallel:
        return self  # a handle on a process group: an EMA copy of the model shares it

    def members(self, group_size: int) -> int:
        """Members of each group on this rank, N/P; a clear error when P does not divide N."""
        return members_per_rank(group_size, self.degree)

    def first_member(self, group_size: int) -> int:
        """Global slot of this rank's first member of each group."""
        return self.rank * self.members(group_size)

    def check_heads(self, num_heads: int) -> None:
        check_heads(num_heads, self.degree, self.impl)

    def attend(self, qkv: Tensor, members: int, num_heads: int, backend: str) -> Tensor:
        """Group attention of this rank's packed qkv (G*members, L, 3C) -> its output (G*members, L, C)."""
        if self.impl == "ulysses":
            self.check_heads(num_heads)
            return ulysses_attention(qkv, members, num_heads, backend, self)
        return allgather_attention(qkv, members, num_heads, backend, self)

    def from_first_rank(self, x: Tensor) -> Tensor:
        """Rank 0's ``x`` on every rank of the group (no gradient): e.g. the anchor member's timestep."""
        return _all_gather(x.detach().contiguous(), 0, self.group)[: x.shape[0]]

    def gather_members(self, x: Tensor, group_size: int) -> Tensor:
        """Every rank's members put back together (no gradient): this rank's (G*N/P, ...) -> the whole groups
        (G*N, ...), group-major, identical on every rank of the group (sampling: each rank integrates the whole
        chunk, so the sampler's draws and adaptive steps are those of one process)."""
        m = self.members(group_size)
        full = _all_gather(x.detach().contiguous(), 0, self.group)  # (P*G*m, ...), rank-major
        rest = x.shape[1:]
        return full.reshape(self.degree, x.shape[0] // m, m, *rest).transpose(0, 1).reshape(-1, *rest)


def new_group_parallel(degree: int, impl: str = "ulysses") -> GroupParallel:
    """Split the world into world/P group-parallel groups of P consecutive ranks; every rank must call this.

    Rank k*P + r is rank r of group-parallel group k. Ranks holding the same members of different groups
    (r fixed, k = 0..world/P-1) are the data-parallel replicas the loader splits groups over
    (:class:`gd.distributed.layout.ParallelLayout`); the optimizer's data-parallel reduction runs over the whole
    world (see the module doc).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = ParallelLayout.resolve(world, degree, impl=impl)
    mine = None
    for first in range(0, world, degree):
        group = dist.new_group(list(range(first, first + degree)))  # collective: all ranks create every group
        if first <= rank < first + degree:
            mine = group
    return GroupParallel(mine, degree, layout.member_rank(rank), impl)


def _all_to_all(x: Tensor, ctx: GroupParallel) -> Tensor:
    """Chunk j of dim 0 (size P) goes to rank j; chunk j of the result came from rank j. Its own adjoint."""
    return funcol.all_to_all_single_autograd(x.contiguous(), None, None, ctx.group)


def ulysses_attention(qkv: Tensor, members: int, num_heads: int, backend: str, ctx: GroupParallel) -> Tensor:
    """Members-sharded qkv -> heads-sharded full group sequence -> attention -> back to members-sharded."""
    p = ctx.degree
    b, l, three_c = qkv.shape
    g, s, c = b // members, members * l, three_c // 3
    hp, d = num_heads // p, c // num_heads
    # Head h = j*H/P + i lives in chunk j (dim 0), which goes to rank j.
    send = qkv.view(g, s, 3, p, hp, d).permute(3, 0, 1, 2, 4, 5)
    recv = _all_to_all(send, ctx)  # (P, G, s, 3, H/P, D); chunk j holds rank j's members
    seq = recv.permute(1, 0, 2, 3, 4, 5).reshape(g, p * s, 3 * hp * d)  # rank-major = the group's member order
    out = _attend(seq, hp, backend)  # (G, N*L, C/P)
    recv = _all_to_all(out.view(g, p, s, hp, d).transpose(0, 1), ctx)  # chunk j: heads of rank j, my members
    return recv.permute(1, 2, 0, 3, 4).reshape(b, l, c)


def allgather_attention(qkv: Tensor, members: int, num_heads: int, backend: str, ctx: GroupParallel) -> Tensor:
    """This rank's queries against the whole group's keys and values, all-gathered in rank (= member) order."""
    p = ctx.degree
    b, l, three_c = qkv.shape
    g, s, c = b // members, members * l, three_c // 3
    d = c // num_heads
    qkv = qkv.view(g, s, 3, num_heads, d)
    kv = _all_gather_autograd(qkv[:, :, 1:].contiguous(), 0, ctx.group)  # (P*G, s, 2, H, D)
    k, v = kv.view(p, g, s, 2, num_heads, d).transpose(0, 1).reshape(g, p * s, 2, num_heads, d).unbind(2)
    return attend(qkv[:, :, 0], k, v, backend).reshape(b, l, c)


def comm_bytes(impl: str, group_size: int, tokens: int, hidden: int, num_heads: int, degree: int,
               dtype: torch.dtype = torch.bfloat16, groups: int = 1) -> int:
    """Bytes one rank sends per group-attention layer, forward + backward, for ``groups`` groups of N images of
    L=``tokens`` tokens at width C=``hidden`` split over P=``degree`` ranks.

    Counted as what leaves the rank under pairwise / ring algorithms: an all-to-all sends all chunks but its
    own ((P-1)/P of its input), an all-gather sends its shard to P-1 peers, a reduce-scatter (P-1)/P of its input.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    members_per_rank(group_size, degree)
    check_heads(num_heads, degree, impl)
    if hidden % num_heads:
        raise ValueError(f"hidden={hidden} is not divisible by num_heads={num_heads}")
    share = groups * (group_size // degree) * tokens * hidden * torch.empty((), dtype=dtype).element_size()
    if impl == "ulysses":
        return 8 * share * (degree - 1) // degree
    return 4 * share * (degree - 1)
