"""Cross-attention fusion for VQA, with the research that made Sort-of-CLEVR's relational
questions learnable on a CPU (measurements and what was tried: docs/lab-notes.md).

The question tokens pass through the design's decoder layers without the causal mask
(self-attention over the question, cross-attention to the image tokens, feed-forward). What
this module adds reaches attention only through the layers' generic hooks (keys/values
projected once, the additive score bias):

- **Distinct questions computed once.** A batch asks each question of many images. The
  first layer's self-attention has not seen the image yet, so it runs once per distinct
  question; the copies per question start at its first cross-attention (`copy_rows`).
- **The focus bias** (`focus_bias`). "What is the shape of the object closest to the red
  object?" takes two looks: first at the red object, then at what is near it. Each head's
  focus is where its cross-attention looked in the layer before (the attention-weighted mean
  (row, column) of the image tokens); the same head in the next layer adds -s * d^2 to its
  scores, d a token's distance from that focus, s learned per head (zero at the start, either
  sign: near for "closest", far for "furthest").
- **Per-query terms** (`focus_per_query`). Each query also adds its own term to s, and sets
  how strongly the head keeps off (or seeks) the very tokens it looked at before, in
  proportion to their share of that look ("inhibition of return": the object closest to the
  red object is never the red object). Both are a linear map of the query, zero at the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmt.config import TransformerConfig
from mmt.layers.cache import KV
from mmt.layers.transformer import DecoderLayer


def copy_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] along dim 0, made with a one-hot matmul: exact, and its backward is a matmul,
    deterministic and fast on the CPU (index_select's backward is a slow scatter-add there,
    plain indexing's is not deterministic)."""
    if not len(index):  # (one_hot cannot size an empty index)
        return x.new_zeros(0, *x.shape[1:])
    pick = F.one_hot(index, x.shape[0]).to(x.dtype)  # (B, U)
    return (pick @ x.reshape(x.shape[0], -1)).view(len(index), *x.shape[1:])


class FusionLayer(DecoderLayer):
    """A non-causal decoder layer; with `focus`, its cross-attention is biased towards or away
    from where each head looked in the layer before (see the module docstring)."""

    def __init__(self, cfg: TransformerConfig, focus: bool = False, per_query: bool = False):
        super().__init__(cfg, causal=False)
        self.focus_scale = nn.Parameter(torch.zeros(cfg.heads)) if focus else None  # s per head
        self.focus_query = None
        if per_query:
            if not focus:
                raise ValueError("focus_per_query refines a focus bias; it needs focus_bias=True")
            # (plain parameters, so that no model-wide weight initialisation touches them)
            self.focus_query = nn.ParameterDict(
                {"weight": nn.Parameter(torch.zeros(2 * cfg.heads, cfg.dim)), "bias": nn.Parameter(torch.zeros(2 * cfg.heads))}
            )
            # listed before the sublayers, as in checkpoints of mmt 0.1 (the order of the
            # parameters is the order the gradient norm sums them in)
            ordered = {"focus_query": self._modules.pop("focus_query"), **self._modules}
            self._modules.clear()
            self._modules.update(ordered)

    def focus(self, h: Tensor, seen: Tensor, positions: Tensor) -> Tensor:
        """The score bias (B, H, T, S) for queries `h` (B, T, D) (the cross-attention's normalised
        input), given where each head's queries looked in the layer before, `seen` (B, H, >= T, S)
        (attention weights), and the context tokens' positions (S, P)."""
        seen = seen[:, :, : h.shape[1]]  # (B, H, T, S)
        positions = positions.to(seen.dtype)
        offsets = (seen @ positions)[:, :, :, None, :] - positions  # (B, H, T, S, P): from each head's centre
        heads = len(self.focus_scale)
        scale = self.focus_scale.to(h.dtype)[:, None]  # (H, 1)
        inhibition = None
        if self.focus_query is not None:
            per_query = F.linear(h, self.focus_query["weight"], self.focus_query["bias"]).transpose(1, 2)  # (B, 2H, T)
            scale = scale + per_query[:, :heads]  # (B, H, T)
            inhibition = per_query[:, heads:, :, None] * (seen / seen.amax(-1, keepdim=True)).to(h.dtype)
        bias = -scale[..., None] * offsets.square().sum(-1).to(h.dtype)
        return bias if inhibition is None else bias - inhibition

    def forward(
        self, x: Tensor, image_kv: KV, text_padding: Tensor | None = None, image_padding: Tensor | None = None, *,
        first: int | None = None, row_index: Tensor | None = None, seen: Tensor | None = None, positions: Tensor | None = None,
        look: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """One fusion layer over question states `x` (the generic decoder layer's sublayers, with
        this model's steps between them): (new states, where each head's cross-attention looked
        for the first `look` queries, or None). `row_index` copies distinct questions to their
        images after the self-attention; `seen` is the layer before's look."""
        x = self.self_attention(x, text_padding, first=first)
        if row_index is not None:
            x = copy_rows(x, row_index)
        h = self.norm2(x) if self.norm_first else x  # what the cross-attention reads
        bias = None
        if self.focus_scale is not None and seen is not None:
            bias = self.focus(h, seen, positions)
        attended = self.cross_attn(h, kv=image_kv, key_padding_mask=image_padding, bias=bias)
        looked = None
        if look is not None:
            looked = self.cross_attn.weights(
                h[:, :look], kv=image_kv, key_padding_mask=image_padding, bias=None if bias is None else bias[:, :, :look]
            )
        x = x + self.drop2(attended) if self.norm_first else self.norm2(x + self.drop2(attended))
        return self.feed_forward(x), looked


class CrossFusion(nn.Module):
    """Question tokens attend to image tokens through `cfg.depth` fusion layers; every layer
    after the first has the focus bias when `focus_bias` is set."""

    def __init__(self, cfg: TransformerConfig, focus_bias: bool = False, focus_per_query: bool = False):
        super().__init__()
        if focus_per_query and not focus_bias:
            raise ValueError("focus_per_query refines a focus bias; it needs focus_bias=True")
        self.focus_bias = focus_bias
        self.layers = nn.ModuleList(
            FusionLayer(cfg, focus_bias and i > 0, focus_per_query and i > 0) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim) if cfg.norm_first else nn.Identity()
        self.activation_checkpointing = False  # training: recompute each layer's activations in backward

    def project_context(self, image_tokens: Tensor) -> list[KV]:
        """Each layer's cross-attention keys/values of the images (I, N, D)."""
        return [layer.cross_attn.project_kv(image_tokens) for layer in self.layers]

    def forward(
        self, text_tokens: Tensor, image_kv: list[KV], *, text_padding: Tensor | None = None,
        image_padding: Tensor | None = None, first: int | None = None, row_index: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Fused question states (Q, T, D), or (Q, first, D).

        Args:
            text_tokens: (U, T, D) question tokens; with `row_index`, the U distinct questions
                that the Q = len(row_index) rows copy (else U = Q).
            image_kv: per layer, the keys/values of the images (`project_context`): Q of them,
                or Q / g when each image's g questions are consecutive.
            text_padding: (U, T) bool, True at padding; image_padding: (Q or Q / g, N).
            first: return only the first `first` positions; the last layer computes no others.
            positions: (N, P) the image tokens' positions (row and column), for the focus bias.
        """
        if self.focus_bias and positions is None:
            raise ValueError("a fusion with a focus bias needs the image tokens' positions")
        if row_index is not None and not self.layers:
            raise ValueError("row_index needs at least one fusion layer (the copies start inside the first)")
        x, seen, last = text_tokens, None, len(self.layers) - 1
        later_padding = text_padding  # the layers after the first see row_index's rows
        if row_index is not None and text_padding is not None:
            later_padding = text_padding[row_index]
        for i, layer in enumerate(self.layers):
            rows = first if i == last else None
            copies, padding = (row_index, text_padding) if i == 0 else (None, later_padding)
            # the next layer needs the look of the rows it computes (all, or `first` if it is the last)
            look = None if not self.focus_bias or i == last else (first if i + 1 == last and first is not None else x.shape[1])
            step = (x, image_kv[i], padding, image_padding)
            options = dict(first=rows, row_index=copies, seen=seen, positions=positions, look=look)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, seen = checkpoint(layer, *step, **options, use_reentrant=False)
            else:
                x, seen = layer(*step, **options)
        return self.norm(x if first is None else x[:, :first])  # (the last layer already kept only those; no layers: here)
