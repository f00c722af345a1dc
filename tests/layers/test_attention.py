import pytest
import torch
from torch import nn

from mmt.layers.attention import (
    MultiHeadAttention,
    attention_kernel,
    build_attention_mask,
    causal_allowed,
    fused_applies,
    set_attention_kernel,
)
from tests.peers import copy_attention

B, T, S, D, H = 3, 7, 5, 32, 4


def padding(lengths, total):
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


def pair():
    theirs = nn.MultiheadAttention(D, H, batch_first=True).eval()
    ours = MultiHeadAttention(D, H).eval()
    copy_attention(ours, theirs)
    return ours, theirs


KERNELS = ["fused", "literal"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_self_attention_matches_torch_multihead_attention(kernel):
    ours, theirs = pair()
    x = torch.randn(B, T, D)
    pad = padding([7, 4, 2], T)
    expected, _ = theirs(x, x, x, key_padding_mask=pad, need_weights=False)
    with attention_kernel(kernel):
        got = ours(x, key_padding_mask=pad)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_causal_self_attention_matches_torch(kernel):
    ours, theirs = pair()
    x = torch.randn(B, T, D)
    pad = padding([7, 6, 3], T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = blocked
    expected, _ = theirs(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False)
    with attention_kernel(kernel):
        got = ours(x, key_padding_mask=pad, causal=True)
        got_no_pad = ours(x, causal=True)  # the is_causal fast path
    assert (got - expected).abs().max() <= 1e-5
    expected_no_pad, _ = theirs(x, x, x, attn_mask=mask, need_weights=False)
    assert (got_no_pad - expected_no_pad).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_cross_attention_matches_torch(kernel):
    ours, theirs = pair()
    x, context = torch.randn(B, T, D), torch.randn(B, S, D)
    pad = padding([5, 3, 1], S)
    expected, expected_weights = theirs(x, context, context, key_padding_mask=pad, average_attn_weights=False)
    with attention_kernel(kernel):
        got = ours(x, context, key_padding_mask=pad)
    assert (got - expected).abs().max() <= 1e-5
    weights = ours.weights(x, context, key_padding_mask=pad)
    assert (weights - expected_weights).abs().max() <= 1e-5


def test_fused_kernel_equals_the_formula():
    attn = MultiHeadAttention(D, H).eval()
    x, context = torch.randn(B, T, D), torch.randn(B, S, D)
    cases = [
        dict(),
        dict(causal=True),
        dict(causal=True, key_padding_mask=padding([7, 5, 1], T)),
        dict(context=context, key_padding_mask=padding([5, 2, 4], S)),
    ]
    for kwargs in cases:
        with attention_kernel("fused"):
            fast = attn(x, **kwargs)
        with attention_kernel("literal"):
            reference = attn(x, **kwargs)
        assert (fast - reference).abs().max() <= 1e-5, kwargs
        weights = attn.weights(x, **kwargs)
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)


def test_the_kernel_setting_is_checked_and_restored():
    q = torch.randn(1, 1, 1, 8)
    assert fused_applies(q, None)
    with attention_kernel("literal"):
        assert not fused_applies(q, None)
    assert fused_applies(q, None)
    assert not fused_applies(q.bfloat16(), None) and fused_applies(q.bfloat16(), torch.zeros(1))  # "auto" on a bf16 CPU
    with attention_kernel("fused"):
        assert fused_applies(q.bfloat16(), None)
    with pytest.raises(ValueError, match="not one of"):
        set_attention_kernel("flash")


def test_weights_are_zero_on_padding_and_future():
    attn = MultiHeadAttention(D, H).eval()
    x = torch.randn(B, T, D)
    pad = padding([7, 4, 2], T)
    weights = attn.weights(x, key_padding_mask=pad, causal=True)  # (B, H, T, T)
    assert weights[1, :, :, 4:].abs().max() == 0
    assert weights[:, :, ~causal_allowed(T, T, x.device)].abs().max() == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_padded_batch_equals_each_sample_alone(kernel):
    attn = MultiHeadAttention(D, H).eval()
    lengths = [7, 4, 2]
    x = torch.randn(B, T, D)
    with attention_kernel(kernel):
        batched = attn(x, key_padding_mask=padding(lengths, T), causal=True)
        for i, n in enumerate(lengths):
            alone = attn(x[i : i + 1, :n], causal=True)
            assert (batched[i, :n] - alone[0]).abs().max() <= 1e-5


def test_causal_mask_blocks_the_future():
    attn = MultiHeadAttention(D, H).eval()
    x = torch.randn(1, T, D)
    before = attn(x, causal=True)
    changed = x.clone()
    changed[:, 4] += 10.0
    after = attn(changed, causal=True)
    assert torch.equal(before[:, :4], after[:, :4])
    assert (before[:, 4:] - after[:, 4:]).abs().max() > 1e-3  # and the change is seen from there on


def test_one_query_under_the_causal_rule_sees_every_key_and_builds_no_mask():
    # a decoding step: the new token sits at the last position (masking nothing is exact, and
    # saves building a mask per layer per step)
    assert causal_allowed(1, S, torch.device("cpu")).all()
    assert build_attention_mask(None, True, 1, S, torch.device("cpu")) is None
    pad = padding([5, 3, 1], S)
    assert torch.equal(build_attention_mask(pad, True, 1, S, torch.device("cpu")), ~pad[:, None, None, :])
    assert build_attention_mask(None, True, 2, S, torch.device("cpu")).tolist() == causal_allowed(2, S, torch.device("cpu")).tolist()


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_query_sequences_can_share_a_context(kernel):
    attn = MultiHeadAttention(D, H).eval()
    x, context = torch.randn(6, T, D), torch.randn(2, S, D)
    pad = padding([5, 3], S)
    kv = attn.project_kv(context)
    repeat = torch.tensor([0, 0, 0, 1, 1, 1])
    unbiased = None
    # a score bias is allowed when given per query: per head, or one for all heads
    for bias in (None, torch.randn(6, H, T, S), torch.randn(6, 1, T, S)):
        with attention_kernel(kernel):
            shared = attn(x, kv=kv, key_padding_mask=pad, bias=bias)
            copied = attn(x, context[repeat], key_padding_mask=pad[repeat], bias=bias)
        assert (shared - copied).abs().max() <= 1e-5
        weights = attn.weights(x, kv=kv, key_padding_mask=pad, bias=bias)
        copied_weights = attn.weights(x, context[repeat], key_padding_mask=pad[repeat], bias=bias)
        assert (weights - copied_weights).abs().max() <= 1e-6
        if bias is None:
            unbiased = shared
        else:
            assert (shared - unbiased).abs().max() > 1e-3  # the bias was applied
    for uneven in (5, 3):  # 3 // 2 == 1 must not pass as "one query per context"
        with pytest.raises(ValueError, match="cannot share"):
            attn(torch.randn(uneven, T, D), kv=kv)


def test_score_bias_is_added_before_the_softmax_on_both_kernels():
    attn = MultiHeadAttention(D, H).eval()
    x = torch.randn(B, T, D)
    bias = torch.randn(H, T, T)
    pad = padding([7, 5, 2], T)
    plain = attn.weights(x)
    biased = attn.weights(x, bias=bias)
    # softmax(s + b) is softmax(s) reweighted by exp(b)
    expected = plain * bias.exp()
    assert torch.allclose(biased, expected / expected.sum(-1, keepdim=True), atol=1e-5)
    assert (attn.weights(x, key_padding_mask=pad, bias=bias)[1, :, :, 5:] == 0).all()  # padding still masked under a bias
    with attention_kernel("literal"):
        reference = attn(x, key_padding_mask=pad, bias=bias)
    with attention_kernel("fused"):
        fast = attn(x, key_padding_mask=pad, bias=bias)
    assert (fast - reference).abs().max() <= 1e-5
    assert (attn(x, bias=torch.zeros(H, T, T)) - attn(x)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="score bias"):
        attn(torch.randn(4, T, D), torch.randn(2, S, D), bias=torch.zeros(H, T, S))



def test_cpu_bf16_takes_the_literal_path_unless_scores_are_biased(monkeypatch):
    # on a CPU torch's fused kernel is slower than the literal product in bf16, faster in fp32;
    # with a score bias that needs a gradient torch runs its own fp32 path, kept as it is
    import mmt.layers.attention as attention

    fused, literal = [], []
    sdpa, reference = torch.nn.functional.scaled_dot_product_attention, attention.reference_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: fused.append(1) or sdpa(*a, **k))
    monkeypatch.setattr(attention, "reference_attention", lambda *a, **k: literal.append(1) or reference(*a, **k))
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4).eval()
    x, pad = torch.randn(2, 5, 32), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    out32 = attn(x, key_padding_mask=pad)
    assert (len(fused), len(literal)) == (1, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = attn(x, key_padding_mask=pad)
    assert (len(fused), len(literal)) == (1, 1) and out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)
    bias = torch.zeros(4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, key_padding_mask=pad, bias=bias)
    assert (len(fused), len(literal)) == (2, 1)
    with attention_kernel("fused"), torch.autocast("cpu", dtype=torch.bfloat16):  # the Sort-of-CLEVR recipe's setting
        attn(x, key_padding_mask=pad)
    assert (len(fused), len(literal)) == (3, 1)


def test_literal_path_takes_scores_and_softmax_in_fp32_under_bf16_autocast():
    # only weights @ V runs in bf16; q.k, the bias and the softmax in fp32, as in a fused
    # kernel: bf16 scores or weights would be off by up to 0.4% each
    from mmt.layers.attention import reference_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, H, T, 8).bfloat16(), (torch.randn(2, H, S, 8) * 4).bfloat16(), torch.randn(2, H, S, 8).bfloat16()
    for bias in (None, torch.randn(T, S) * 30, (torch.randn(T, S) * 30).bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, weights = reference_attention(q, k, v, None, bias=bias)
        scores = (q.float() * (1.0 / 8**0.5)) @ k.float().transpose(-2, -1)
        expected = (scores if bias is None else scores + bias.float()).softmax(-1)
        assert weights.dtype == torch.float32 and out.dtype == torch.bfloat16
        torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
        # what bf16 would do, far outside that tolerance
        rounded = (scores.bfloat16().float() if bias is None else scores.bfloat16().float() + bias.float()).softmax(-1)
        assert (rounded - expected).abs().max() > 1e-3 and (weights.bfloat16().float() - expected).abs().max() > 1e-4
        torch.testing.assert_close(out, expected.bfloat16() @ v)
    # autocast leaves fp64 alone, and so does the literal path
    q64, k64, v64 = q.double(), k.double(), v.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = reference_attention(q64, k64, v64, None)
    assert out.dtype == weights.dtype == torch.float64
    torch.testing.assert_close(weights, ((q64 / 8**0.5) @ k64.transpose(-2, -1)).softmax(-1))


def test_literal_path_gradients_under_bf16_autocast_match_fp32():
    # the scores' backward products run in bf16 (as a fused kernel's do): the gradients
    # agree with the fp32 ones to bf16 precision, and flow to q, k, v and the bias
    from mmt.layers.attention import reference_attention

    torch.manual_seed(0)
    leaves = [torch.randn(2, H, T, 8), torch.randn(2, H, S, 8) * 2, torch.randn(2, H, S, 8), torch.randn(T, S)]
    target = torch.randn(2, H, T, 8)

    def grads(autocast):
        xs = [x.clone().requires_grad_() for x in leaves]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            q, k, v = (x.bfloat16() if autocast else x for x in xs[:3])
            out, _ = reference_attention(q, k, v, None, bias=xs[3])
        (out.float() * target).sum().backward()
        return [x.grad for x in xs]

    for got, expected in zip(grads(True), grads(False)):
        assert got.dtype == torch.float32
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 0.03 * scale  # bf16 rounding, not a wrong formula
        assert torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.999
