"""Image <-> latent encoders used by the shard builder and by sampling/evaluation.

"pixels" keeps small images in pixel space ([-1, 1], 1 or 3 channels) for tiny setups and tests; "sdvae" is the
Stable Diffusion VAE (diffusers AutoencoderKL, ft-EMA or ft-MSE) loaded without any download. Latents are stored
already multiplied by `scale`, so the model trains on them as they come out of the loader.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gd.distributed.env import local_device

SD_VAE_SCALE = 0.18215


class Encoder(Protocol):
    name: str
    scale: float

    def latent_shape(self, image_size: int) -> tuple[int, int, int]: ...

    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def to_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 BxHxWxC (C in {1, 3}) -> float32 Bx3xHxW in [-1, 1]; a float tensor Bx3xHxW in [-1, 1] passes."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be BxHxWx(1|3), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"float images must be Bx3xHxW in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    return x.float()


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """float Bx(1|3)xHxW in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous()


class PixelEncoder:
    """Identity "latent" in pixel space, values in [-1, 1]; channels=1 stores ITU-R 601 luma."""

    name = "pixels"

    def __init__(self, channels: int = 3, scale: float = 1.0) -> None:
        if channels not in (1, 3):
            raise ValueError(f"pixels encoder channels={channels}: expected 1 or 3")
        self.channels = channels
        self.scale = float(scale)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (self.channels, image_size, image_size)

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = to_float_images(images)
        if self.channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        return x * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return to_uint8_images(latents.float() / self.scale)


def _resolve_vae_dir(path: str, subfolder: str | None) -> tuple[str, str | None]:
    """A local directory, or an HF repo id resolved from the local HF cache only; raise naming what is missing."""
    p = Path(path).expanduser()
    if p.exists():
        cfg = p / (subfolder or "") / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"SD-VAE directory {p} has no {cfg.relative_to(p)}: put a diffusers AutoencoderKL "
                                    "there (config.json + diffusion_pytorch_model.safetensors, e.g. the files of "
                                    "stabilityai/sd-vae-ft-ema)")
        return str(p), subfolder
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"SD-VAE checkpoint {path} does not exist: put a diffusers AutoencoderKL directory "
                                "there (config.json + diffusion_pytorch_model.safetensors of "
                                "stabilityai/sd-vae-ft-ema or sd-vae-ft-mse), or give a repo id already in the HF cache")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(path, local_files_only=True)
    except Exception as exc:
        hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise FileNotFoundError(f"SD-VAE {path!r} is not in the local HF cache ({hub}) and downloads are disabled: "
                                f"run `huggingface-cli download {path}` on a machine with internet and copy the cache, "
                                "or pass encoders.sdvae.path=<local diffusers AutoencoderKL dir>") from exc
    return local, subfolder


class SDVAEEncoder:
    """diffusers AutoencoderKL; encode returns the scaled posterior mean (deterministic, so builds are repeatable)."""

    name = "sdvae"

    def __init__(self, path: str = "stabilityai/sd-vae-ft-ema", scale: float = SD_VAE_SCALE,
                 subfolder: str | None = None, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 32) -> None:
        local, subfolder = _resolve_vae_dir(str(path), subfolder)
        from diffusers import AutoencoderKL
        self.vae = AutoencoderKL.from_pretrained(local, subfolder=subfolder, local_files_only=True)
        self.device = local_device(device)
        self.dtype = getattr(torch, dtype)
        self.vae.to(self.device, self.dtype).eval()
        self.scale = float(scale)
        self.batch_size = int(batch_size)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.channels = int(self.vae.config.latent_channels)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE downsampling {self.downsample}")
        return (self.channels, image_size // self.downsample, image_size // self.downsample)

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = to_float_images(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i:i + self.batch_size].to(self.device, self.dtype)
            out.append(self.vae.encode(xb).latent_dist.mean.float().cpu() * self.scale)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(latents), self.batch_size):
            z = latents[i:i + self.batch_size].to(self.device, self.dtype) / self.scale
            out.append(to_uint8_images(self.vae.decode(z).sample.float().cpu()))
        return torch.cat(out)


def build_encoder(name: str, **kw) -> Encoder:
    """`name`: "pixels" (kw: channels, scale) or "sdvae" (kw: path, scale, subfolder, device, dtype, batch_size)."""
    if name == "pixels":
        return PixelEncoder(**kw)
    if name == "sdvae":
        return SDVAEEncoder(**kw)
    raise ValueError(f"unknown encoder {name!r}: expected 'pixels' or 'sdvae'")
