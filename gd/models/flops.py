"""Analytic forward FLOPs of a SiT (multiply-add = 2 FLOPs).

Counted: every matmul/conv (patch embedding, timestep MLP, adaLN, qkv, proj, MLP, output layer) and the two
attention products QK^T and PV, whose key length is N*L in group layers (N = group size) and L elsewhere.
Not counted: softmax, norms, modulation, activations, embeddings lookups (a few % of the total). A training
step (forward + backward) is ~3x the forward. The timestep window is not modelled: the count assumes every
group is inside it (the cost of a group step at its most expensive).
"""
from __future__ import annotations

from gd.models.sit import SiT


def forward_flops(model: SiT, group_size: int = 1) -> float:
    """Forward FLOPs per image of ``model`` called with ``group_size``."""
    if group_size < 1 or group_size > model.max_group_size:
        raise ValueError(f"group_size={group_size}: expected 1..{model.max_group_size}")
    d, p = model.hidden_size, model.patch_size
    tokens = model.num_patches
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    freq = model.t_embedder.frequency_embedding_size
    flops = 2.0 * tokens * model.in_channels * p * p * d  # patch embedding
    flops += 2.0 * (freq * d + d * d)  # timestep MLP
    for i in range(model.depth):
        keys = tokens * group_size if model.is_group_layer(i) else tokens
        flops += 2.0 * d * 6 * d  # adaLN modulation (once per image)
        flops += 2.0 * tokens * d * 3 * d  # qkv
        flops += 2.0 * 2 * tokens * keys * d  # QK^T and PV over all heads
        flops += 2.0 * tokens * d * d  # proj
        flops += 2.0 * 2 * tokens * d * mlp_hidden  # fc1, fc2
    flops += 2.0 * d * 2 * d  # final adaLN
    flops += 2.0 * tokens * d * p * p * model.out_channels  # final linear
    return flops
