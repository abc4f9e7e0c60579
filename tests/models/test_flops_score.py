"""forward_flops against a hand count and torch's FLOP counter; S_cross against an explicit loop."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gd.models import cross_attention_score, forward_flops

from .conftest import inputs, tiny


def test_flops_hand_count():
    # input 8, patch 2 -> L = 16 tokens, D = 64, depth 2, MLP 256, C = 4 (learn_sigma off), freq 256
    model = tiny(learn_sigma=False, group_layers=[1, 2])
    L, D = 16, 64
    patch = 2 * L * (4 * 2 * 2) * D
    temb = 2 * (256 * D + D * D)
    per_block = 2 * D * 6 * D + 2 * L * D * 3 * D + 2 * L * D * D + 2 * 2 * L * D * 256
    final = 2 * D * 2 * D + 2 * L * D * (2 * 2 * 4)
    attn = lambda keys: 2 * 2 * L * keys * D  # noqa: E731
    assert forward_flops(model, 1) == patch + temb + 2 * per_block + 2 * attn(L) + final
    assert forward_flops(model, 4) == patch + temb + 2 * per_block + attn(L) + attn(4 * L) + final


@pytest.mark.parametrize("n", [1, 4])
def test_flops_match_torch_flop_counter(n):
    model = tiny(learn_sigma=True, attn_backend="math")  # the counter has no formula for CPU sdpa kernels
    x, t, y = inputs(2 * n)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, group_size=n)
    assert counter.get_total_flops() == pytest.approx(forward_flops(model, n) * 2 * n, rel=1e-9)


def _loop_score(model, x, t, y, n, layer, slots=None):
    """S_cross from explicit loops over groups, heads, queries and members (float64)."""
    captured = {}
    hook = model.blocks[layer].attn.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
    model(x, t, y, group_size=n, slots=slots)
    hook.remove()
    h = captured["h"].double()
    attn = model.blocks[layer].attn
    qkv = h @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    b, L, c3 = qkv.shape
    c, heads = c3 // 3, attn.num_heads
    d = c // heads
    total, count = 0.0, 0
    for g in range(b // n):
        seq = qkv[g * n:(g + 1) * n].reshape(n * L, c3)
        for hd in range(heads):
            q = seq[:, hd * d:(hd + 1) * d]
            k = seq[:, c + hd * d:c + (hd + 1) * d]
            for i in range(n * L):
                p = torch.softmax(k @ q[i] / d**0.5, dim=0)
                masses = [p[j * L:(j + 1) * L].sum().item() for j in range(n) if j != i // L]
                total += max(masses) - min(masses)
                count += 1
    return total / count


def test_s_cross_matches_loop_reference():
    model = tiny(seed=2).double()
    x, t, y = inputs(6, dtype=torch.float64)
    scores = cross_attention_score(model, x, t, y, group_size=3)
    assert set(scores) == {0, 1}
    for layer in (0, 1):
        assert scores[layer] == pytest.approx(_loop_score(model, x, t, y, 3, layer), abs=1e-6)
        assert 0 < scores[layer] < 1


def test_s_cross_zero_cases():
    model = tiny(group_layers=[1, 2])
    x, t, y = inputs(4)
    assert cross_attention_score(model, x, t, y, group_size=2) == {1: 0.0}  # one neighbour
    assert cross_attention_score(model, x, t, y, group_size=1, layers=[0, 1]) == {0: 0.0, 1: 0.0}
    scores = cross_attention_score(model, x, t, y, group_size=4, layers=[0, 1])
    assert scores[0] == 0.0 and scores[1] > 0  # block 0 does not attend across the group
    windowed = tiny(group_t_window=[0.0, 0.1])
    t_out = torch.full((4,), 0.9)
    assert cross_attention_score(windowed, x, t_out, y, group_size=4) == {0: 0.0, 1: 0.0}
    with pytest.raises(ValueError, match="out of range"):
        cross_attention_score(model, x, t, y, group_size=4, layers=[5])


def test_sit_xl2_flops_are_the_published_count():
    """SiT-XL/2 on the meta device: 118.6 GMACs per image (DiT's Table 4: 237 GFLOPs at 2 FLOPs per MAC) at N = 1,
    and at N = 16 that plus the two attention products over 15 more images' keys in each of the 28 layers
    (2 products x 2 FLOPs x 256 queries x 15 x 256 keys x 1152), 364 GFLOPs, to 0.5%. Catches a forgotten layer or
    an attention term not scaled by the group."""
    from gd.models import build_model
    from gd.models.flops import forward_flops

    with torch.device("meta"):
        model = build_model("SiT-XL/2")
    assert forward_flops(model, 1) == pytest.approx(237.2e9, rel=5e-3)
    extra = 28 * 2 * 2 * 256 * (15 * 256) * 1152
    assert forward_flops(model, 16) == pytest.approx(237.2e9 + extra, rel=5e-3)
    assert round(forward_flops(model, 16) / 1e9) == 364
