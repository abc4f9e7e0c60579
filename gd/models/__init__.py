"""SiT with group attention: build, load official/our checkpoints, count FLOPs, measure S_cross and member
selectivity."""
from gd.models.checkpoints import CheckpointError, load_model, load_pretrained, save_model
from gd.models.cross_attention import GroupAttentionStats, cross_attention_score
from gd.models.flops import forward_flops
from gd.models.sit import SiT, build_model

__all__ = [
    "SiT",
    "build_model",
    "load_pretrained",
    "load_model",
    "save_model",
    "CheckpointError",
    "cross_attention_score",
    "GroupAttentionStats",
    "forward_flops",
]
