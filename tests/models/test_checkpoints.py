"""load_pretrained / load_model / save_model with official and gd file layouts."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from gd.models import CheckpointError, load_model, load_pretrained, save_model

from .conftest import inputs, tiny


def _official_state(model) -> dict:
    """What an official file holds: the same keys minus our sample_embed."""
    return {k: v.clone() for k, v in model.state_dict().items() if k != "sample_embed"}


def test_official_flat_file_round_trip(tmp_path):
    src = tiny(seed=3, sample_embed=False)
    path = tmp_path / "SiT-S-2.pt"
    torch.save(_official_state(src), path)
    dst = tiny(seed=4)
    with torch.no_grad():
        dst.sample_embed.zero_()
    info = load_pretrained(dst, path)
    assert info["entry"] == "<flat>" and info["absent_optional"] == ["sample_embed"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)
    assert dst.sample_embed.abs().sum() == 0
    x, t, y = inputs(4)
    torch.testing.assert_close(dst(x, t, y), src(x, t, y), rtol=0, atol=0)
    # sample embedding zero: grouping changes outputs only through attention, and group_size=1 is exact
    torch.testing.assert_close(dst(x, t, y, group_size=1), src(x, t, y, group_size=1), rtol=0, atol=0)


def test_official_train_dict_prefers_ema_and_allows_namespace(tmp_path):
    ema, raw = tiny(seed=5, sample_embed=False), tiny(seed=6, sample_embed=False)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    raw(*inputs(2)).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, num_classes=1000, global_batch_size=256,
                              path_type="Linear", prediction="velocity", loss_weight=None, ckpt=None)
    path = tmp_path / "0400000.pt"
    torch.save({"model": _official_state(raw), "ema": _official_state(ema), "opt": opt.state_dict(), "args": args},
               path)
    dst = tiny(seed=7)
    assert load_pretrained(dst, path)["entry"] == "ema"
    torch.testing.assert_close(dst.blocks[1].attn.qkv.weight, ema.blocks[1].attn.qkv.weight, rtol=0, atol=0)
    torch.save({"model": _official_state(raw), "args": args}, path)
    assert load_pretrained(dst, path)["entry"] == "model"
    torch.testing.assert_close(dst.final_layer.linear.bias, raw.final_layer.linear.bias, rtol=0, atol=0)


def test_wrapped_prefixes_are_unwrapped(tmp_path):
    src = tiny(seed=8)
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)
    dst = tiny(seed=9)
    load_pretrained(dst, path)
    torch.testing.assert_close(dst.sample_embed, src.sample_embed, rtol=0, atol=0)


def test_mismatched_checkpoint_lists_everything_and_loads_nothing(tmp_path):
    wrong = tiny(seed=1, depth=3, hidden_size=32, learn_sigma=False)
    path = tmp_path / "wrong.pt"
    torch.save(_official_state(wrong), path)
    dst = tiny(seed=2, learn_sigma=True)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(dst, path)
    msg = str(err.value)
    assert "nothing was loaded" in msg
    assert "unexpected keys" in msg and "blocks.2.attn.qkv.weight" in msg
    assert "shape mismatches" in msg and "blocks.0.attn.qkv.weight: checkpoint (96, 32) vs model (192, 64)" in msg
    assert "... and 7 more" in msg  # long lists are cut, with the count
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    partial = _official_state(dst)
    del partial["blocks.1.mlp.fc2.bias"]
    torch.save(partial, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    blocks.1.mlp.fc2.bias"):
        load_pretrained(dst, path)


def test_sample_embed_in_file_but_not_in_model(tmp_path):
    path = tmp_path / "gd.pt"
    torch.save(tiny(sample_embed=True).state_dict(), path)
    with pytest.raises(CheckpointError, match="sample_embed='cond' or 'tokens'"):
        load_pretrained(tiny(sample_embed=False), path)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_untrusted_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny().state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_pretrained(tiny(), path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path)
    assert not marker.exists()


def test_unreadable_and_non_state_dict_files(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_pretrained(tiny(), path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tiny(), tmp_path / "absent.pt")
    torch.save({"model": {"a": 1}}, path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_pretrained(tiny(), path)


def test_export_round_trip_rebuilds_model(tmp_path):
    src = tiny(seed=11, group_layers=[0, 1], group_t_window=[0.0, 0.5], learn_sigma=True)
    path = tmp_path / "run" / "ema.pt"
    save_model(src, path)
    assert [p.name for p in path.parent.iterdir()] == ["ema.pt"]  # no temp file left behind
    dst = load_model(path)
    assert dst.config == src.config and dst.group_t_window == (0.0, 0.5)
    x, t, y = inputs(4)
    torch.testing.assert_close(dst(x, t, y, group_size=2), src(x, t, y, group_size=2), rtol=0, atol=0)
    assert load_model(path, attn_backend="math").attn_backend == "math"
    other = tiny(seed=12, group_layers=[0, 1], group_t_window=[0.0, 0.5])
    assert load_pretrained(other, path)["config"]["name"] == "SiT-S/2"
    torch.testing.assert_close(other.sample_embed, src.sample_embed, rtol=0, atol=0)


def test_flat_file_with_model_json(tmp_path):
    src = tiny(seed=13)
    torch.save(src.state_dict(), tmp_path / "ema.pt")
    with pytest.raises(CheckpointError, match="model.json"):
        load_model(tmp_path / "ema.pt")
    (tmp_path / "model.json").write_text(json.dumps(src.config))
    dst = load_model(tmp_path / "ema.pt")
    torch.testing.assert_close(dst.pos_embed, src.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(dst.sample_embed, src.sample_embed, rtol=0, atol=0)


def test_save_model_ema_state_and_bf16_target(tmp_path):
    src = tiny(seed=14)
    ema = {k: v + 1 for k, v in src.state_dict().items()}
    save_model(src, tmp_path / "ema.pt", state_dict=ema)
    dst = tiny(seed=15).to(torch.bfloat16)
    load_pretrained(dst, tmp_path / "ema.pt")
    assert dst.x_embedder.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(dst.x_embedder.proj.weight.float(), ema["x_embedder.proj.weight"], rtol=1e-2, atol=1e-2)
