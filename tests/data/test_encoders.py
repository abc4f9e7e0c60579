"""Encoders: exact pixel round trip, SD-VAE path on a tiny random AutoencoderKL, fail-fast on a missing VAE."""
import numpy as np
import pytest
import torch

from gd.data.encoders import SD_VAE_SCALE, build_encoder


def test_pixels_roundtrip_through_fp16_is_exact():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    enc = build_encoder("pixels", channels=3)
    z = enc.encode(imgs)
    assert z.shape == (5, 3, 8, 8) and z.min() >= -1 and z.max() <= 1
    np.testing.assert_array_equal(enc.decode(z.half().float()).numpy(), imgs)
    gray = np.repeat(imgs[..., :1], 3, axis=3)
    enc1 = build_encoder("pixels", channels=1)
    assert enc1.encode(gray).shape == (5, 1, 8, 8)
    np.testing.assert_array_equal(enc1.decode(enc1.encode(gray).half().float()).numpy(), gray)


def test_bad_encoder_arguments():
    with pytest.raises(ValueError, match="channels=2"):
        build_encoder("pixels", channels=2)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vqgan")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_sdvae_encode_decode_on_tiny_random_vae(tiny_vae_dir):
    from diffusers import AutoencoderKL
    enc = build_encoder("sdvae", path=str(tiny_vae_dir))
    assert enc.scale == SD_VAE_SCALE and enc.latent_shape(16) == (4, 8, 8)
    imgs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    z = enc.encode(imgs)
    assert z.shape == (3, 4, 8, 8)
    ref_vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).double() / 127.5 - 1
    with torch.no_grad():
        ref = ref_vae.double().encode(x).latent_dist.mean * SD_VAE_SCALE
        torch.testing.assert_close(z.double(), ref, rtol=1e-4, atol=1e-5)
        out = enc.decode(z)
        ref_img = ((ref_vae.decode(ref / SD_VAE_SCALE).sample.clamp(-1, 1) + 1) * 127.5).round()
    assert out.shape == (3, 16, 16, 3) and out.dtype == torch.uint8
    assert (out.double() - ref_img.permute(0, 2, 3, 1)).abs().max() <= 1


def test_missing_vae_fails_fast_naming_the_path(tmp_path):
    missing = tmp_path / "sd-vae-ft-ema"
    with pytest.raises(FileNotFoundError, match=str(missing)) as e:
        build_encoder("sdvae", path=str(missing))
    assert "diffusion_pytorch_model.safetensors" in str(e.value)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_encoder("sdvae", path=str(missing))


def test_vae_repo_id_not_in_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the local HF cache"):
        build_encoder("sdvae", path="stabilityai/sd-vae-ft-ema")


def test_build_with_sdvae_and_flip(tiny_vae_dir, tmp_path):
    """The builder on the tiny VAE: scaled latents of the right shape, flipped latents, meta scale."""
    from gd.data.build import BuildConfig, Builder
    from gd.data.loader import build_loaders
    from gd.data.sources import FashionMNISTSource
    cfg = BuildConfig(out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), source="fashion_mnist",
                      image_size=16, limit=24, encoder="sdvae", encoder_kw={"path": str(tiny_vae_dir), "device": "cpu"},
                      flip=True, embedder="class", n_max=2, k=2, tau=0.5, chunk_size=16, progress=False)
    meta = Builder(cfg).run()
    assert meta["latent_shape"] == [4, 8, 8] and meta["scale"] == SD_VAE_SCALE and meta["flip"]
    enc = build_encoder("sdvae", path=str(tiny_vae_dir), device="cpu")
    src = FashionMNISTSource(image_size=16, limit=24)
    imgs = np.stack([src.read(i)[0] for i in range(24)])
    z, zf = enc.encode(imgs), enc.encode(np.ascontiguousarray(imgs[:, :, ::-1]))
    plain, _ = build_loaders({"root": str(tmp_path / "out"), "cache": str(tmp_path / "cache"), "shuffle": False,
                              "flip": True, "drop_last": False},
                             group_size=2, micro_batch=24, seed=0, rank=0, world_size=1)
    batch = next(iter(plain))
    ids, lat = batch["id"].numpy(), batch["latent"]
    is_plain = [torch.allclose(lat[j], z[i].half().float()) for j, i in enumerate(ids)]
    is_flip = [torch.allclose(lat[j], zf[i].half().float()) for j, i in enumerate(ids)]
    assert all(a or b for a, b in zip(is_plain, is_flip)) and 0 < sum(is_flip) < 24
