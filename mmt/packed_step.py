"""The decoder's step for one new token, written out over packed weights (eager decoding on a CPU).

Decoding one token at a time through the decoder's modules costs more in Python than in
arithmetic on a CPU: a small captioner's step makes about 60 module calls, each a few
microseconds of dispatch around a matrix-vector product of similar cost. `PackedStep`
computes what `Decoder` computes for one new token, as plain tensor operations (products
read in another layout may round differently):
- per layer, the self-attention's query, key and value projections as one product;
- in fp32 for up to 3 rows (one image, greedy or a beam of 3), every weight transposed once to
  (in, out): the layout in which the CPU's fp32 product with so few rows ran fastest here
  (twice as fast for a 30,000-word output head, about 10% for the layers); from 4 rows on,
  and in bf16, the modules' (out, in) layout was as fast or faster (by up to 20% at 8 rows)
  and is read as it is;
- self-attention keys/values kept contiguous, grown in preallocated buffers;
- attention through `MultiHeadAttention.attend`, so the kernel is the one the module uses.
The packed weights (the fused projection, the transposed copies) are kept on the model and
made again when any weight changes (moved, retyped, trained, or loaded: every in-place
write bumps a tensor's version). A model whose weights were made in inference mode (they
keep no version) packs at every call.

Like the decoder's own cache, a PackedStep is the cache that `generate` hands back to it
(`length`, `select`); it decodes one token per row per call.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.layers.attention import MultiHeadAttention
from mmt.layers.transformer import Decoder, DecoderLayer
from mmt.text import TokenEmbedding


@dataclasses.dataclass
class _PackedLayer:
    """One decoder layer's weights, each (in, out) or each (out, in), and the modules read as they are."""

    qkv: Tensor  # (D, 3D) or (3D, D): self-attention W^Q | W^K | W^V
    qkv_bias: Tensor
    out: Tensor  # self-attention W^O
    out_bias: Tensor
    cross_q: Tensor  # cross-attention W^Q (its keys/values are projected once per context)
    cross_q_bias: Tensor
    cross_out: Tensor
    cross_out_bias: Tensor
    fc1: Tensor  # (D, F) or (F, D)
    fc1_bias: Tensor
    fc2: Tensor
    fc2_bias: Tensor
    layer: DecoderLayer  # norms, activation, attention kernels, cross-attention key/value projection


def packs(decoder: nn.Module, head: nn.Module) -> bool:
    """Whether `PackedStep` computes what `decoder` and `head` compute: a causal text decoder
    (no focus bias) and a linear output head."""
    return (
        isinstance(decoder, Decoder) and not decoder.focus_bias and isinstance(head, nn.Linear)
        and all(layer.causal for layer in decoder.layers) and len(decoder.layers) > 0
    )


def _versions(*modules: nn.Module) -> tuple | None:
    """Where every weight lives and how often it was written in place: a change in either
    means packed copies are stale. None when a weight was made in inference mode: such a
    tensor keeps no version, so its copies cannot be kept."""
    params = list(itertools.chain.from_iterable(m.parameters() for m in modules))
    if any(p.is_inference() for p in params):
        return None
    return tuple((p.data_ptr(), p._version) for p in params)


FEW_ROWS = 3  # up to this many rows, fp32 products read transposed weights (see above)


@dataclasses.dataclass
class _Weights:
    """The decoder's and the head's weights in one layout."""

    layers: list[_PackedLayer]
    head: Tensor  # the output head's weight
    transposed: bool  # weights (in, out); else (out, in), as the modules hold them

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x W^T + b for a weight packed here."""
        if not self.transposed:
            return F.linear(x, weight, bias)
        return x @ weight if bias is None else torch.addmm(bias, x, weight)


def _pack(decoder: Decoder, head: nn.Linear) -> tuple[_Weights, _Weights | None]:
    """The weights in the modules' layout (Q|K|V fused), and transposed copies in fp32."""
    plain = _layout(decoder, head, transposed=False)
    return plain, _layout(decoder, head, transposed=True) if head.weight.dtype == torch.float32 else None


def _layout(decoder: Decoder, head: nn.Linear, transposed: bool) -> _Weights:
    def t(w: Tensor) -> Tensor:
        return w.t().contiguous() if transposed else w

    layers = []
    for layer in decoder.layers:
        sa, ca = layer.self_attn, layer.cross_attn
        layers.append(_PackedLayer(
            t(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])),
            torch.cat([sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias]),
            t(sa.out_proj.weight), sa.out_proj.bias,
            t(ca.q_proj.weight), ca.q_proj.bias, t(ca.out_proj.weight), ca.out_proj.bias,
            t(layer.ffn.fc1.weight), layer.ffn.fc1.bias, t(layer.ffn.fc2.weight), layer.ffn.fc2.bias,
            layer,
        ))
    return _Weights(layers, t(head.weight), transposed)


class _TwoBuffers:
    """Keys or values (N, H, length, Dh) that grow by one position per step, always contiguous,
    without allocating per step: each change is written into the other of two preallocated
    buffers. (Measured at 300 rows: the attention kernel ran the self-attention about half as
    fast over a slice of preallocated slots; and a new cache tensor per step costs page faults
    with glibc's allocator: a beam search ran 13% faster when told to keep memory.)"""

    def __init__(self, size: int, like: Tensor):
        self.buffers = [like.new_empty(size), like.new_empty(size)]
        self.spare = 0  # the buffer the next change is written into
        self.now: Tensor | None = None

    def _into(self, shape: tuple[int, ...]) -> Tensor:
        out = self.buffers[self.spare][: math.prod(shape)].view(shape)
        self.spare = 1 - self.spare
        return out

    def append(self, new: Tensor) -> None:
        """Add `new` (N, H, 1, Dh) as the last position."""
        if self.now is None:
            self.now = self._into(new.shape).copy_(new)
        else:
            N, H, length, Dh = self.now.shape
            self.now = torch.cat([self.now, new], dim=2, out=self._into((N, H, length + 1, Dh)))

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (N,), in that order."""
        if self.now is not None:
            self.now = torch.index_select(self.now, 0, index, out=self._into(self.now.shape))


def _norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class PackedStep:
    """Decoder + head for one new token per row over packed weights; its own cache.

    rows = contexts * g: rows g*i .. g*i+g-1 decode over context i (beams or samples of one
    image), as in `MultiHeadAttention`'s grouped queries.
    """

    def __init__(
        self, embed: TokenEmbedding, decoder: Decoder, head: nn.Linear, weights: _Weights,
        context: Tensor, context_padding: Tensor | None, rows: int,
    ):
        C, S, _ = context.shape
        if not C or rows % C:
            raise ValueError(f"{rows} rows cannot share {C} contexts")
        self.embed, self.decoder, self.head = embed, decoder, head
        self.weights, self.layers = weights, weights.layers
        self.rows, self.groups = rows, rows // C
        self.norm_first = decoder.layers[0].norm_first
        attn: MultiHeadAttention = decoder.layers[0].self_attn
        self.heads, self.head_dim = attn.heads, attn.head_dim
        self.capacity = embed.positions.max_len
        self.cross = [p.layer.cross_attn.project_kv(context) for p in self.layers]  # (C, H, S, Dh) each
        # (C, 1, 1, S): the context tokens each row may look at
        self.cross_allowed = None if context_padding is None else ~context_padding.bool()[:, None, None, :]
        # per layer, keys and values (N, H, length, Dh), each kept contiguous in one of two
        # preallocated buffers: a step writes the grown (or reordered) cache into the other one
        size = rows * self.heads * self.capacity * self.head_dim
        like = self.cross[0].k
        self.self_kv = [(_TwoBuffers(size, like), _TwoBuffers(size, like)) for _ in self.layers]
        self.length = 0  # positions fed so far

    def _layer(self, x: Tensor, i: int) -> Tensor:
        """x (N, D) through layer i, appending the new token's keys/values to its cache."""
        p, layer = self.layers[i], self.layers[i].layer
        N, D = x.shape
        H, Dh, g = self.heads, self.head_dim, self.groups

        h = _norm(x, layer.norm1) if self.norm_first else x
        linear = self.weights.linear
        q, k, v = linear(h, p.qkv, p.qkv_bias).view(N, 3, H, Dh).unbind(1)  # (N, H, Dh) each
        keys, values = self.self_kv[i]
        keys.append(k[:, :, None])
        values.append(v[:, :, None])
        attended = layer.self_attn.attend(q[:, :, None], keys.now, values.now)  # (N, H, 1, Dh)
        y = linear(attended.view(N, D), p.out, p.out_bias)
        x = x + y if self.norm_first else _norm(x + y, layer.norm1)

        h = _norm(x, layer.norm2) if self.norm_first else x
        q = linear(h, p.cross_q, p.cross_q_bias).view(N // g, g, H, Dh).transpose(1, 2)  # (C, H, g, Dh)
        cross = self.cross[i]
        attended = layer.cross_attn.attend(q, cross.k, cross.v, self.cross_allowed).transpose(1, 2)  # (C, g, H, Dh)
        y = linear(attended.reshape(N, D), p.cross_out, p.cross_out_bias)
        x = x + y if self.norm_first else _norm(x + y, layer.norm2)

        h = _norm(x, layer.norm3) if self.norm_first else x
        y = linear(layer.ffn.act(linear(h, p.fc1, p.fc1_bias)), p.fc2, p.fc2_bias)
        return x + y if self.norm_first else _norm(x + y, layer.norm3)

    def __call__(self, ids: Tensor, cache: "PackedStep") -> tuple[Tensor, "PackedStep"]:
        """Logits (rows, V) of the token after `ids` (rows, 1), the newest token of each row."""
        if cache is not self:
            raise ValueError("a PackedStep is its own cache: pass it to generate as cache=")
        if tuple(ids.shape) != (self.rows, 1):
            raise ValueError(f"a PackedStep takes one new token for each of {self.rows} rows, got ids of shape {tuple(ids.shape)}")
        if self.length >= self.capacity:
            raise ValueError(f"all {self.capacity} positions of the decoder are used")
        x = self.embed(ids, self.length)[:, 0]  # (N, D)
        for i in range(len(self.layers)):
            x = self._layer(x, i)
        logits = self.weights.linear(self.decoder.norm(x), self.weights.head, self.head.bias)
        self.length += 1
        return logits, self

    def select(self, index: Tensor, cross: bool = True) -> "PackedStep":
        """Reorder rows (beam search) in place; the context keys/values are per context and
        shared by its rows, so `cross` must be False."""
        if cross:
            raise ValueError("a PackedStep's context keys/values are shared by each context's rows and are never reordered")
        for kv in self.self_kv:
            for buffers in kv:
                buffers.reorder(index)
        return self


def packed_step(
    owner: nn.Module, embed: TokenEmbedding, decoder: Decoder, head: nn.Linear, context: Tensor, context_padding: Tensor | None,
    rows: int,
) -> PackedStep:
    """A PackedStep for `rows` rows over `context` (C, S, Dc); the packed weights are kept on
    `owner` and packed again when a weight has changed."""
    key = _versions(decoder, head)
    kept = owner.__dict__.get("_packed_weights")
    if key is None or kept is None or kept[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable in and out of inference mode
            kept = (key, _pack(decoder, head))
        if key is not None:
            owner.__dict__["_packed_weights"] = kept
    plain, transposed = kept[1]
    weights = transposed if transposed is not None and rows <= FEW_ROWS else plain
    return PackedStep(embed, decoder, head, weights, context, context_padding, rows)
