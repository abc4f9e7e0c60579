"""SiT: the flow-matching DiT (adaLN-Zero) of Ma et al. 2024, with GroupDiff group attention.

Parameter names and shapes are those of the official willisma/SiT (and facebookresearch/DiT) code, so their
checkpoints load 1:1. Two additions:

* group attention (see attention.py), on when ``forward(..., group_size=N)`` has N > 1, limited by
  ``group_layers`` ([first, last) block indices) and ``group_t_window`` ([t_lo, t_hi] in the units of the t the
  model is called with: flow time in [0, 1] (t = 0 noise), or DDPM indices 0..999 (999 noise) for a DiT/DDPM
  model; gd.diffusion.objectives checks it against the run's objective);
* ``sample_embed`` (max_group_size, hidden): a learnable embedding of each image's slot in its group, in one of
  two places (``sample_embed=``):
  - "cond" (the released GroupDiff code): added to the conditioning vector, c = t_emb + y_emb + s_emb[slot], so it
    acts through every block's adaLN modulation; initialised N(0, 0.02); every forward gives each group a random
    permutation of the max_group_size slots (its first N), also at N = 1 (one random slot per image) and at
    sampling. Pass ``slots`` to make the draw reproducible (the trainer and gd.sample draw them from seeded
    generators, see :meth:`SiT.draw_slots`); without it they come from torch's global generator.
  - "tokens" (the paper's wording, this repo before the released recipe): added to the patch tokens of grouped
    images only, member i of a group taking row i; zero-initialised, so a loaded official model is unchanged.
  - "none": no sample embedding (official SiT).

Timestep window: whether a group attends across its members is decided per group from its anchor (member 0)
timestep, t_lo <= t_anchor <= t_hi (the paper varies the other members' t around the anchor's). A group
outside the window runs exactly like N separate images: no group attention, no sample embedding. In eager
mode the forward reads one (any, all) flag pair from the device to skip the unused branch when every group is
on the same side (always so in sampling, where t is shared); under torch.compile it never syncs and computes
both attentions, choosing per group with ``torch.where`` (per-image attention costs 1/N of the group's).

Group parallelism (``set_group_parallel``, see group_parallel.py): P ranks share each group, rank r holding
members r*N/P .. (r+1)*N/P - 1 of every group; ``forward`` then takes this rank's (G*N/P, ...) inputs with the
global ``group_size`` N, the sample embedding indexes each member's global slot, and the anchor timestep comes
from rank 0 of the group-parallel group. ``group_size=1`` calls need no communication and run locally.

The model never drops labels: class dropout for CFG training is done by gd.diffusion with a seeded generator;
``class_dropout_prob > 0`` only adds the null-class row (id = num_classes) to the label table.
"""
from __future__ import annotations

import inspect
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gd.models.attention import GroupAttention
from gd.models.group_parallel import GroupParallel

SIZES: dict[str, dict[str, int]] = {
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}
PATCH_SIZES = (2, 4, 8)
_NAME = re.compile(r"^SiT-(S|B|L|XL)/(\d+)$")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (grid_size**2, embed_dim), bit-compatible with MAE/DiT/SiT: the first
    half of the channels encodes a token's column, the second half its row; each half is [sin, cos]."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # np.meshgrid(w, h): w varies along columns

    def one_dim(dim: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_dim(embed_dim // 2, grid_w), one_dim(embed_dim // 2, grid_h)], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """Image to patch tokens (timm PatchEmbed key names: ``proj``)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of t followed by an MLP (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # The frequencies are fp32; with bf16 weights (DeepSpeed bf16) the Linear needs its own dtype.
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra null row (id = num_classes) when CFG dropout is used in training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class Mlp(nn.Module):
    """timm Mlp with tanh-GELU (keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block; attention spans the group when called with group_size > 1."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attn_backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = GroupAttention(hidden_size, num_heads, backend=attn_backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, group_size: int = 1, group_mask: Tensor | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), group_size, group_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """SiT velocity model ``model(x, t, y, group_size=1) -> v`` with group attention (see module docstring)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        max_group_size: int = 16,
        sample_embed: str | bool = "cond",
        attn_backend: str = "sdpa",
        group_layers: tuple[int, int] | list[int] | None = None,
        group_t_window: tuple[float, float] | list[float] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        sample_embed = _embed_mode(sample_embed)
        _validate(input_size, patch_size, hidden_size, depth, num_heads, class_dropout_prob, num_classes,
                  max_group_size, group_layers, group_t_window)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.max_group_size = max_group_size
        self.attn_backend = attn_backend
        self.group_layers = (0, depth) if group_layers is None else (int(group_layers[0]), int(group_layers[1]))
        self.group_t_window = None if group_t_window is None else (float(group_t_window[0]), float(group_t_window[1]))
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.num_patches = grid * grid
        # Fixed, not trained: a buffer (in the state dict under the official name, outside parameters()).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0))
        self.embed_mode = sample_embed
        self.sample_embed = nn.Parameter(torch.zeros(max_group_size, hidden_size)) if sample_embed != "none" else None
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.config: dict[str, Any] = {}
        self.group_parallel: GroupParallel | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official SiT init: xavier Linears, zeroed adaLN and output layers (adaLN-Zero), zero sample embed."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        if self.embed_mode == "cond":
            nn.init.normal_(self.sample_embed, std=0.02)
        elif self.sample_embed is not None:
            nn.init.zeros_(self.sample_embed)

    def set_group_parallel(self, ctx: GroupParallel | None) -> None:
        """Share every group's members with the other ranks of ``ctx`` (None or P=1: the whole group here).

        With P=1 nothing changes: the same code path as without a context, no collectives.
        """
        if ctx is not None and ctx.degree == 1:
            ctx = None
        if ctx is not None:
            ctx.check_heads(self.num_heads)
        self.group_parallel = ctx
        for block in self.blocks:
            block.attn.group_parallel = ctx

    def members(self, group_size: int) -> int:
        """Members of each group in this process's batch: N, or N/P under group parallelism (N > 1)."""
        if group_size == 1 or self.group_parallel is None:
            return group_size
        return self.group_parallel.members(group_size)

    def is_group_layer(self, index: int) -> bool:
        return self.group_layers[0] <= index < self.group_layers[1]

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the official layout."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def group_plan(self, t: Tensor, group_size: int) -> tuple[int, Tensor | None]:
        """(effective group size, per-group mask or None) for this call; see the module docstring."""
        if group_size == 1 or self.group_t_window is None:
            return group_size, None
        lo, hi = self.group_t_window
        anchor = t.view(-1, self.members(group_size))[:, 0]
        if self.group_parallel is not None:
            anchor = self.group_parallel.from_first_rank(anchor)  # member 0 lives on group-parallel rank 0
        mask = (anchor >= lo) & (anchor <= hi)
        if torch.compiler.is_compiling():
            return group_size, mask
        any_in, all_in = torch.stack([mask.any(), mask.all()]).tolist()
        if all_in:
            return group_size, None
        return (group_size, mask) if any_in else (1, None)

    def draw_slots(self, batch: int, group_size: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, *, whole: bool = False) -> Tensor:
        """Random sample-embedding slots (batch,) long: per group of ``group_size``, the first N entries of a random
        permutation of range(max_group_size) (the released code's draw), from ``generator`` when given. Under group
        parallelism ``batch`` is this rank's share and the slots are its members' of each group's permutation: the
        group's ranks must then draw from identically seeded generators. ``whole=True``: ``batch`` is every member
        of every group (a replica's or a sampling chunk's whole batch) and nothing is sliced; the caller takes its
        rows (gd.diffusion.plan.Shard)."""
        m = group_size if whole else self.members(group_size)
        groups = batch // m
        if generator is None:  # (no generator argument at all: that overload also takes symbolic shapes)
            keys = torch.rand(groups, self.max_group_size, device=device)
        else:
            keys = torch.rand(groups, self.max_group_size, generator=generator, device=generator.device)
        slots = keys.argsort(dim=1)[:, :group_size]
        if m != group_size:  # group parallel: this rank's members of each group's permutation
            first = self.group_parallel.first_member(group_size)
            slots = slots[:, first:first + m]
        return slots.reshape(-1).to(device if device is not None else keys.device)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, group_size: int = 1, slots: Tensor | None = None, *,
                full_output: bool = False) -> Tensor:
        """Velocity for x (G*N, C, H, W) group-major at times t (G*N,) in [0, 1] (t=0 noise) with labels y.

        ``slots`` (G*N,) long: the sample-embedding slots in "cond" mode (random when None, see the module
        docstring; ignored in the other modes). Returns x's shape and dtype (the first C output channels when
        learn_sigma, as the official SiT does). ``full_output=True`` returns all ``out_channels`` (2C when
        learn_sigma): what a DiT/DDPM model needs, its last C channels being the learned variance (then t is a DDPM
        timestep index, see gd.diffusion.ddpm).
        """
        self._check_inputs(x, t, y, group_size)
        b = x.shape[0]
        if t.dim() == 0:
            t = t.expand(b)
        dtype = self.x_embedder.proj.weight.dtype
        h = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        if self.embed_mode == "cond":
            if slots is None:
                if self.members(group_size) != group_size:
                    raise ValueError("group parallel with sample_embed='cond': pass slots drawn (draw_slots) from a "
                                     "generator seeded alike on the group's ranks, so they share each permutation")
                slots = self.draw_slots(b, group_size, device=x.device)
            elif slots.shape != (b,):
                raise ValueError(f"slots has shape {tuple(slots.shape)}; expected ({b},)")
            c = c + self.sample_embed[slots].to(c.dtype)
        n, mask = self.group_plan(t, group_size)
        if n > 1 and self.embed_mode == "tokens":
            m = self.members(n)
            first = 0 if self.group_parallel is None else self.group_parallel.first_member(n)
            slot = self.sample_embed[first:first + m].to(h.dtype).repeat(b // m, 1)  # member i -> its global slot
            if mask is not None:
                slot = slot * mask.repeat_interleave(m).unsqueeze(1).to(h.dtype)
            h = h + slot.unsqueeze(1)
        for i, block in enumerate(self.blocks):
            bn, bmask = (n, mask) if self.is_group_layer(i) else (1, None)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, bn, bmask, use_reentrant=False)
            else:
                h = block(h, c, bn, bmask)
        out = self.unpatchify(self.final_layer(h, c))
        if self.learn_sigma and not full_output:
            out = out[:, : self.in_channels]
        return out.to(x.dtype)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor, group_size: int) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (B, {expected[0]}, {expected[1]}, {expected[2]})")
        b = x.shape[0]
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size={group_size!r}: expected a positive int")
        if group_size > self.max_group_size:
            raise ValueError(f"group_size={group_size} exceeds max_group_size={self.max_group_size}")
        members = self.members(group_size)
        if b % members:
            split = "" if members == group_size else f" / group_parallel P={self.group_parallel.degree} = {members}"
            raise ValueError(f"batch {b} is not a multiple of group_size={group_size}{split} (batches are G*N, "
                             f"group-major)")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != b):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected ({b},) or a scalar")
        if y.shape != (b,):
            raise ValueError(f"y has shape {tuple(y.shape)}; expected ({b},)")


EMBED_MODES = ("cond", "tokens", "none")


def _embed_mode(value: str | bool) -> str:
    """``sample_embed`` as a mode; the booleans of configs and exports written before the modes mean "tokens"/"none"."""
    if isinstance(value, bool):
        return "tokens" if value else "none"
    if value not in EMBED_MODES:
        raise ValueError(f"sample_embed={value!r}: expected one of {EMBED_MODES}")
    return value


def _validate(input_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int,
              class_dropout_prob: float, num_classes: int, max_group_size: int,
              group_layers: Any, group_t_window: Any) -> None:
    if input_size % patch_size:
        raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
    if hidden_size % num_heads or hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size}: expected a multiple of num_heads={num_heads} and of 4")
    if depth < 1 or num_classes < 1 or max_group_size < 1:
        raise ValueError(f"depth={depth}, num_classes={num_classes}, max_group_size={max_group_size}: expected >= 1")
    if not 0.0 <= class_dropout_prob < 1.0:
        raise ValueError(f"class_dropout_prob={class_dropout_prob}: expected in [0, 1)")
    if group_layers is not None:
        if len(group_layers) != 2 or not 0 <= group_layers[0] <= group_layers[1] <= depth:
            raise ValueError(f"group_layers={list(group_layers)}: expected [first, last) with 0 <= first <= last <= depth={depth}")
    if group_t_window is not None:  # its upper bound depends on the time the model is called with (the objective's)
        if len(group_t_window) != 2 or not 0.0 <= group_t_window[0] <= group_t_window[1]:
            raise ValueError(f"group_t_window={list(group_t_window)}: expected [t_lo, t_hi] with 0 <= t_lo <= t_hi "
                             "(flow time in [0, 1], or DDPM timestep indices)")


# The options build_model takes: SiT's own arguments and their defaults (the official SiT-XL/2 ImageNet-256 setup),
# read from its signature so they are defined once; the patch size comes from the model name.
_DEFAULTS: dict[str, Any] = {name: p.default for name, p in inspect.signature(SiT.__init__).parameters.items()
                             if name not in ("self", "patch_size")}
BUILD_KEYS = tuple(_DEFAULTS)
SIZE_KEYS = ("hidden_size", "depth", "num_heads", "mlp_ratio")


def size_defaults(name: str) -> dict[str, int]:
    """hidden_size, depth and num_heads that model ``name`` ('SiT-XL/2') has unless overridden."""
    match = _NAME.match(name)
    if not match or int(match.group(2)) not in PATCH_SIZES:
        raise ValueError(f"model name {name!r}: expected 'SiT-<S|B|L|XL>/<2|4|8>', e.g. 'SiT-XL/2'")
    return dict(SIZES[match.group(1)])


def build_model(name: str, **overrides: Any) -> SiT:
    """Build ``SiT-{S,B,L,XL}/{2,4,8}`` with the official shapes; ``overrides`` are SiT keyword arguments.

    Defaults follow the official SiT-XL/2 ImageNet-256 setup (32x32x4 latents, 1000 classes, class dropout 0.1,
    learn_sigma). ``model.config`` records the name and every resolved argument, which is what exported files
    embed so ``gd.models.load_model`` can rebuild the model.
    """
    match = _NAME.match(name)
    if not match or int(match.group(2)) not in PATCH_SIZES:
        raise ValueError(f"model name {name!r}: expected 'SiT-<S|B|L|XL>/<2|4|8>', e.g. 'SiT-XL/2'")
    unknown = sorted(set(overrides) - set(BUILD_KEYS))
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown option(s) {unknown}; expected some of {list(BUILD_KEYS)}")
    kwargs: dict[str, Any] = {**_DEFAULTS, **SIZES[match.group(1)]}
    # A null size option (conf/model/sit.yaml declares them null) is the size's own value.
    kwargs.update({k: _plain(v) for k, v in overrides.items() if v is not None or k not in SIZE_KEYS})
    model = SiT(patch_size=int(match.group(2)), **kwargs)
    model.config = {"name": name, **kwargs}
    return model


def _plain(value: Any) -> Any:
    """OmegaConf ListConfig / tuples -> list, so configs stay JSON- and weights_only-serialisable."""
    if value is not None and not isinstance(value, (str, bytes, int, float, bool)) and hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return value
