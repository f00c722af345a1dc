"""Multi-head attention, self or cross, with masks and an explicit key/value cache.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V                (Vaswani et al. 2017, eq. 1)
MultiHead(X, C) = Concat(head_1..head_h) W^O,  head_i = Attention(X W_i^Q, C W_i^K, C W_i^V)

The per-head projections W_i^Q (d_model x d_k) are stored side by side as one
d_model x d_model linear layer per role; splitting its output into h slices is exactly
the per-head form. Self-attention is `attn(x)`, cross-modal attention is
`attn(x, context=image_tokens)`: nothing else differs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KV(NamedTuple):
    """Projected keys and values, (B, H, S, Dh) each: what a cache stores per attention."""

    k: Tensor
    v: Tensor


class SlotKV(NamedTuple):
    """A preallocated self-attention cache: k and v (B, H, S, Dh) hold S slots, of which the
    new tokens' keys/values are written in place at `positions` (T,); `allowed` (T, S) bool
    says which slots each new token may see (those up to its own position). Nothing about
    it depends on how many tokens came before, so a step using it has fixed shapes (what a
    CUDA graph needs)."""

    k: Tensor
    v: Tensor
    positions: Tensor
    allowed: Tensor


def causal_allowed(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """(q_len, k_len) bool, True where query i may see key j.

    Bottom-right aligned: with a cache of k_len - q_len earlier keys, query i sits at
    absolute position k_len - q_len + i and sees every key up to it.
    """
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def build_attention_mask(
    key_padding_mask: Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Combine padding and causal masks into one bool mask, True = may attend.

    Args:
        key_padding_mask: (B, S) bool, True where the key is padding (torch's convention).
        causal: block keys later than each query.
    Returns (B, 1, T, S), (T, S) or None when nothing is masked.
    """
    allowed = None
    if causal:
        allowed = causal_allowed(q_len, k_len, device)  # (T, S)
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


def _literal_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None) -> Tensor:
    """`reference_attention`'s output alone, called like torch's fused kernel."""
    return reference_attention(q, k, v, allowed)[0]


class MultiHeadAttention(nn.Module):
    """Multi-head attention over `x` (self) or over `context` (cross-modal).

    Args:
        dim: model width d_model.
        heads: number of heads h; d_k = d_v = dim // heads.
        dropout: dropout on the attention weights while training.
        context_dim: width of the context tokens for cross-attention (default dim).
        fast: use torch's fused scaled_dot_product_attention when weights are not requested
            (on a CPU in bf16 only with a score bias: without one its bf16 kernel is slower
            than the literal path there).
        fused_on_bf16_cpu: with `fast`, use the fused kernel on a CPU in bf16 as well.
    """

    def __init__(
        self, dim: int, heads: int, dropout: float = 0.0, context_dim: int | None = None, fast: bool = True,
        fused_on_bf16_cpu: bool = False,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.fast = fast
        self.fused_on_bf16_cpu = fused_on_bf16_cpu
        context_dim = context_dim or dim
        self.q_proj = nn.Linear(dim, dim)  # W^Q for all heads
        self.k_proj = nn.Linear(context_dim, dim)  # W^K
        self.v_proj = nn.Linear(context_dim, dim)  # W^V
        self.out_proj = nn.Linear(dim, dim)  # W^O

    def _split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, source: Tensor) -> KV:
        """Keys and values of `source` (B, S, D) -> KV of (B, H, S, Dh)."""
        return KV(self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source)))

    def looked_at(self, x: Tensor, kv: KV, key_padding_mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """Where each head of each query in `x` (B, T, D) looks among keys `kv`: its attention
        weights, (B, H, T, S).

        The same weights as `forward` over `static_kv=kv`, without dropout, computed apart:
        callers want them for a few rows (e.g. only [CLS]) while `forward` takes the fused path.
        Contexts may be shared (B / g of them) as in `forward`; `bias` is then per query.
        """
        B, T, _ = x.shape
        C, H, S, Dh = kv.k.shape
        if not C or B % C:
            raise ValueError(f"{B} query sequences cannot share {C} contexts")
        q = self._split_heads(self.q_proj(x)).reshape(C, B // C, H, T, Dh)
        scores = torch.einsum("cghtd,chsd->cghts", q, kv.k) / math.sqrt(Dh)  # (C, g, H, T, S)
        if bias is not None:
            scores = scores + bias.expand(B, H, T, S).reshape(C, B // C, H, T, S)
        if key_padding_mask is not None:  # (C, S), one row per context
            scores = scores.masked_fill(key_padding_mask.bool().reshape(C, 1, 1, 1, S), float("-inf"))
        return scores.softmax(dim=-1).reshape(B, H, T, S)

    def _fused(self, q: Tensor, bias: Tensor | None, need_weights: bool) -> bool:
        """Whether attention takes torch's fused kernel (else the literal path)."""
        # the kernel, except on a CPU in bf16 without a score bias: there the literal path (its
        # scores in fp32, like the kernel's) trained a hidden-512 model over 161 tokens and the
        # Sort-of-CLEVR model about 1.2x as fast; in fp32 the kernel is the faster one. With a
        # bias that needs a gradient torch computes attention on its own fp32 path, kept as it is.
        literal_faster = q.device.type == "cpu" and q.dtype == torch.bfloat16 and bias is None
        return self.fast and not need_weights and (self.fused_on_bf16_cpu or not literal_faster)

    def kernel(self, like: Tensor) -> Callable[..., Tensor]:
        """The attention `forward` would compute for queries of `like`'s dtype and device,
        without dropout or bias, as a function (q, k, v, allowed=None) -> softmax(q k^T /
        sqrt(d_k)) v of queries already projected and split into heads: q (B, H, T, Dh), k and
        v (B, H, S, Dh), `allowed` bool broadcastable to (B, H, T, S) or None. For callers that
        do the projections themselves and choose once per decoding (the lean decoding step)."""
        return F.scaled_dot_product_attention if self._fused(like, None, False) else _literal_attention

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        past_kv: KV | None = None,
        static_kv: KV | None = None,
        need_weights: bool = False,
        bias: Tensor | None = None,
    ) -> tuple[Tensor, KV, Tensor | None]:
        """Attend from `x` (B, T, D) to `context` (B, S, D), or to `x` itself.

        Args:
            key_padding_mask: (B, S_total) bool, True where a key is padding.
            causal: mask keys that come after each query (self-attention only).
            past_kv: self-attention keys/values of earlier steps; new ones are appended (a
                `SlotKV`: written into its slots, and only the allowed slots are attended).
            static_kv: precomputed context keys/values (cross-attention cache); `context`
                is then not projected again. Contexts (given or cached) may number B / g for
                B query sequences: then sequences g*i .. g*i+g-1 all attend to context i.
            need_weights: also return the attention weights (takes the reference path).
            bias: added to the attention scores before the softmax, broadcastable to
                (B, H, T, S), e.g. a learned bias per head for each relative position. With
                shared contexts, only a bias given per query, (B, H or 1, T, S), is allowed.
        Returns:
            (output (B, T, D), the keys/values used (to cache), weights (B, H, T, S) or None).
        """
        B, T, D = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, H, T, Dh)
        slots_allowed = None  # (T, S) or (B, 1, T, S) with a slot cache
        if static_kv is not None:
            kv = static_kv
        else:
            kv = self.project_kv(x if context is None else context)
            if isinstance(past_kv, SlotKV):
                past_kv.k.index_copy_(2, past_kv.positions, kv.k)
                past_kv.v.index_copy_(2, past_kv.positions, kv.v)
                kv = KV(past_kv.k, past_kv.v)
                slots_allowed = past_kv.allowed if key_padding_mask is None else past_kv.allowed & ~key_padding_mask.bool()[:, None, None, :]
                key_padding_mask, causal = None, False  # both are in slots_allowed
            elif past_kv is not None:
                kv = KV(torch.cat([past_kv.k, kv.k], dim=2), torch.cat([past_kv.v, kv.v], dim=2))
        S = kv.k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        fused = self._fused(q, bias, need_weights)
        contexts = kv.k.shape[0]
        groups = B // contexts if contexts else 1  # (an empty batch has no contexts)
        per_query_bias = bias is not None and bias.dim() == 4 and bias.shape[0] == B and bias.shape[2] == T
        if (B % contexts if contexts else B) or (groups > 1 and (causal or (bias is not None and not per_query_bias))):
            detail = " causally" if causal else " with a score bias not given per query (B, H, T, S)" if bias is not None else ""
            raise ValueError(f"{B} query sequences cannot share {contexts} contexts{detail}")
        if groups > 1:
            # Several query sequences share each context (e.g. 20 questions about one image):
            # attention is independent per query, so each context's query sequences are laid
            # end to end and attend once, instead of copying the keys/values per sequence.
            q = q.view(-1, groups, self.heads, T, self.head_dim).transpose(1, 2)  # (B / g, H, g, T, Dh)
            q = q.reshape(-1, self.heads, groups * T, self.head_dim)  # (B / g, H, g * T, Dh)
            if bias is not None:  # laid out like the queries
                bias = bias.expand(B, self.heads, T, S).reshape(-1, groups, self.heads, T, S).transpose(1, 2)
                bias = bias.reshape(-1, self.heads, groups * T, S)

        weights = None
        if slots_allowed is not None:
            if bias is not None:
                raise ValueError("a score bias cannot be combined with a slot cache")
            if fused:
                out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=slots_allowed, dropout_p=dropout_p)
            else:
                out, weights = reference_attention(q, kv.k, kv.v, slots_allowed, dropout_p)
        elif fused:
            if causal and key_padding_mask is None and T == S and bias is None:
                out = F.scaled_dot_product_attention(q, kv.k, kv.v, dropout_p=dropout_p, is_causal=True)
            else:
                mask = build_attention_mask(key_padding_mask, causal and T > 1, T, S, x.device)
                if bias is not None:  # one additive mask: the bias, -inf where attention is not allowed
                    mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
                out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=mask, dropout_p=dropout_p)
        else:
            allowed = build_attention_mask(key_padding_mask, causal, T, S, x.device)
            out, weights = reference_attention(q, kv.k, kv.v, allowed, dropout_p, bias)
        if groups > 1:
            out = out.view(-1, self.heads, groups, T, self.head_dim).transpose(1, 2)  # (B / g, g, H, T, Dh)
            out = out.reshape(B, self.heads, T, self.head_dim)
            weights = None if weights is None else weights.view(-1, self.heads, groups, T, S).transpose(1, 2).reshape(B, self.heads, T, S)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, H * Dh)
        return self.out_proj(out), kv, weights
