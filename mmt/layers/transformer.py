"""Encoder and decoder layers and stacks, position embeddings, the decoder cache.

Encoder layer (Vaswani et al. 2017, sec. 3.1): self-attention, then a two-layer
feed-forward network, each wrapped in a residual connection and LayerNorm.
Decoder layer: masked self-attention, cross-modal attention whose keys and values are
the other modality's encoder output, then the feed-forward network.

Post-norm is the paper's formula, x = LayerNorm(x + Sublayer(x)). Pre-norm,
x = x + Sublayer(LayerNorm(x)) with one LayerNorm after the stack, trains more stably
without warm-up tricks (Xiong et al. 2020) and is the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmt.config import TransformerConfig
from mmt.layers.attention import KV, MultiHeadAttention

# ----------------------------------------------------------------------------- initialisation


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


# ----------------------------------------------------------------------------- positions


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal embedding of integer `positions` (L,) -> (L, dim) (Vaswani et al. sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (L, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))  # odd dim: one zero channel


class Positions1D(nn.Module):
    """Position embedding for a token sequence: learned table or fixed sinusoids."""

    def __init__(self, max_len: int, dim: int, kind: str = "learned"):
        super().__init__()
        self.max_len = max_len
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        else:  # fixed: a buffer that follows the module's device but is not saved
            self.register_buffer("table", sincos_1d(torch.arange(max_len), dim), persistent=False)

    def forward(self, length: int, start: int = 0) -> Tensor:
        """Embeddings of positions start..start+length-1, (length, dim)."""
        if start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds max_len={self.max_len}")
        return self.table[start : start + length]


class Positions2D(nn.Module):
    """Position embedding for an image token grid: emb(row) + emb(col), learned or sinusoidal,
    or "xy": a learned linear map of the token centre's coordinates (x, y) in [-1, 1].

    The sinusoidal form spends half the channels on the row and half on the column
    (as in MAE); the learned form keeps one table per axis. "xy" is the coordinate tagging
    of Santoro et al. 2017 (each cell's features carry its coordinates), applied as
    emb(row) + emb(col) with emb linear in the coordinate.
    """

    def __init__(self, max_rows: int, max_cols: int, dim: int, kind: str = "learned"):
        super().__init__()
        self.dim = dim
        if kind == "xy":
            self.xy = nn.Linear(2, dim)
            self.register_buffer("rows", torch.linspace(-1, 1, max_rows)[:, None] * torch.tensor([[0.0, 1.0]]), persistent=False)
            self.register_buffer("cols", torch.linspace(-1, 1, max_cols)[:, None] * torch.tensor([[1.0, 0.0]]), persistent=False)
        elif kind == "learned":
            self.rows = nn.Parameter(torch.randn(max_rows, dim) * 0.02)
            self.cols = nn.Parameter(torch.randn(max_cols, dim) * 0.02)
        else:  # zero-padded halves, so that row + col concatenates [row code, col code]
            half = dim // 2
            rows = nn.functional.pad(sincos_1d(torch.arange(max_rows), half), (0, dim - half))
            cols = nn.functional.pad(sincos_1d(torch.arange(max_cols), dim - half), (half, 0))
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)

    def forward(self, rows: int, cols: int) -> Tensor:
        """(rows * cols, dim), row-major like a flattened (rows, cols) grid."""
        if rows > self.rows.shape[0] or cols > self.cols.shape[0]:
            raise ValueError(f"token grid {rows}x{cols} exceeds {self.rows.shape[0]}x{self.cols.shape[0]}")
        grid = self.rows[:rows, None, :] + self.cols[None, :cols, :]  # (rows, cols, dim); xy: (rows, cols, 2) coordinates
        if hasattr(self, "xy"):
            grid = self.xy(grid)
        return grid.reshape(rows * cols, self.dim)


# ----------------------------------------------------------------------------- layers


class FeedForward(nn.Module):
    """Two-layer position-wise network: Linear -> activation -> dropout -> Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward, each with residual connection and LayerNorm."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout, fast=cfg.fast_attention, fused_on_bf16_cpu=cfg.fused_on_bf16_cpu)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.dropout, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False, need_weights: bool = False,
        first: int | None = None, bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D) -> ((B, T, D), attention weights (B, H, T, T) or None).

        first: compute only the first `first` output positions (they still attend to all T);
            for a last layer whose other positions nobody reads.
        bias: added to the attention scores, broadcastable to (B, H, T, T).
        """
        h = self.norm1(x) if self.norm_first else x
        queries, context = _first_rows(h, first, causal)
        if bias is not None:
            bias = bias[..., :first, :]  # the rows of the queries kept (all when first is None)
        attended, _, weights = self.attn(
            queries, context, key_padding_mask=key_padding_mask, causal=causal, need_weights=need_weights, bias=bias
        )
        x = x[:, :first]  # (all of x when first is None)
        if self.norm_first:
            x = x + self.drop1(attended)
            x = x + self.drop2(self.ffn(self.norm2(x)))
        else:
            x = self.norm1(x + self.drop1(attended))
            x = self.norm2(x + self.drop2(self.ffn(x)))
        return x, weights


def _first_rows(h: Tensor, first: int | None, causal: bool) -> tuple[Tensor, Tensor | None]:
    """Self-attention inputs when only the first `first` positions are wanted: those
    positions as queries, the whole sequence as keys/values (None: plain self-attention)."""
    if first is None:
        return h, None
    if causal:
        raise ValueError("first= computes a prefix of the positions, which causal attention does not support")
    return h[:, :first], h


def copy_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] along dim 0, made with a one-hot matmul: exact, and its backward is a matmul,
    deterministic and fast on the CPU (index_select's backward is a slow scatter-add there,
    plain indexing's is not deterministic)."""
    if not len(index):  # (one_hot cannot size an empty index)
        return x.new_zeros(0, *x.shape[1:])
    pick = torch.nn.functional.one_hot(index, x.shape[0]).to(x.dtype)  # (B, U)
    return (pick @ x.reshape(x.shape[0], -1)).view(len(index), *x.shape[1:])


@dataclass
class DecoderCache:
    """Keys/values kept between decoding steps, one entry per decoder layer.

    `self_kv` grows by one position per generated token; `cross_kv` holds the image
    (context) keys/values, projected once on the first step and reused afterwards.
    """

    self_kv: list[KV | None]
    cross_kv: list[KV | None]

    @classmethod
    def empty(cls, num_layers: int) -> "DecoderCache":
        return cls([None] * num_layers, [None] * num_layers)

    @property
    def length(self) -> int:
        """Number of positions already decoded."""
        first = self.self_kv[0]
        return 0 if first is None else first.k.shape[2]

    def select(self, index: Tensor, cross: bool = True) -> "DecoderCache":
        """Keep/reorder batch rows (beam search): cached tensors indexed on dim 0.

        cross=False leaves the cross-attention keys/values as they are: beams of one image
        share them (grouped queries), so reordering beams never touches them.
        """

        def pick(kv: KV | None) -> KV | None:
            return None if kv is None else KV(kv.k.index_select(0, index), kv.v.index_select(0, index))

        return DecoderCache([pick(kv) for kv in self.self_kv], [pick(kv) for kv in self.cross_kv] if cross else self.cross_kv)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-modal attention to `context`, feed-forward.

    With causal=False the self-attention sees the whole sequence: the layer then fuses a
    text sequence with an image (cross-attention fusion for understanding tasks).
    """

    def __init__(
        self, cfg: TransformerConfig, context_dim: int | None = None, causal: bool = True, focus_bias: bool = False,
        focus_per_query: bool = False,
    ):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.causal = causal
        # focus bias: head h's cross-attention score to a context token gets -scale_h * d^2, d
        # its distance from where head h looked in the layer before (the centre of its
        # attention there, `focus`); zero at the start, and either sign is learned (near or
        # far from that place)
        self.focus_scale = nn.Parameter(torch.zeros(cfg.heads)) if focus_bias else None
        # focus_per_query: each query also adds its own term to scale_h, and sets how strongly
        # head h avoids (or seeks) the very tokens it looked at before, in proportion to their
        # share of that look ("inhibition of return": the object nearest to the one a question
        # names is not that object). Both are a linear map of the query, zero at the start
        # (plain parameters, so that no model-wide weight initialisation touches them).
        self.focus_query = None
        if focus_per_query:
            if not focus_bias:
                raise ValueError("focus_per_query refines a focus bias; it needs focus_bias=True")
            self.focus_query = nn.ParameterDict(
                {"weight": nn.Parameter(torch.zeros(2 * cfg.heads, cfg.dim)), "bias": nn.Parameter(torch.zeros(2 * cfg.heads))}
            )
        self.self_attn = MultiHeadAttention(cfg.dim, cfg.heads, cfg.dropout, fast=cfg.fast_attention, fused_on_bf16_cpu=cfg.fused_on_bf16_cpu)
        self.cross_attn = MultiHeadAttention(
            cfg.dim, cfg.heads, cfg.dropout, context_dim, fast=cfg.fast_attention, fused_on_bf16_cpu=cfg.fused_on_bf16_cpu
        )
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.dropout, cfg.activation)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.norm3 = nn.LayerNorm(cfg.dim)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)
        self.drop3 = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        past_kv: KV | None = None,
        cross_kv: KV | None = None,
        need_weights: bool = False,
        first: int | None = None,
        focus: Tensor | None = None,
        context_positions: Tensor | None = None,
        look_rows: int | None = None,
        row_index: Tensor | None = None,
    ) -> tuple[Tensor, KV, KV, Tensor | None, Tensor | None]:
        """x: (B, T, D) text states; context: (B, S, Dc) the other modality's encoder output.

        first: compute only the first `first` output positions (non-causal layers without a
            past; they still attend to all T).
        focus, context_positions: for a layer with a focus bias, (B, H, T, S) where each
            head's queries looked in the layer before (their attention weights over the
            context tokens) and (S, P) the context tokens' positions (e.g. P = 2: row and
            column of an image token).
        look_rows: also return where each head's cross-attention looked (its attention
            weights, without dropout) for the first `look_rows` queries.
        row_index: (B',) when the rows of `x` are distinct sequences that B' queries share
            (e.g. a question asked of several images): the self-attention runs once per
            distinct row, and output row b continues row row_index[b] (dropout masks are
            then shared by the copies). key_padding_mask is the distinct rows' mask, and
            the self-attention KV returned holds the distinct rows.
        Returns (output, self-attention KV incl. past, cross-attention KV, cross-attention
        weights (B, H, T, S) or None, where the heads looked (B, H, look_rows, S) or None).
        """
        h = self.norm1(x) if self.norm_first else x
        if past_kv is not None and (first is not None or row_index is not None):
            raise ValueError(f"{'first=' if first is not None else 'row_index='} cannot be combined with cached keys/values")
        queries, whole = _first_rows(h, first, self.causal)
        attended, self_kv, _ = self.self_attn(
            queries, whole, key_padding_mask=key_padding_mask, causal=self.causal, past_kv=past_kv
        )
        x = x[:, :first]  # (all of x when first is None)
        x = x + self.drop1(attended) if self.norm_first else self.norm1(x + self.drop1(attended))
        if row_index is not None:
            x = copy_rows(x, row_index)

        h = self.norm2(x) if self.norm_first else x
        bias = None
        if self.focus_scale is not None and focus is not None:
            if context_positions is None:
                raise ValueError("a focus bias needs the context tokens' positions")
            seen = focus[:, :, : h.shape[1]]  # (B, H, T, S)
            positions = context_positions.to(seen.dtype)
            offsets = (seen @ positions)[:, :, :, None, :] - positions  # (B, H, T, S, P): from each head's centre
            heads = len(self.focus_scale)
            scale = self.focus_scale.to(h.dtype)[:, None]  # (H, 1)
            inhibition = None
            if self.focus_query is not None:
                per_query = nn.functional.linear(h, self.focus_query["weight"], self.focus_query["bias"]).transpose(1, 2)
                scale = scale + per_query[:, :heads]  # (B, H, T)
                inhibition = per_query[:, heads:, :, None] * (seen / seen.amax(-1, keepdim=True)).to(h.dtype)
            bias = -scale[..., None] * offsets.square().sum(-1).to(h.dtype)
            if inhibition is not None:
                bias = bias - inhibition
        attended, cross_kv, weights = self.cross_attn(
            h, context, key_padding_mask=context_padding_mask, static_kv=cross_kv, need_weights=need_weights, bias=bias
        )
        looked = None
        if look_rows is not None:
            looked = self.cross_attn.looked_at(
                h[:, :look_rows], cross_kv, context_padding_mask, None if bias is None else bias[:, :, :look_rows]
            )
        x = x + self.drop2(attended) if self.norm_first else self.norm2(x + self.drop2(attended))

        if self.norm_first:
            x = x + self.drop3(self.ffn(self.norm3(x)))
        else:
            x = self.norm3(x + self.drop3(self.ffn(x)))
        return x, self_kv, cross_kv, weights, looked


# ----------------------------------------------------------------------------- stacks


class Encoder(nn.Module):
    """N encoder layers; a final LayerNorm when pre-norm (post-norm layers end normalised)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim) if cfg.norm_first else nn.Identity()
        self.activation_checkpointing = False  # training: recompute each layer's activations in backward

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False, need_weights: bool = False,
        first: int | None = None, bias: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """x: (B, T, D) -> ((B, T, D), per-layer attention weights if requested, else []).

        first: return only the first `first` positions, and skip computing the others in
            the last layer (e.g. first=1 when only a [CLS] state is read).
        bias: added to every layer's attention scores, broadcastable to (B, H, T, T).
        """
        all_weights = []
        for i, layer in enumerate(self.layers):
            rows = first if i == len(self.layers) - 1 else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled() and not need_weights:
                x = checkpoint(
                    lambda h, layer=layer, rows=rows: layer(h, key_padding_mask, causal, False, rows, bias)[0], x, use_reentrant=False
                )
                continue
            x, weights = layer(x, key_padding_mask, causal, need_weights, rows, bias)
            if weights is not None:
                all_weights.append(weights)
        return self.norm(x[:, :first]), all_weights  # (the last layer already kept only those; no layers: here)


class Decoder(nn.Module):
    """N decoder layers attending to a context sequence, with an optional KV cache."""

    def __init__(
        self, cfg: TransformerConfig, context_dim: int | None = None, causal: bool = True, focus_bias: bool = False,
        focus_per_query: bool = False,
    ):
        """focus_bias, focus_per_query: see DecoderLayer; every layer after the first has them."""
        super().__init__()
        if focus_bias and causal:
            raise ValueError("a focus bias is for non-causal decoders (fusion), not for generating text")
        if focus_per_query and not focus_bias:
            raise ValueError("focus_per_query refines a focus bias; it needs focus_bias=True")
        self.focus_bias = focus_bias
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, context_dim, causal, focus_bias and i > 0, focus_per_query and i > 0) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim) if cfg.norm_first else nn.Identity()
        # training: recompute each layer's activations in backward (the returned cache then
        # holds no keys/values: training reads none)
        self.activation_checkpointing = False

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        *,
        key_padding_mask: Tensor | None = None,
        context_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
        first: int | None = None,
        context_positions: Tensor | None = None,
        row_index: Tensor | None = None,
    ) -> tuple[Tensor, DecoderCache | None]:
        """x: (B, T, D) embedded target tokens (positions already added).

        Args:
            key_padding_mask: (B, past + T) bool, True at padded target positions.
            context_padding_mask: (B, S) bool, True at padded context tokens.
            cache: keys/values from earlier steps (start with `DecoderCache.empty(depth)`);
                when given, `x` holds only the new positions. A cache whose `cross_kv` is
                filled makes `context` unnecessary (pass None).
            first: return only the first `first` positions, and skip computing the others
                in the last layer (non-causal decoders without past keys/values).
            context_positions: (S, P) positions of the context tokens (e.g. row and column of
                each image token), needed with a focus bias: each head's focus is where its
                cross-attention looked (its weights), and the next layer's same head scores
                context tokens by their distance from the attention-weighted mean of these
                positions (and, per query, by their share of that look).
            row_index: (B',) when `x` holds distinct sequences that B' rows share (a
                question asked of several images): the first layer's self-attention runs
                once per distinct sequence, then row b continues x[row_index[b]] (see
                DecoderLayer). key_padding_mask is then x's (distinct rows'), and the
                output has B' rows. Needs a non-causal decoder and no cached past.
        Returns:
            ((B, T, D) hidden states, the updated cache or None when none was given).
        """
        if self.focus_bias and context_positions is None:
            raise ValueError("a decoder with a focus bias needs context_positions")
        if row_index is not None and (not self.layers or self.layers[0].causal):
            raise ValueError("row_index needs a non-causal decoder with at least one layer (causal rows are generated apart)")
        new_cache = DecoderCache.empty(len(self.layers)) if cache is not None else None
        focus = None  # (B, H, rows, S): where each head's cross-attention looked in the layer before
        last = len(self.layers) - 1
        later_padding = key_padding_mask  # the layers after the first see row_index's rows
        if row_index is not None and key_padding_mask is not None:
            later_padding = key_padding_mask[row_index]
        for i, layer in enumerate(self.layers):
            rows = first if i == last else None
            copies, padding = (row_index, key_padding_mask) if i == 0 else (None, later_padding)
            # the next layer needs the focus of the rows it computes (all, or `first` if it is the last)
            look = None if not self.focus_bias or i == last else (first if i + 1 == last and first is not None else x.shape[1])
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                past = cache.self_kv[i] if cache is not None else None
                cross = cache.cross_kv[i] if cache is not None else None

                def run(
                    h: Tensor, focus: Tensor | None, layer=layer, past=past, cross=cross, rows=rows, look=look, copies=copies,
                    padding=padding,
                ):
                    out = layer(
                        h, context, key_padding_mask=padding, context_padding_mask=context_padding_mask,
                        past_kv=past, cross_kv=cross, first=rows, focus=focus, context_positions=context_positions,
                        look_rows=look, row_index=copies,
                    )
                    return out[0], out[4]

                x, focus = checkpoint(run, x, focus, use_reentrant=False)
            else:
                x, self_kv, cross_kv, _, focus = layer(
                    x,
                    context,
                    key_padding_mask=padding,
                    context_padding_mask=context_padding_mask,
                    past_kv=cache.self_kv[i] if cache is not None else None,
                    cross_kv=cache.cross_kv[i] if cache is not None else None,
                    first=rows,
                    focus=focus,
                    context_positions=context_positions,
                    look_rows=look,
                    row_index=copies,
                )
                if new_cache is not None:
                    new_cache.self_kv[i], new_cache.cross_kv[i] = self_kv, cross_kv
        return self.norm(x[:, :first]), new_cache  # (the last layer already kept only those; no layers: here)
