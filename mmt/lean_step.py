"""The decoder's step for one new token, written out as plain tensor operations (decoding on a CPU).

Decoding one token at a time through the decoder's modules costs more in Python than in
arithmetic on a CPU: a small captioner's step makes about 60 module calls, each a few
microseconds of dispatch around a matrix-vector product of similar cost. `LeanStep`
computes what `Decoder` and the output head compute for one new token, with the modules'
own parameters (no copies, so nothing can go stale), with:
- no module call per layer but the activation's: the products, norms and residuals
  written out over the parameters gathered once per decoding (reading each through its
  module every step cost about a fifth of the step);
- self-attention keys/values kept contiguous, grown in preallocated buffers;
- attention through the function `MultiHeadAttention.kernel` gives, so the kernel is the
  one the module uses.
`lean_applies` says when that is the modules' computation (mmt's own embedding and decoder
layers, plain `nn.Embedding`, `nn.Linear` and `nn.LayerNorm`, no hooks, eval mode
throughout). It is the same operations on the same weights but for one: over a large fp32
head a few rows' product is taken as W x^T (see `head_as_columns`), equal up to rounding.

Like the decoder's own cache, a LeanStep is the cache that `generate` hands back to it
(`length`, `select`); it decodes one token per row per call.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.layers.attention import MultiHeadAttention
from mmt.layers.transformer import Decoder, DecoderLayer, FeedForward, Positions1D
from mmt.text import TokenEmbedding


def _global_hooks() -> bool:
    """Whether hooks registered for every module are present (the lean step would skip them)."""
    module = nn.modules.module
    return any(getattr(module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks"))


def lean_applies(embed: nn.Module, decoder: nn.Module, head: nn.Module) -> bool:
    """Whether `LeanStep` computes what the modules compute: mmt's token embedding over a plain
    `nn.Embedding`, a causal text decoder (no focus bias) built of mmt's own layers, plain
    linear layers and LayerNorms (exactly those classes: a subclass's own forward would be
    skipped), every layer with the first one's norm placement and heads, a plain linear head,
    every module in eval mode (no dropout) and without forward hooks."""
    if type(decoder) is not Decoder or decoder.focus_bias or not decoder.layers or type(head) is not nn.Linear:
        return False
    if type(embed) is not TokenEmbedding or type(embed.tokens) is not nn.Embedding or embed.tokens.max_norm is not None:
        return False  # (an embedding with max_norm rescales its rows as it looks them up)
    if type(embed.positions) is not Positions1D or type(decoder.norm) not in (nn.LayerNorm, nn.Identity):
        return False
    shape = None  # (pre-norm, heads, head width): the lean step reads them from the first layer
    for layer in decoder.layers:  # (the outer classes first: the inner ones are read through them)
        if type(layer) is not DecoderLayer or not layer.causal:
            return False
        sa, ca, ffn = layer.self_attn, layer.cross_attn, layer.ffn
        if type(sa) is not MultiHeadAttention or type(ca) is not MultiHeadAttention or type(ffn) is not FeedForward:
            return False
        shape = shape or (layer.norm_first, sa.heads, sa.head_dim)
        if any(s != shape for s in ((layer.norm_first, sa.heads, sa.head_dim), (layer.norm_first, ca.heads, ca.head_dim))):
            return False
        linears = (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ca.q_proj, ca.out_proj, ffn.fc1, ffn.fc2)
        norms = (layer.norm1, layer.norm2, layer.norm3)
        if any(type(m) is not nn.Linear for m in linears) or any(type(m) is not nn.LayerNorm for m in norms):
            return False
    modules = [*embed.modules(), *decoder.modules(), head]
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in modules) and not _global_hooks()


@functools.cache
def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the CPU's highest-level cache as Linux reports it (`caches`: cpu0's cache
    descriptions), or None where it is not reported."""
    sizes, units = {}, {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in caches.glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
            number, unit = (size[:-1], units[size[-1]]) if size[-1:] in units else (size, 1)
            if int(number) > 0:
                sizes[level] = int(number) * unit
        except (OSError, ValueError):  # unreadable, or not a size (an empty file among them)
            continue
    return sizes[max(sizes)] if sizes else None


def head_as_columns(weight: Tensor, rows: int) -> bool:
    """Whether the output head's product for `rows` rows runs as W x^T (then transposed) rather
    than as x W^T. Measured on a 2-core AMD EPYC (32 MiB cache, torch's CPU BLAS, fp32), once
    the head outgrew half the cache:
    - with 2-8 rows x W^T took about as long per row as one row alone, as if W were read
      from memory once per row (a 30,000 x 256 head: 5.3 ms for 3 rows against 2.1 ms for
      one), while W x^T read it once (1.6 ms);
    - one row took 2.1 ms either way, but W x^T for two columns 1.2 ms: so one row goes in
      twice (a 20-token caption: 50 against 76 ms).
    Below half the cache, or in bf16, x W^T was the faster one. So: fp32, 1-8 rows, a head
    larger than half the cache."""
    cache = last_level_cache_bytes()
    big = cache is not None and weight.numel() * weight.element_size() > cache // 2
    return big and rows <= 8 and weight.dtype == torch.float32 and weight.device.type == "cpu"


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


class _Layer(NamedTuple):
    """One decoder layer's parameters (the modules' own tensors, not copies) and attention
    kernels, gathered once per decoding: reading them through the modules costs an attribute
    look-up per tensor per step."""

    norm1: tuple  # F.layer_norm's arguments after the input
    q: tuple[Tensor, Tensor | None]
    k: tuple[Tensor, Tensor | None]
    v: tuple[Tensor, Tensor | None]
    out: tuple[Tensor, Tensor | None]
    self_kernel: Callable[..., Tensor]
    norm2: tuple
    cross_q: tuple[Tensor, Tensor | None]
    cross_out: tuple[Tensor, Tensor | None]
    cross_kernel: Callable[..., Tensor]
    norm3: tuple
    fc1: tuple[Tensor, Tensor | None]
    act: nn.Module
    fc2: tuple[Tensor, Tensor | None]

    @classmethod
    def of(cls, layer: DecoderLayer, like: Tensor) -> "_Layer":
        sa, ca, ffn = layer.self_attn, layer.cross_attn, layer.ffn
        return cls(
            _norm_args(layer.norm1), _params(sa.q_proj), _params(sa.k_proj), _params(sa.v_proj), _params(sa.out_proj),
            sa.kernel(like), _norm_args(layer.norm2), _params(ca.q_proj), _params(ca.out_proj), ca.kernel(like),
            _norm_args(layer.norm3), _params(ffn.fc1), ffn.act, _params(ffn.fc2),
        )


def _params(linear: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return linear.weight, linear.bias


def _norm_args(norm: nn.LayerNorm) -> tuple:
    return norm.normalized_shape, norm.weight, norm.bias, norm.eps


class LeanStep:
    """Decoder + head for one new token per row, as tensor operations; its own cache.

    rows = contexts * g: rows g*i .. g*i+g-1 decode over context i (beams or samples of one
    image), as in `MultiHeadAttention`'s grouped queries. Check `lean_applies` first. The
    modules' parameters are gathered when the step is made: make one per decoding.
    """

    def __init__(
        self, embed: TokenEmbedding, decoder: Decoder, head: nn.Linear, context: Tensor, context_padding: Tensor | None,
        rows: int,
    ):
        C, S, _ = context.shape
        if not C or rows % C:
            raise ValueError(f"{rows} rows cannot share {C} contexts")
        layers: list[DecoderLayer] = list(decoder.layers)
        self.rows, self.groups = rows, rows // C
        self.norm_first = layers[0].norm_first
        self.heads, self.head_dim = layers[0].self_attn.heads, layers[0].self_attn.head_dim
        self.capacity = embed.positions.max_len
        self.cross = [layer.cross_attn.project_kv(context) for layer in layers]  # (C, H, S, Dh) each
        # (C, 1, 1, S): the context tokens each row may look at
        self.cross_allowed = None if context_padding is None else ~context_padding.bool()[:, None, None, :]
        like = self.cross[0].k
        self.layers = [_Layer.of(layer, like) for layer in layers]
        self.tokens, self.positions = embed.tokens.weight, embed.positions.table
        # (post-norm layers end normalised: the decoder's final norm is then an identity)
        self.final_norm = _norm_args(decoder.norm) if type(decoder.norm) is nn.LayerNorm else None
        self.head = _params(head)
        self.head_as_columns = head_as_columns(head.weight, rows)
        # per layer, keys and values (N, H, length, Dh), each kept contiguous in one of two
        # preallocated buffers: a step writes the grown (or reordered) cache into the other one
        size = rows * self.heads * self.capacity * self.head_dim
        self.self_kv = [(_TwoBuffers(size, like), _TwoBuffers(size, like)) for _ in layers]
        self.length = 0  # positions fed so far

    def _layer(self, x: Tensor, i: int) -> Tensor:
        """x (N, D) through layer i, appending the new token's keys/values to its cache."""
        p, (N, D) = self.layers[i], x.shape
        H, Dh, g = self.heads, self.head_dim, self.groups

        h = F.layer_norm(x, *p.norm1) if self.norm_first else x
        keys, values = self.self_kv[i]
        keys.append(F.linear(h, *p.k).view(N, H, 1, Dh))
        values.append(F.linear(h, *p.v).view(N, H, 1, Dh))
        attended = p.self_kernel(F.linear(h, *p.q).view(N, H, 1, Dh), keys.now, values.now)  # (N, H, 1, Dh)
        y = F.linear(attended.reshape(N, D), *p.out)
        x = x + y if self.norm_first else F.layer_norm(x + y, *p.norm1)

        h = F.layer_norm(x, *p.norm2) if self.norm_first else x
        q = F.linear(h, *p.cross_q).view(N // g, g, H, Dh).transpose(1, 2)  # (C, H, g, Dh)
        cross = self.cross[i]
        attended = p.cross_kernel(q, cross.k, cross.v, self.cross_allowed).transpose(1, 2)  # (C, g, H, Dh)
        y = F.linear(attended.reshape(N, D), *p.cross_out)
        x = x + y if self.norm_first else F.layer_norm(x + y, *p.norm2)

        h = F.layer_norm(x, *p.norm3) if self.norm_first else x
        y = F.linear(p.act(F.linear(h, *p.fc1)), *p.fc2)
        return x + y if self.norm_first else F.layer_norm(x + y, *p.norm3)

    def __call__(self, ids: Tensor, cache: "LeanStep") -> tuple[Tensor, "LeanStep"]:
        """Logits (rows, V) of the token after `ids` (rows, 1), the newest token of each row."""
        if cache is not self:
            raise ValueError("a LeanStep is its own cache: pass it to generate as cache=")
        if tuple(ids.shape) != (self.rows, 1):
            raise ValueError(f"a LeanStep takes one new token for each of {self.rows} rows, got ids of shape {tuple(ids.shape)}")
        if self.length >= self.capacity:
            raise ValueError(f"all {self.capacity} positions of the decoder are used")
        x = F.embedding(ids[:, 0], self.tokens)  # (N, D)
        x = x + self.positions[self.length].to(x.dtype)
        for i in range(len(self.layers)):
            x = self._layer(x, i)
        if self.final_norm is not None:
            x = F.layer_norm(x, *self.final_norm)
        if self.head_as_columns:  # (W x^T)^T: the same products, W read once (see head_as_columns)
            weight, bias = self.head
            columns = torch.cat([x, x]).t() if self.rows == 1 else x.t()  # (one row goes in twice)
            logits = torch.mm(weight, columns) if bias is None else torch.addmm(bias[:, None], weight, columns)
            logits = logits[:, : self.rows].t()
        else:
            logits = F.linear(x, *self.head)
        self.length += 1
        return logits, self

    def select(self, index: Tensor, cross: bool = True) -> "LeanStep":
        """Reorder rows (beam search) in place; the context keys/values are per context and
        shared by its rows, so `cross` must be False."""
        if cross:
            raise ValueError("a LeanStep's context keys/values are shared by each context's rows and are never reordered")
        for kv in self.self_kv:
            for buffers in kv:
                buffers.reorder(index)
        return self
