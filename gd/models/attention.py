"""Group attention: multi-head self-attention over the tokens of a whole group of images.

Tokens arrive per image as (G*N, L, C), group-major (the N members of group 0 first). Before the attention
product they are viewed as (G, N*L, C), so every patch attends to every patch of its group, and viewed back
after it. The view is free (the batch is contiguous and group-major), and the qkv/proj projections are the
plain per-token Linears, so parameter names and shapes are exactly those of the official SiT/timm Attention.

Backends (``attn_backend``):
  * ``sdpa``     -- ``F.scaled_dot_product_attention``. On CUDA the cuDNN kernel is put first in the priority
                    list: on an H200 it ran group-16 attention fwd+bwd in 1.71 ms against 2.84 ms for flash and
                    6.7 ms for memory-efficient, while PyTorch's own order puts cuDNN last. Kernels that cannot
                    take the inputs are skipped by PyTorch, so the order only changes speed, never results.
  * ``xformers`` -- ``xformers.ops.memory_efficient_attention``; CUDA only. Checked at build time.
  * ``math``     -- softmax(QK^T/sqrt(d))V written out, softmax in fp32. The reference, and what S_cross uses.

Under group parallelism (group_parallel.py) a rank holds N/P members of each group and the group's attention is
computed with the other P-1 ranks; every backend above runs the local part.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from gd.models.group_parallel import GroupParallel

BACKENDS = ("sdpa", "xformers", "math")

_CUDA_SDPA_PRIORITY = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class BackendUnavailableError(RuntimeError):
    """The configured attention backend cannot run in this environment."""


def check_backend(backend: str) -> None:
    """Fail early with a readable message if ``backend`` is unknown or cannot run here.

    For ``xformers`` this imports it and runs one tiny ``memory_efficient_attention`` on CUDA: PyPI's
    xformers wheels are built for one torch/CUDA pair and under another one import fine but have no kernels.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend={backend!r}: expected one of {BACKENDS}")
    if backend != "xformers":
        return
    fix = (
        "install an xformers wheel built for this torch (" + torch.__version__ + ", e.g. "
        "`pip install xformers` matching its CUDA build) or set attn_backend=sdpa"
    )
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "attn_backend='xformers' needs a CUDA device (xformers has no CPU kernels); use attn_backend=sdpa "
            "or math here"
        )
    try:
        import xformers.ops as xops
    except Exception as err:  # ImportError or a broken build raising at import
        raise BackendUnavailableError(f"attn_backend='xformers': cannot import xformers.ops ({err}); {fix}") from err
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as err:
        raise BackendUnavailableError(
            f"attn_backend='xformers': xformers imports but its CUDA kernels do not run ({err}); {fix}"
        ) from err


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference attention on (B, H, L, D) tensors; scores and softmax in at least fp32, output in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.to(acc) * scale, k.to(acc).transpose(-2, -1))
    return torch.matmul(scores.softmax(dim=-1), v.to(acc)).to(q.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Attention of q (B, Lq, H, D) over k, v (B, Lk, H, D) -> (B, Lq, H*D); Lq may differ from Lk."""
    b, lq, h, d = q.shape
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v).reshape(b, lq, h * d)  # (B, L, H, D) is its layout
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    if backend == "math":
        out = math_attention(q, k, v)
    elif q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, h * d)


def _attend(qkv: Tensor, num_heads: int, backend: str) -> Tensor:
    """Self-attention of packed qkv (B, L, 3C) -> (B, L, C)."""
    b, n, three_c = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, three_c // 3 // num_heads).unbind(2)
    return attend(q, k, v, backend)


def group_view(x: Tensor, group_size: int) -> Tensor:
    """(G*N, L, C) -> (G, N*L, C): the tokens of each group's N members as one sequence (a view)."""
    b, n, c = x.shape
    return x.reshape(b // group_size, group_size * n, c)


class GroupAttention(nn.Module):
    """Multi-head self-attention whose sequence is the whole group (official key names: qkv, proj).

    ``group_parallel`` (set by ``SiT.set_group_parallel``): None runs the group on this process; a
    :class:`gd.models.group_parallel.GroupParallel` means this rank holds N/P members of every group and the
    group's attention is computed together with the other P-1 ranks of its group-parallel process group.
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        check_backend(backend)
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.group_parallel: GroupParallel | None = None

    def forward(self, x: Tensor, group_size: int = 1, group_mask: Tensor | None = None) -> Tensor:
        """x: (G*N, L, C) group-major. ``group_size`` N is a Python int (N=1: per-image attention).

        Under group parallelism x is this rank's (G*N/P, L, C) and ``group_size`` stays the global N.
        ``group_mask`` (G,) bool, optional: groups marked False attend per image. Both products are computed
        and selected with ``torch.where`` (per-image attention costs 1/N of group attention), which keeps the
        layer free of data-dependent Python branches.
        """
        b, n, c = x.shape
        qkv = self.qkv(x)
        gp = self.group_parallel
        if group_size == 1:
            out = _attend(qkv, self.num_heads, self.backend)
        else:
            if gp is None:
                members = group_size
                out = _attend(group_view(qkv, group_size), self.num_heads, self.backend).reshape(b, n, c)
            else:
                members = gp.members(group_size)
                out = gp.attend(qkv, members, self.num_heads, self.backend)
            if group_mask is not None:
                per_image = _attend(qkv, self.num_heads, self.backend)
                keep = group_mask.repeat_interleave(members).view(b, 1, 1)
                out = torch.where(keep, out, per_image)
        return self.proj(out)
