"""Independent float64 SiT forward for the tests: written from the official equations with explicit loops
over groups, heads and queries for attention, reading weights from a state dict (official key names)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def official_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT get_2d_sincos_pos_embed, transcribed."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(embed_dim // 2, grid[0]), one(embed_dim // 2, grid[1])], axis=1)


def _lin(x: Tensor, sd: dict, name: str) -> Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ln(x: Tensor) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6)


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def loop_attention(tokens: Tensor, sd: dict, prefix: str, heads: int, group_size: int,
                   grouped: list[bool] | None = None) -> Tensor:
    """Attention with explicit per-group concatenation: for each group, concatenate its members' tokens, loop
    over heads and queries. ``grouped[g]`` False runs that group's members one by one."""
    b, l, c = tokens.shape
    d = c // heads
    qkv = _lin(tokens, sd, prefix + ".qkv")
    out = torch.zeros(b, l, c, dtype=tokens.dtype)
    for g in range(b // group_size):
        members = list(range(g * group_size, (g + 1) * group_size))
        sets = [members] if (grouped is None or grouped[g]) else [[m] for m in members]
        for mset in sets:
            seq = torch.cat([qkv[m] for m in mset], dim=0)  # (len(mset)*L, 3C)
            q, k, v = seq[:, :c], seq[:, c:2 * c], seq[:, 2 * c:]
            res = torch.zeros(seq.shape[0], c, dtype=tokens.dtype)
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                for i in range(seq.shape[0]):
                    s = (k[:, sl] @ q[i, sl]) / math.sqrt(d)
                    p = torch.exp(s - s.max())
                    p = p / p.sum()
                    res[i, sl] = p @ v[:, sl]
            for j, m in enumerate(mset):
                out[m] = res[j * l:(j + 1) * l]
    return _lin(out, sd, prefix + ".proj")


def reference_forward(sd: dict, cfg: dict, x: Tensor, t: Tensor, y: Tensor, group_size: int = 1,
                      slots: Tensor | None = None) -> Tensor:
    """float64 SiT forward. cfg: patch_size, in_channels, heads, depth, learn_sigma, group_layers, t_window, and
    embed ("tokens", the default: row i of sample_embed added to the patch tokens of member i of a grouped image;
    "cond": row slots[i] added to image i's conditioning vector, the released GroupDiff code's way). t is whatever the
    model is called with (flow time, or DDPM indices for a DiT). The first in_channels outputs are returned when
    learn_sigma, all of them (ε and the variance values of a DiT) with full_output."""
    sd = {k: v.double() for k, v in sd.items()}
    x, t = x.double(), t.double()
    p, cin, heads = cfg["patch_size"], cfg["in_channels"], cfg["heads"]
    b, _, hh, ww = x.shape
    gh, gw = hh // p, ww // p
    # patchify: token (r, s) holds x[:, :, r*p:(r+1)*p, s*p:(s+1)*p]; conv == linear over (C, p, p)
    w = sd["x_embedder.proj.weight"].reshape(sd["x_embedder.proj.weight"].shape[0], -1)
    tokens = torch.zeros(b, gh * gw, w.shape[0], dtype=torch.float64)
    for r in range(gh):
        for s in range(gw):
            patch = x[:, :, r * p:(r + 1) * p, s * p:(s + 1) * p].reshape(b, -1)
            tokens[:, r * gw + s] = patch @ w.T + sd["x_embedder.proj.bias"]
    tokens = tokens + sd["pos_embed"][0]
    half = 128
    # the official frequency embedding is fp32 whatever the model dtype; transcribed as such
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    temb = _lin(_silu(_lin(temb, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    embed = cfg.get("embed", "tokens")
    if embed == "cond":
        for i in range(b):
            c[i] = c[i] + sd["sample_embed"][int(slots[i])]
    grouped = None
    if group_size > 1 and cfg.get("t_window") is not None:
        lo, hi = cfg["t_window"]
        grouped = [bool(lo <= float(t[g * group_size]) <= hi) for g in range(b // group_size)]
    if group_size > 1 and "sample_embed" in sd and embed == "tokens":
        for i in range(b):
            if grouped is None or grouped[i // group_size]:
                tokens[i] = tokens[i] + sd["sample_embed"][i % group_size]
    first, last = cfg.get("group_layers") or (0, cfg["depth"])
    for i in range(cfg["depth"]):
        pre = f"blocks.{i}"
        mod = _lin(_silu(c), sd, pre + ".adaLN_modulation.1").chunk(6, dim=1)
        h = _ln(tokens) * (1 + mod[1][:, None]) + mod[0][:, None]
        n = group_size if first <= i < last else 1
        tokens = tokens + mod[2][:, None] * loop_attention(h, sd, pre + ".attn", heads, n,
                                                           grouped if n > 1 else None)
        h = _ln(tokens) * (1 + mod[4][:, None]) + mod[3][:, None]
        h = _lin(_gelu_tanh(_lin(h, sd, pre + ".mlp.fc1")), sd, pre + ".mlp.fc2")
        tokens = tokens + mod[5][:, None] * h
    shift, scale = _lin(_silu(c), sd, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = _lin(_ln(tokens) * (1 + scale[:, None]) + shift[:, None], sd, "final_layer.linear")
    cout = out.shape[-1] // (p * p)
    img = torch.zeros(b, cout, hh, ww, dtype=torch.float64)
    for r in range(gh):
        for s in range(gw):
            img[:, :, r * p:(r + 1) * p, s * p:(s + 1) * p] = out[:, r * gw + s].reshape(b, p, p, cout).permute(0, 3, 1, 2)
    return img[:, :cin] if cfg.get("learn_sigma") and not cfg.get("full_output") else img
