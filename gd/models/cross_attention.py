"""S_cross, the cross-sample attention score (GroupDiff, Table 1): how strongly attention singles out one
neighbour of the group.

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

from typing import Iterable

import torch
from torch import Tensor

from gd.models.attention import group_view
from gd.models.sit import SiT


def _layer_score(attn: torch.nn.Module, x: Tensor, group_size: int, group_mask: Tensor | None,
                 chunk: int = 1024) -> float:
    b, l, c = x.shape
    heads = attn.num_heads
    n = group_size
    g = b // n
    qkv = attn.qkv(group_view(x, n)).float().view(g, n * l, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0] * (c // heads) ** -0.5, qkv[1]  # (G, H, N*L, D)
    owner = torch.arange(n, device=x.device).repeat_interleave(l)  # member of each token
    per_group = torch.zeros(g, device=x.device)
    for start in range(0, n * l, chunk):
        probs = (q[:, :, start:start + chunk] @ k.transpose(-2, -1)).softmax(-1)  # (G, H, q, N*L)
        mass = probs.view(*probs.shape[:-1], n, l).sum(-1)  # (G, H, q, N): mass per member
        own = owner[start:start + chunk]
        others = torch.ones(mass.shape[-2], n, dtype=torch.bool, device=x.device)
        others[torch.arange(len(own)), own] = False
        hi = mass.masked_fill(~others, float("-inf")).amax(-1)
        lo = mass.masked_fill(~others, float("inf")).amin(-1)
        per_group += (hi - lo).sum(dim=(1, 2))
    per_group = per_group / (heads * n * l)
    if group_mask is not None:
        per_group = per_group * group_mask.float()
    return per_group.mean().item()


@torch.no_grad()
def cross_attention_score(model: SiT, x: Tensor, t: Tensor, y: Tensor, group_size: int,
                          layers: Iterable[int] | None = None, slots: Tensor | None = None) -> dict[int, float]:
    """S_cross per block index for one forward pass of ``model(x, t, y, group_size, slots)`` (see module docstring).

    ``layers`` defaults to every block in ``model.group_layers``. Runs in eval mode (restored afterwards).
    """
    chosen = list(range(*model.group_layers)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < model.depth]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has blocks 0..{model.depth - 1}")
    if group_size < 2 or model.depth == 0:
        return {i: 0.0 for i in chosen}
    scores: dict[int, float] = {}

    # Scored inside the pre-forward hook, so no layer's activations are kept beyond its own call.
    def make_hook(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            n = args[1] if len(args) > 1 else 1
            mask = args[2] if len(args) > 2 else None
            scores[index] = 0.0 if n < 3 else _layer_score(module, args[0], n, mask)
        return hook

    handles = [model.blocks[i].attn.register_forward_pre_hook(make_hook(i)) for i in chosen]
    was_training = model.training
    model.eval()
    try:
        model(x, t, y, group_size=group_size, slots=slots)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {i: scores[i] for i in chosen}
