import pytest
import torch

from gd.models import build_model

# The token-space sample embedding (deterministic slots) unless a test asks for the released "cond" one.
TINY = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10, max_group_size=8,
            sample_embed="tokens")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Non-zero weights everywhere (adaLN-Zero init would make every output 0), the fixed pos_embed kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    return randomize(build_model("SiT-S/2", **{**TINY, **overrides}), seed)


def inputs(b: int, seed: int = 1, num_classes: int = 10, size: int = 8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, size, size, generator=gen, dtype=dtype)
    t = torch.rand(b, generator=gen, dtype=dtype)
    y = torch.randint(0, num_classes + 1, (b,), generator=gen)
    return x, t, y


@pytest.fixture(autouse=True)
def _small_threads():
    torch.set_num_threads(1)
    yield
