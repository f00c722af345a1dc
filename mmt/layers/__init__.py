"""The Transformer's building blocks: attention and encoder/decoder layers."""

from mmt.layers.attention import KV, MultiHeadAttention, reference_attention
from mmt.layers.transformer import (
    Decoder,
    DecoderCache,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    Positions1D,
    Positions2D,
)

__all__ = [
    "KV",
    "MultiHeadAttention",
    "reference_attention",
    "Decoder",
    "DecoderCache",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "Positions1D",
    "Positions2D",
]
