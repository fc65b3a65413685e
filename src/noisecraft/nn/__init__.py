"""Building blocks: timestep embedding, residual blocks, attention."""

from noisecraft.nn.attention import (
    GEGLU,
    AttentionBlock,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    resolve_heads,
)
from noisecraft.nn.embeddings import timestep_embedding
from noisecraft.nn.resnet import Downsample, ResBlock, Upsample, group_norm, norm_groups_for

__all__ = [
    "GEGLU",
    "AttentionBlock",
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "ResBlock",
    "SpatialTransformer",
    "Upsample",
    "group_norm",
    "norm_groups_for",
    "resolve_heads",
    "timestep_embedding",
]
