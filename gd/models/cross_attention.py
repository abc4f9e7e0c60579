"""S_cross, the cross-sample attention score (GroupDiff, Table 1): how strongly attention singles out one
neighbour of the group; and beside it (:class:`GroupAttentionStats`) member selectivity, the share of a query's
attention on its own member's tokens (1/N when attention is uniform over the group; docs/probes.md).

Definition. In a group of N members, for a query token of member i, head h, let a_j be the attention mass its
softmax puts on all tokens of member j (j != i). Then

    s(query, h) = max_j a_j - min_j a_j,        S_cross(layer) = mean over groups, members, queries, heads.

It is 0 when the group has a single neighbour (N = 2, matching the paper's 0.00% at group size 2) or none
(N = 1), 0 when the attention spreads evenly over the neighbours (no preferred partner), and approaches the
whole cross-sample mass when one neighbour takes all of it. The plain "mass on the most-attended neighbour"
would be large for N = 2 and grow with the cross-sample mass alone; subtracting the least-attended neighbour's
mass measures focus on the most similar neighbour, which is what the paper correlates with FID. Values are
fractions in [0, 1] (the paper prints percentages).

Computed during one forward pass: at each chosen layer the attention probabilities are recomputed from the
layer's input explicitly (fp32, in query chunks, the math path), with the group pattern the model actually
uses: a layer outside ``group_layers``, or a group outside ``group_t_window``, scores 0. The qkv projection is
called as a module, so on a ZeRO-3-partitioned model its hooks gather the weights (an unpartitioned copy such
as the EMA model avoids the extra gather).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from gd.models.attention import group_view
from gd.models.sit import SiT


def _layer_stats(attn: torch.nn.Module, x: Tensor, group_size: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per group (G,): S_cross (0 below three members) and the own-member share (the mass a query's softmax puts on
    its own member's tokens), each the mean over the group's queries and heads."""
    b, l, c = x.shape
    heads = attn.num_heads
    n = group_size
    g = b // n
    qkv = attn.qkv(group_view(x, n)).float().view(g, n * l, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0] * (c // heads) ** -0.5, qkv[1]  # (G, H, N*L, D)
    owner = torch.arange(n, device=x.device).repeat_interleave(l)  # member of each token
    spread = torch.zeros(g, device=x.device)
    own_total = torch.zeros(g, device=x.device)
    for start in range(0, n * l, chunk):
        probs = (q[:, :, start:start + chunk] @ k.transpose(-2, -1)).softmax(-1)  # (G, H, q, N*L)
        mass = probs.view(*probs.shape[:-1], n, l).sum(-1)  # (G, H, q, N): mass per member
        own = owner[start:start + chunk]
        mine = torch.zeros(mass.shape[-2], n, dtype=torch.bool, device=x.device)
        mine[torch.arange(len(own)), own] = True
        own_total += mass.masked_fill(~mine, 0.0).sum(dim=(1, 2, 3))
        if n >= 3:
            hi = mass.masked_fill(mine, float("-inf")).amax(-1)
            lo = mass.masked_fill(mine, float("inf")).amin(-1)
            spread += (hi - lo).sum(dim=(1, 2))
    count = heads * n * l
    return spread / count, own_total / count


class GroupAttentionStats:
    """Per-layer attention statistics of the group attention, accumulated over every forward pass of ``model``
    made inside the ``with`` block (pre-forward hooks on the chosen blocks' attention; nothing is kept beyond
    each layer's call).

    * :meth:`s_cross`: S_cross (module docstring), the mean over every group of every pass; a group attending
      per image (outside ``group_t_window``, or a pass at group size 1) scores 0.
    * :meth:`own_share`: the attention share a query gives its own member's tokens ("member selectivity"), the
      mean over queries, heads and the groups that attend across members; uniform attention gives exactly 1/N,
      a model that learned which tokens are its member's gives more. None for a layer no group attended in.

    ``layers`` defaults to every block in ``model.group_layers``.
    """

    def __init__(self, model: SiT, layers: Iterable[int] | None = None) -> None:
        chosen = list(range(*model.group_layers)) if layers is None else sorted(set(int(i) for i in layers))
        bad = [i for i in chosen if not 0 <= i < model.depth]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has blocks 0..{model.depth - 1}")
        self.model = model
        self.layers = chosen
        self._sums = {i: [0.0, 0, 0.0, 0] for i in chosen}  # S_cross sum, groups; own-share sum, groups
        self._handles: list[Any] = []

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            n = args[1] if len(args) > 1 else 1
            mask = args[2] if len(args) > 2 else None
            acc = self._sums[index]
            if n < 2:
                acc[1] += x.shape[0]  # per-image attention: S_cross 0 for every image's "group"
                return
            spread, own = _layer_stats(module, x, n)
            keep = torch.ones_like(own, dtype=torch.bool) if mask is None else mask.bool()
            acc[0] += (spread * keep.float()).sum().item()
            acc[1] += own.shape[0]
            acc[2] += own[keep].sum().item()
            acc[3] += int(keep.sum().item())
        return hook

    def __enter__(self) -> GroupAttentionStats:
        self._handles = [self.model.blocks[i].attn.register_forward_pre_hook(self._hook(i)) for i in self.layers]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def s_cross(self) -> dict[int, float]:
        return {i: (a[0] / a[1] if a[1] else 0.0) for i, a in self._sums.items()}

    def own_share(self) -> dict[int, float | None]:
        return {i: (a[2] / a[3] if a[3] else None) for i, a in self._sums.items()}


@torch.no_grad()
def cross_attention_score(model: SiT, x: Tensor, t: Tensor, y: Tensor, group_size: int,
                          layers: Iterable[int] | None = None, slots: Tensor | None = None) -> dict[int, float]:
    """S_cross per block index for one forward pass of ``model(x, t, y, group_size, slots)`` (see module docstring).

    ``layers`` defaults to every block in ``model.group_layers``. Runs in eval mode (restored afterwards).
    """
    stats = GroupAttentionStats(model, layers)
    if group_size < 2 or model.depth == 0:
        return {i: 0.0 for i in stats.layers}
    was_training = model.training
    model.eval()
    try:
        with stats:
            model(x, t, y, group_size=group_size, slots=slots)
    finally:
        model.train(was_training)
    return stats.s_cross()
