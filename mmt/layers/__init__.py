"""The design's Transformer: attention, encoder and decoder layers, positions, the key/value cache."""

from mmt.layers.attention import MultiHeadAttention, attention_kernel, reference_attention, set_attention_kernel
from mmt.layers.cache import KV, GrowingCache, StaticCache
from mmt.layers.positions import Positions1D, Positions2D
from mmt.layers.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer, FeedForward

__all__ = [
    "KV",
    "Decoder",
    "DecoderLayer",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "GrowingCache",
    "MultiHeadAttention",
    "Positions1D",
    "Positions2D",
    "StaticCache",
    "attention_kernel",
    "reference_attention",
    "set_attention_kernel",
]
