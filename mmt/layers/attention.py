"""Multi-head attention, self or cross, with masks, an additive score bias and a key/value cache.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + bias) V               (Vaswani et al. 2017, eq. 1)
MultiHead(X, C) = Concat(head_1..head_h) W^O,  head_i = Attention(X W_i^Q, C W_i^K, C W_i^V)

The per-head projections W_i^Q (d_model x d_k) are stored side by side as one d_model x
d_model linear layer per role; splitting its output into h slices is exactly the per-head
form. Self-attention is `attn(x)`, cross-modal attention is `attn(x, context)`: nothing
else differs. The bias is the generic hook for anything that scores keys by more than
their content (a relative-position table, a model's own research); it is added before
the softmax.

The kernel is a runtime setting, not part of a model (`attention_kernel`, as timm's
`set_fused_attn`): torch's fused `scaled_dot_product_attention`, or the formula written out
(`reference_attention`, the reference the fused kernel is tested against).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.layers.cache import KV, LayerCache

Kernel = Literal["auto", "fused", "literal"]
KERNELS: tuple[str, ...] = ("auto", "fused", "literal")
_kernel: Kernel = "auto"


def set_attention_kernel(kind: Kernel) -> Kernel:
    """Choose the attention kernel for the whole process; returns the previous choice.

    "auto" (the default): torch's fused kernel, except on a CPU in bf16 without a score bias,
    where the literal formula trains faster (its scores are still summed and normalised in
    fp32); "fused": the fused kernel wherever it applies; "literal": always the formula.
    """
    global _kernel
    if kind not in KERNELS:
        raise ValueError(f"attention kernel {kind!r} is not one of {', '.join(KERNELS)}")
    previous, _kernel = _kernel, kind
    return previous


def current_kernel() -> Kernel:
    """The attention kernel setting in force (see `set_attention_kernel`)."""
    return _kernel


@contextlib.contextmanager
def attention_kernel(kind: Kernel) -> Iterator[None]:
    """`with attention_kernel("literal"): ...` runs the block with that kernel (see `set_attention_kernel`)."""
    previous = set_attention_kernel(kind)
    try:
        yield
    finally:
        set_attention_kernel(previous)


def fused_applies(q: Tensor, bias: Tensor | None) -> bool:
    """Whether attention over queries like `q` takes torch's fused kernel under the current setting."""
    if _kernel != "auto":
        return _kernel == "fused"
    # on a CPU in bf16 without a bias the literal path trains faster (docs/lab-notes.md,
    # 2026-11-28); with a bias that needs a gradient torch runs its own fp32 path, kept as it is
    return not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and bias is None)


def causal_allowed(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """(q_len, k_len) bool, True where query i may see key j.

    Bottom-right aligned: with k_len - q_len earlier keys, query i sits at absolute position
    k_len - q_len + i and sees every key up to it.
    """
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def build_attention_mask(
    key_padding_mask: Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device,
    allowed: Tensor | None = None,
) -> Tensor | None:
    """One bool mask, True = may attend, from padding (B, S) (True at padding, torch's
    convention), a causal rule and a mask `allowed` (T, S) that a cache gives.
    Returns (B, 1, T, S), (T, S) or None when nothing is masked. The causal rule masks nothing
    for one query (it sits at the last position: a decoding step over a growing cache)."""
    if causal and q_len > 1:
        causal_mask = causal_allowed(q_len, k_len, device)  # (T, S)
        allowed = causal_mask if allowed is None else allowed & causal_mask
    if key_padding_mask is not None:
        keep = ~key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        allowed = keep if allowed is None else keep & allowed
    return allowed


class _ScoresInFp32(torch.autograd.Function):
    """scale * q k^T for q (..., T, Dh), k (..., S, Dh) in bf16 or fp16, as fp32 scores: the
    exact products of the inputs, summed in fp32, as a fused kernel takes them. The two
    backward products run in the inputs' precision (the incoming gradient rounded to it),
    as a fused kernel's backward does: in fp32 they would be the slowest part of the
    attention's backward on a CPU."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(q, k)
        ctx.scale = scale
        with torch.autocast(q.device.type, enabled=False):
            return (q.float() * scale) @ k.float().transpose(-2, -1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        q, k = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            g = grad.to(q.dtype)
            dq = (g @ k) * ctx.scale if ctx.needs_input_grad[0] else None  # scaled here: smaller than g
            dk = (g.transpose(-2, -1) @ q) * ctx.scale if ctx.needs_input_grad[1] else None
        return dq, dk, None


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, dropout_p: float = 0.0, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k) + bias) V computed literally; returns (output, weights).

    q: (B, H, T, Dh), k and v: (B, H, S, Dh); weights: (B, H, T, S); bias broadcasts to them.
    In bf16 or fp16 (inputs, or autocast) the scores are still taken, biased and normalised
    in fp32, as a fused kernel accumulates them (a bf16 product would round them to steps
    of 1/16 at 10); the product of the weights with V and the backward products run in the
    lower precision.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])  # applied to q, not to the larger scores
    low = q.dtype if q.dtype in (torch.bfloat16, torch.float16) else None
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):  # autocast would round q and k
        low = torch.get_autocast_dtype(q.device.type)
    if low is not None:
        scores = _ScoresInFp32.apply(q.to(low), k.to(low), scale)  # (B, H, T, S)
    else:
        scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights.to(v.dtype) @ v, weights


def attend(
    q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None, causal: bool = False,
    allowed: Tensor | None = None, bias: Tensor | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q k^T / sqrt(d_k) + bias) v for queries already split into heads, q (B, H, T, Dh),
    k and v (B, H, S, Dh), through the kernel the current setting chooses. Masks as in
    `build_attention_mask`; `bias` broadcasts to (B, H, T, S)."""
    T, S = q.shape[-2], k.shape[-2]
    if not fused_applies(q, bias):
        mask = build_attention_mask(key_padding_mask, causal, T, S, q.device, allowed)
        return reference_attention(q, k, v, mask, dropout_p, bias)[0]
    if causal and key_padding_mask is None and allowed is None and bias is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = build_attention_mask(key_padding_mask, causal, T, S, q.device, allowed)
    if bias is not None:  # one additive mask: the bias, -inf where attention is not allowed
        mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Multi-head attention over `x` (self) or over `context` (cross-modal).

    Args:
        dim: model width d_model.
        heads: number of heads h; d_k = d_v = dim // heads.
        dropout: dropout on the attention weights while training.
        context_dim: width of the context tokens for cross-attention (default dim).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        context_dim = context_dim or dim
        self.q_proj = nn.Linear(dim, dim)  # W^Q for all heads
        self.k_proj = nn.Linear(context_dim, dim)  # W^K
        self.v_proj = nn.Linear(context_dim, dim)  # W^V
        self.out_proj = nn.Linear(dim, dim)  # W^O

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, H * Dh) -> (B, H, T, Dh)."""
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, context: Tensor) -> KV:
        """Keys and values of `context` (B, S, Dc) -> KV of (B, H, S, Dh): what cross-attention
        reads, computed once per image and reused by every query and decoding step."""
        return KV(self.split_heads(self.k_proj(context)), self.split_heads(self.v_proj(context)))

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        kv: KV | None = None,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        bias: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Attend from `x` (B, T, D) to `context` (B, S, Dc), or to `x` itself.

        Args:
            kv: the context's keys/values projected already (`project_kv`); `context` is then
                not needed. Contexts (given or projected) may number B / g for B query
                sequences: sequences g*i .. g*i+g-1 then all attend to context i (several
                questions about one image, several beams of one caption), without copies.
            key_padding_mask: (B or B / g, S) bool, True where a key is padding.
            causal: mask keys that come after each query (self-attention without a cache).
            bias: added to the scores, broadcastable to (B, H, T, S). With shared contexts,
                only a bias given per query, (B, H or 1, T, S), is allowed.
            cache: this layer's self-attention keys/values of earlier steps (`mmt.layers.cache`);
                the new keys/values are stored in it and all are attended (with `causal`, each
                new query sees the positions up to its own).
        Returns:
            (B, T, D).
        """
        B, T, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        allowed = None  # (T, S): what a cache lets each new query see
        if kv is None:
            kv = self.project_kv(x if context is None else context)
        if cache is not None:
            kv, allowed = cache.update(kv)
        contexts = kv.k.shape[0]
        groups = B // contexts if contexts else 1  # (an empty batch has no contexts)
        if groups == 1 and contexts == B:
            out = attend(
                q, kv.k, kv.v, key_padding_mask=key_padding_mask, causal=causal, allowed=allowed, bias=bias,
                dropout_p=self.dropout if self.training else 0.0,
            )
            return self.out_proj(out.transpose(1, 2).reshape(B, T, D))
        return self._shared_contexts(q, kv, groups, key_padding_mask, causal, allowed, bias)

    def _shared_contexts(
        self, q: Tensor, kv: KV, groups: int, key_padding_mask: Tensor | None, causal: bool, allowed: Tensor | None,
        bias: Tensor | None,
    ) -> Tensor:
        """Attention when each of B / g contexts serves g consecutive query sequences: attention is
        independent per query, so each context's query sequences are laid end to end and attend
        once, instead of copying the keys/values per sequence."""
        B, H, T, Dh = q.shape
        S, contexts = kv.k.shape[2], kv.k.shape[0]
        per_query_bias = bias is not None and bias.dim() == 4 and bias.shape[0] == B and bias.shape[2] == T
        if (B % contexts if contexts else B) or causal or allowed is not None or (bias is not None and not per_query_bias):
            detail = (
                " causally" if causal or allowed is not None
                else " with a score bias not given per query (B, H, T, S)" if bias is not None else ""
            )
            raise ValueError(f"{B} query sequences cannot share {contexts} contexts{detail}")
        q = q.view(-1, groups, H, T, Dh).transpose(1, 2).reshape(-1, H, groups * T, Dh)  # (B / g, H, g * T, Dh)
        if bias is not None:  # laid out like the queries
            bias = bias.expand(B, H, T, S).reshape(-1, groups, H, T, S).transpose(1, 2).reshape(-1, H, groups * T, S)
        out = attend(q, kv.k, kv.v, key_padding_mask=key_padding_mask, bias=bias, dropout_p=self.dropout if self.training else 0.0)
        out = out.view(-1, H, groups, T, Dh).transpose(1, 2).reshape(B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, H * Dh))

    def weights(
        self, x: Tensor, context: Tensor | None = None, *, kv: KV | None = None, key_padding_mask: Tensor | None = None,
        causal: bool = False, bias: Tensor | None = None,
    ) -> Tensor:
        """Where each head of each query in `x` (B, T, D) looks: its attention weights (B, H, T, S),
        computed literally, without dropout. Arguments as in `forward` (contexts may be shared;
        `bias` is then per query). Asked for apart from `forward`, so that a caller who wants the
        weights of a few rows keeps the fused kernel for the rest."""
        B, T, _ = x.shape
        if kv is None:
            kv = self.project_kv(x if context is None else context)
        C, H, S, Dh = kv.k.shape
        if not C or B % C:
            raise ValueError(f"{B} query sequences cannot share {C} contexts")
        q = self.split_heads(self.q_proj(x)).reshape(C, B // C, H, T, Dh)
        scores = torch.einsum("cghtd,chsd->cghts", q, kv.k) / math.sqrt(Dh)  # (C, g, H, T, S)
        if bias is not None:
            scores = scores + bias.expand(B, H, T, S).reshape(C, B // C, H, T, S)
        if key_padding_mask is not None:  # (C, S), one row per context
            scores = scores.masked_fill(key_padding_mask.bool().reshape(C, 1, 1, 1, S), float("-inf"))
        if causal:
            scores = scores.masked_fill(~causal_allowed(T, S, x.device), float("-inf"))
        return scores.softmax(dim=-1).reshape(B, H, T, S)
