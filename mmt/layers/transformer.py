"""Encoder and decoder layers and stacks, the feed-forward network, weight initialisation.

Encoder layer (Vaswani et al. 2017, sec. 3.1): self-attention, then a two-layer feed-forward
network, each wrapped in a residual connection and LayerNorm. Decoder layer: masked
self-attention, cross-modal attention whose keys and values are the other modality's
encoder output, then the feed-forward network.

Post-norm is the paper's formula, x = LayerNorm(x + Sublayer(x)). Pre-norm,
x = x + Sublayer(LayerNorm(x)) with one LayerNorm after the stack, trains more stably
without warm-up tricks (Xiong et al. 2020) and is the default.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmt.config import TransformerConfig
from mmt.layers.attention import MultiHeadAttention
from mmt.layers.cache import KV, GrowingCache, LayerCache, StaticCache


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT/ViT initialisation: linear and embedding weights ~ N(0, std) truncated at 2 std, biases 0.

    torch's default (Kaiming-uniform) gives image and text tokens very different scales
    at the start; this common scheme keeps every stream comparable.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that CLIP was trained with
    (Hendrycks & Gimpel 2016, sec. 2)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "quick_gelu": QuickGELU}  # (exact GELU, the erf form)


class FeedForward(nn.Module):
    """Two-layer position-wise network: Linear -> activation -> dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


def _attend_first(
    attn: MultiHeadAttention, h: Tensor, first: int | None, causal: bool, **kwargs
) -> Tensor:
    """Self-attention over `h`; with `first`, only the first `first` positions are computed (as
    queries), attending to the whole sequence: for a last layer whose other positions nobody reads."""
    if first is None:
        return attn(h, causal=causal, **kwargs)
    if causal or kwargs.get("cache") is not None:
        raise ValueError("first= computes a prefix of the positions, which causal or cached attention does not support")
    return attn(h[:, :first], h, **kwargs)


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward, each with residual connection and LayerNorm."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.dropout, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False, first: int | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D) -> (B, T, D), or (B, first, D).

        first: compute only the first `first` output positions (they still attend to all T).
        bias: added to the attention scores, broadcastable to (B, H, T, T).
        """
        h = self.norm1(x) if self.norm_first else x
        if bias is not None and first is not None:
            bias = bias[..., :first, :]  # the rows of the queries kept
        attended = _attend_first(self.attn, h, first, causal, key_padding_mask=key_padding_mask, bias=bias)
        if first is not None:
            x = x[:, :first]
        if self.norm_first:
            x = x + self.drop1(attended)
            return x + self.drop2(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-modal attention to a context, feed-forward: three residual
    sublayers, each a method of its own so that a model can compose them with its own steps.

    With causal=False the self-attention sees the whole sequence: the layer then fuses a text
    sequence with an image (cross-attention fusion for understanding tasks).
    """

    def __init__(self, cfg: TransformerConfig, context_dim: int | None = None, causal: bool = True):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.causal = causal
        self.self_attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout, context_dim)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.dropout, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)
        self.drop3 = nn.Dropout(cfg.dropout)

    def self_attention(
        self, x: Tensor, key_padding_mask: Tensor | None = None, cache: LayerCache | None = None, first: int | None = None
    ) -> Tensor:
        """x + SelfAttention(LN(x)) (pre-norm), or LN(x + SelfAttention(x)); `first` as in `forward`."""
        h = self.norm1(x) if self.norm_first else x
        attended = _attend_first(self.self_attn, h, first, self.causal, key_padding_mask=key_padding_mask, cache=cache)
        if first is not None:
            x = x[:, :first]
        return x + self.drop1(attended) if self.norm_first else self.norm1(x + self.drop1(attended))

    def cross_attention(self, x: Tensor, context: Tensor | KV, context_padding_mask: Tensor | None = None) -> Tensor:
        """x + CrossAttention(LN(x), context) (pre-norm), or LN(x + CrossAttention(x, context));
        `context` is the other modality's tokens or their keys/values projected already."""
        h = self.norm2(x) if self.norm_first else x
        if isinstance(context, KV):
            attended = self.cross_attn(h, kv=context, key_padding_mask=context_padding_mask)
        else:
            attended = self.cross_attn(h, context, key_padding_mask=context_padding_mask)
        return x + self.drop2(attended) if self.norm_first else self.norm2(x + self.drop2(attended))

    def feed_forward(self, x: Tensor) -> Tensor:
        """x + FFN(LN(x)) (pre-norm), or LN(x + FFN(x))."""
        return x + self.drop3(self.ffn(self.norm3(x))) if self.norm_first else self.norm3(x + self.drop3(self.ffn(x)))

    def forward(
        self,
        x: Tensor,
        context: Tensor | KV,
        *,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        cache: LayerCache | None = None,
        first: int | None = None,
    ) -> Tensor:
        """x: (B, T, D) text states; context: (B, S, Dc) the other modality's encoder output, or its
        keys/values (`cross_attn.project_kv`). Contexts may number B / g (see MultiHeadAttention).

        cache: this layer's self-attention keys/values of earlier steps; `x` then holds only the
            new positions.
        first: compute only the first `first` output positions (non-causal layers without a
            cache; they still attend to all T).
        """
        x = self.self_attention(x, key_padding_mask, cache, first)
        x = self.cross_attention(x, context, context_padding_mask)
        return self.feed_forward(x)


class Encoder(nn.Module):
    """N encoder layers; a final LayerNorm when pre-norm (post-norm layers end normalised)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.activation_checkpointing = False  # training: recompute each layer's activations in backward

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False, first: int | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D) -> (B, T, D).

        first: return only the first `first` positions, and skip computing the others in the
            last layer (e.g. first=1 when only a [CLS] state is read).
        bias: added to every layer's attention scores, broadcastable to (B, H, T, T).
        """
        for i, layer in enumerate(self.layers):
            rows = first if i == len(self.layers) - 1 else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, causal, rows, bias, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask, causal, rows, bias)
        return self.norm(x if first is None else x[:, :first])  # (the last layer already kept only those; no layers: here)


class Decoder(nn.Module):
    """N decoder layers attending to a context sequence, with an optional key/value cache."""

    def __init__(self, cfg: TransformerConfig, context_dim: int | None = None, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, context_dim, causal) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm_first else nn.Identity()
        self.activation_checkpointing = False  # training: recompute each layer's activations in backward

    def project_context(self, context: Tensor) -> list[KV]:
        """Each layer's cross-attention keys/values of `context` (B, S, Dc): what decoding steps,
        or several query sequences about one context, reuse instead of projecting it again."""
        return [layer.cross_attn.project_kv(context) for layer in self.layers]

    def new_cache(self, capacity: int | None = None, static: bool = False, device: torch.device | str = "cpu"):
        """An empty key/value cache for this decoder (see `mmt.layers.cache`)."""
        if static:
            if capacity is None:
                raise ValueError("a static cache needs its capacity")
            return StaticCache(len(self.layers), capacity, device)
        return GrowingCache(len(self.layers), capacity)

    def forward(
        self,
        x: Tensor,
        context: Tensor | Sequence[KV],
        *,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        cache: GrowingCache | StaticCache | None = None,
        first: int | None = None,
    ) -> Tensor:
        """x: (B, T, D) embedded target tokens (positions already added) -> (B, T, D).

        Args:
            context: (B, S, Dc) the other modality's tokens, or their keys/values per layer
                (`project_context`).
            key_padding_mask: (B, T) bool, True at padded target positions (with a cache: every
                stored position and the new ones).
            context_padding_mask: (B, S) bool, True at padded context tokens.
            cache: keys/values of earlier steps (`new_cache()`); `x` then holds only the new
                positions, whose keys/values each layer stores. The caller advances the cache
                after the step (`cache.advance(T)`).
            first: return only the first `first` positions, and skip computing the others in
                the last layer (non-causal decoders without a cache).
        """
        contexts = [context] * len(self.layers) if isinstance(context, Tensor) else context
        last = len(self.layers) - 1
        for i, (layer, layer_context) in enumerate(zip(self.layers, contexts, strict=True)):
            rows = first if i == last else None
            layer_cache = None if cache is None else cache.layers[i]
            # (not with a cache: recomputing a layer in backward would store its keys/values twice)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                x = checkpoint(
                    layer, x, layer_context, key_padding_mask=key_padding_mask, context_padding_mask=context_padding_mask,
                    cache=layer_cache, first=rows, use_reentrant=False,
                )
            else:
                x = layer(
                    x, layer_context, key_padding_mask=key_padding_mask, context_padding_mask=context_padding_mask,
                    cache=layer_cache, first=rows,
                )
        return self.norm(x if first is None else x[:, :first])  # (the last layer already kept only those; no layers: here)
