"""SiT forward against the independent float64 reference; grouping, layer range, t window, dtypes."""
import numpy as np
import pytest
import torch

from gd.models import SiT, build_model
from gd.models.sit import sincos_pos_embed_2d

from .conftest import TINY, inputs, tiny
from .reference import official_pos_embed, reference_forward


def _cfg(model: SiT) -> dict:
    return dict(patch_size=model.patch_size, in_channels=model.in_channels, heads=model.num_heads,
                depth=model.depth, learn_sigma=model.learn_sigma, group_layers=model.group_layers,
                t_window=model.group_t_window)


def _check(model: SiT, x, t, y, n: int) -> None:
    ref = reference_forward(model.state_dict(), _cfg(model), x, t, y, n)
    out = model.double()(x.double(), t.double(), y, group_size=n)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_pos_embed_matches_official_numpy():
    for dim, grid in ((64, 4), (1152, 16)):
        ours = sincos_pos_embed_2d(dim, grid).numpy()
        np.testing.assert_allclose(ours, official_pos_embed(dim, grid).astype(np.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_group_size_1_equals_float64_reference(backend):
    model = tiny(attn_backend=backend, learn_sigma=True)
    _check(model, *inputs(3), n=1)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_group_attention_equals_per_group_concatenation(backend):
    model = tiny(attn_backend=backend, learn_sigma=False)
    _check(model, *inputs(6), n=3)


def test_full_output_returns_the_variance_channels_too():
    """DiT's DDPM sampler needs all 2C output channels: catches a hook that drops or reorders the variance half,
    and a change of the default (first C channels, the official SiT velocity)."""
    model = tiny(learn_sigma=True)
    x, t, y = inputs(4)
    t = t * 999  # a DDPM timestep index, as the DiT objective feeds it
    ref = reference_forward(model.state_dict(), {**_cfg(model), "learn_sigma": False}, x, t, y, 2)
    full = model.double()(x.double(), t.double(), y, group_size=2, full_output=True)
    assert full.shape == (4, 8, 8, 8)
    torch.testing.assert_close(full, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model(x.double(), t.double(), y, group_size=2), ref[:, :4], rtol=1e-9, atol=1e-9)
    plain = tiny(learn_sigma=False).double()
    assert plain(x.double(), t.double(), y, full_output=True).shape == x.shape


def test_group_size_1_equals_independent_forwards():
    model = tiny().double()
    x, t, y = inputs(4, dtype=torch.float64)
    batched = model(x, t, y)
    single = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-10)


def test_fp32_output_close_to_reference():
    model = tiny()
    x, t, y = inputs(4)
    out = model(x, t, y, group_size=2)
    ref = reference_forward(model.state_dict(), _cfg(model), x, t, y, 2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_member_permutation_permutes_outputs_without_sample_embed():
    model = tiny(sample_embed=False).double()
    x, t, y = inputs(8, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1, 5, 7, 4, 6])  # within each group of 4
    out = model(x, t, y, group_size=4)
    out_p = model(x[perm], t[perm], y[perm], group_size=4)
    torch.testing.assert_close(out_p, out[perm], rtol=1e-10, atol=1e-10)
    # with the (non-zero) sample embedding the slot matters
    model_e = tiny(sample_embed=True).double()
    assert not torch.allclose(model_e(x[perm], t[perm], y[perm], group_size=4), model_e(x, t, y, group_size=4)[perm])


def test_group_attention_mixes_members():
    model = tiny(sample_embed=False)
    x, t, y = inputs(4)
    x2 = x.clone()
    x2[0] += 1.0
    a, b = model(x, t, y, group_size=4), model(x2, t, y, group_size=4)
    assert (a[1:] - b[1:]).abs().max() > 1e-4


def test_no_group_layers_means_no_mixing():
    model = tiny(group_layers=[0, 0])
    x, t, y = inputs(4)
    x2 = x.clone()
    x2[0] += 1.0
    a, b = model(x, t, y, group_size=4), model(x2, t, y, group_size=4)
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)
    assert (a[0] - b[0]).abs().max() > 1e-4


def test_layers_outside_group_range_run_per_image():
    model = tiny(group_layers=[1, 2])
    x, t, y = inputs(4)
    x2 = x.clone()
    x2[0] += 1.0
    outs = {}

    def grab(key):
        return lambda m, a, o: outs.__setitem__(key, o.clone())

    for name, xx in (("a", x), ("b", x2)):
        h0 = model.blocks[0].register_forward_hook(grab(name + "0"))
        h1 = model.blocks[1].register_forward_hook(grab(name + "1"))
        model(xx, t, y, group_size=4)
        h0.remove(), h1.remove()
    torch.testing.assert_close(outs["a0"][1:], outs["b0"][1:], rtol=0, atol=0)  # block 0: per image
    assert (outs["a1"][1:] - outs["b1"][1:]).abs().max() > 1e-4  # block 1: group attention
    _check(model, x, t, y, n=4)


def test_t_window_by_anchor_timestep():
    model = tiny(group_t_window=[0.0, 0.4]).double()
    plain = tiny(group_t_window=None).double()
    x, t, y = inputs(6, dtype=torch.float64)
    # groups of 2: anchors 0.1 (in, member 1 out), 0.7 (out, member 1 in), 0.2 (in)
    t = torch.tensor([0.1, 0.9, 0.7, 0.3, 0.2, 0.3], dtype=torch.float64)
    # mixed batch (the torch.where path) against the float64 reference
    _check(model, x, t, y, n=2)
    # same-side batches (the eager fast paths): inside == plain grouped model, outside == per-image model
    in_idx, out_idx = [0, 1, 4, 5], [2, 3]
    torch.testing.assert_close(model(x[in_idx], t[in_idx], y[in_idx], group_size=2),
                               plain(x[in_idx], t[in_idx], y[in_idx], group_size=2), rtol=0, atol=0)
    torch.testing.assert_close(model(x[out_idx], t[out_idx], y[out_idx], group_size=2),
                               plain(x[out_idx], t[out_idx], y[out_idx], group_size=1), rtol=0, atol=0)
    mixed = model(x, t, y, group_size=2)
    torch.testing.assert_close(mixed[:2], plain(x[:2], t[:2], y[:2], group_size=2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixed[2:4], plain(x[2:4], t[2:4], y[2:4], group_size=1), rtol=1e-10, atol=1e-10)


def test_compiled_forward_has_no_graph_breaks():
    model = tiny(group_t_window=[0.0, 0.5], group_layers=[0, 1]).double()
    x, t, y = inputs(4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.9, 0.7, 0.3], dtype=torch.float64)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, t, y, group_size=2), model(x, t, y, group_size=2), rtol=1e-10, atol=1e-10)


def test_bf16_weights_fp32_inputs():
    model = tiny().to(torch.bfloat16)
    x, t, y = inputs(4)
    out = model(x, t, y, group_size=2)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()


def test_bf16_autocast_fp32_weights():
    model = tiny()
    x, t, y = inputs(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, group_size=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = model(x, t, y, group_size=2)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_grad_checkpointing_same_gradients():
    x, t, y = inputs(4)
    grads = []
    for ckpt in (False, True):
        model = tiny(grad_checkpointing=ckpt).train()
        model(x, t, y, group_size=2).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_sample_embed_trains_and_official_shapes():
    model = tiny().train()
    x, t, y = inputs(4)
    model(x, t, y, group_size=2).square().mean().backward()
    assert model.sample_embed.grad[:2].abs().sum() > 0 and model.sample_embed.grad[2:].abs().sum() == 0


def test_official_shapes_and_key_names():
    with torch.device("meta"):
        model = build_model("SiT-XL/2", sample_embed=False)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert sd["pos_embed"] == (1, 256, 1152)
    assert sd["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert sd["t_embedder.mlp.0.weight"] == (1152, 256)
    assert sd["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert sd["blocks.27.mlp.fc1.weight"] == (4608, 1152)
    assert sd["blocks.27.adaLN_modulation.1.weight"] == (6912, 1152)
    assert sd["final_layer.linear.weight"] == (32, 1152)
    assert sd["final_layer.adaLN_modulation.1.weight"] == (2304, 1152)
    assert len(sd) == 4 + 2 + 1 + 1 + 28 * 10 + 4
    n_params = sum(p.numel() for p in model.parameters()) + 256 * 1152  # + pos_embed (a buffer here)
    assert n_params == 675_129_632  # DiT-XL/2's published count
    for size, (hidden, depth, heads) in {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}.items():
        with torch.device("meta"):
            m = build_model(f"SiT-{size}/8", learn_sigma=False)
        assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.out_channels) == (hidden, depth, heads, 8, 4)


def test_model_does_not_drop_labels():
    model = tiny(class_dropout_prob=0.5).train()
    x, t, y = inputs(4)
    torch.testing.assert_close(model(x, t, y), model(x, t, y), rtol=0, atol=0)
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_layers=[1, 5]), "group_layers"),
    (dict(group_t_window=[0.6, 0.2]), "group_t_window"),
    (dict(attn_backend="flash"), "attn_backend"),
    (dict(num_heads=5), "num_heads"),
    (dict(input_size=9), "input_size"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("SiT-S/2", **{**TINY, **kwargs})


def test_bad_name_and_option():
    with pytest.raises(ValueError, match="SiT-XXL/2"):
        build_model("SiT-XXL/2")
    with pytest.raises(ValueError, match="SiT-S/3"):
        build_model("SiT-S/3")
    with pytest.raises(TypeError, match="hidden"):
        build_model("SiT-S/2", hiden_size=3)


def test_bad_inputs_errors():
    model = tiny()
    x, t, y = inputs(6)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        model(x, t, y, group_size=4)
    with pytest.raises(ValueError, match="max_group_size"):
        tiny()(torch.randn(9, 4, 8, 8), torch.rand(9), torch.zeros(9, dtype=torch.long), group_size=9)
    with pytest.raises(ValueError, match="x has shape"):
        model(torch.randn(6, 3, 8, 8), t, y)


def test_xformers_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    from gd.models.attention import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="attn_backend=sdpa"):
        build_model("SiT-S/2", **{**TINY, "attn_backend": "xformers"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_cuda_backends_match_math(backend):
    if backend == "xformers":
        try:
            from gd.models.attention import check_backend

            check_backend("xformers")
        except RuntimeError as err:
            pytest.skip(str(err))
    ref = tiny(attn_backend="math").cuda()
    model = tiny(attn_backend=backend).cuda()
    x, t, y = (v.cuda() for v in inputs(8))
    if backend == "sdpa":  # fp32 kernels agree closely
        torch.testing.assert_close(model(x, t, y, group_size=4), ref(x, t, y, group_size=4), rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(x, t, y, group_size=4), ref(x, t, y, group_size=4)
    assert (a - b).norm() / b.norm() < 3e-2
    model.to(torch.bfloat16)(x, t, y, group_size=4).float().square().mean().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compile_fullgraph():
    model = tiny(group_t_window=[0.0, 0.5]).cuda()
    x, t, y = (v.cuda() for v in inputs(4))
    t = torch.tensor([0.1, 0.9, 0.7, 0.3], device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = compiled(x, t, y, group_size=2), model(x, t, y, group_size=2)
    assert (a - b).norm() / b.norm() < 3e-2


def test_conf_model_files_build():
    """Every conf/model file composes (its defaults list included) into build_model arguments."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).parents[2] / "conf"
    files = sorted((conf / "model").glob("*.yaml"))
    assert files
    for path in files:
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = compose("config", overrides=[f"model={path.stem}"]).model
        cfg.group_layers = [0, 2]
        with torch.device("meta"):
            model = build_model(**cfg)
        assert model.config["name"] == cfg.name and model.config["group_layers"] == [0, 2]
