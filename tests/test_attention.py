import pytest
import torch
from torch import nn

from mmt.layers.attention import MultiHeadAttention, causal_allowed
from tests.peers import copy_attention

B, T, S, D, H = 3, 7, 5, 32, 4


def padding(lengths, total):
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


def pair():
    theirs = nn.MultiheadAttention(D, H, batch_first=True).eval()
    ours = MultiHeadAttention(D, H).eval()
    copy_attention(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("fast", [True, False])
def test_self_attention_matches_torch_multihead_attention(fast):
    ours, theirs = pair()
    ours.fast = fast
    x = torch.randn(B, T, D)
    pad = padding([7, 4, 2], T)
    expected, _ = theirs(x, x, x, key_padding_mask=pad, need_weights=False)
    got, _, _ = ours(x, key_padding_mask=pad)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("fast", [True, False])
def test_causal_self_attention_matches_torch(fast):
    ours, theirs = pair()
    ours.fast = fast
    x = torch.randn(B, T, D)
    pad = padding([7, 6, 3], T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = blocked
    expected, _ = theirs(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False)
    got, _, _ = ours(x, key_padding_mask=pad, causal=True)
    assert (got - expected).abs().max() <= 1e-5
    got_no_pad, _, _ = ours(x, causal=True)  # the is_causal fast path
    expected_no_pad, _ = theirs(x, x, x, attn_mask=mask, need_weights=False)
    assert (got_no_pad - expected_no_pad).abs().max() <= 1e-5


@pytest.mark.parametrize("fast", [True, False])
def test_cross_attention_matches_torch(fast):
    ours, theirs = pair()
    ours.fast = fast
    x, context = torch.randn(B, T, D), torch.randn(B, S, D)
    pad = padding([5, 3, 1], S)
    expected, expected_weights = theirs(x, context, context, key_padding_mask=pad, average_attn_weights=False)
    got, _, _ = ours(x, context, key_padding_mask=pad)
    assert (got - expected).abs().max() <= 1e-5
    _, _, weights = ours(x, context, key_padding_mask=pad, need_weights=True)
    assert (weights - expected_weights).abs().max() <= 1e-5


def test_fast_path_equals_reference_path():
    attn = MultiHeadAttention(D, H).eval()
    x, context = torch.randn(B, T, D), torch.randn(B, S, D)
    cases = [
        dict(),
        dict(causal=True),
        dict(causal=True, key_padding_mask=padding([7, 5, 1], T)),
        dict(context=context, key_padding_mask=padding([5, 2, 4], S)),
    ]
    for kwargs in cases:
        attn.fast = True
        fast, _, _ = attn(x, **kwargs)
        attn.fast = False
        reference, _, weights = attn(x, **kwargs, need_weights=True)
        assert (fast - reference).abs().max() <= 1e-5, kwargs
        assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)


def test_weights_are_zero_on_padding_and_future():
    attn = MultiHeadAttention(D, H).eval()
    x = torch.randn(B, T, D)
    pad = padding([7, 4, 2], T)
    _, _, weights = attn(x, key_padding_mask=pad, causal=True, need_weights=True)  # (B, H, T, T)
    assert weights[1, :, :, 4:].abs().max() == 0
    assert weights[:, :, ~causal_allowed(T, T, x.device)].abs().max() == 0


@pytest.mark.parametrize("fast", [True, False])
def test_padded_batch_equals_each_sample_alone(fast):
    attn = MultiHeadAttention(D, H, fast=fast).eval()
    lengths = [7, 4, 2]
    x = torch.randn(B, T, D)
    batched, _, _ = attn(x, key_padding_mask=padding(lengths, T), causal=True)
    for i, n in enumerate(lengths):
        alone, _, _ = attn(x[i : i + 1, :n], causal=True)
        assert (batched[i, :n] - alone[0]).abs().max() <= 1e-5


def test_causal_mask_blocks_the_future():
    attn = MultiHeadAttention(D, H).eval()
    x = torch.randn(1, T, D)
    before, _, _ = attn(x, causal=True)
    changed = x.clone()
    changed[:, 4] += 10.0
    after, _, _ = attn(changed, causal=True)
    assert torch.equal(before[:, :4], after[:, :4])
    assert (before[:, 4:] - after[:, 4:]).abs().max() > 1e-3  # and the change is seen from there on


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4)


@pytest.mark.parametrize("fast", [True, False])
def test_query_sequences_can_share_a_context(fast):
    attn = MultiHeadAttention(D, H, fast=fast).eval()
    x, context = torch.randn(6, T, D), torch.randn(2, S, D)
    pad = padding([5, 3], S)
    kv = attn.project_kv(context)
    repeat = torch.tensor([0, 0, 0, 1, 1, 1])
    unbiased = None
    # a score bias is allowed when given per query: per head, or one for all heads
    for bias in (None, torch.randn(6, H, T, S), torch.randn(6, 1, T, S)):
        shared, _, weights = attn(x, static_kv=kv, key_padding_mask=pad, need_weights=not fast, bias=bias)
        copied, _, copied_weights = attn(x, context[repeat], key_padding_mask=pad[repeat], need_weights=not fast, bias=bias)
        assert (shared - copied).abs().max() <= 1e-5
        if not fast:
            assert (weights - copied_weights).abs().max() <= 1e-6
        if bias is None:
            unbiased = shared
        else:
            assert (shared - unbiased).abs().max() > 1e-3  # the bias was applied
    for uneven in (5, 3):  # 3 // 2 == 1 must not pass as "one query per context"
        with pytest.raises(ValueError, match="cannot share"):
            attn(torch.randn(uneven, T, D), static_kv=kv)


def test_score_bias_is_added_before_the_softmax_on_both_paths():
    attn = MultiHeadAttention(D, H).eval()
    x = torch.randn(B, T, D)
    bias = torch.randn(H, T, T)
    pad = padding([7, 5, 2], T)
    attn.fast = False
    _, _, plain = attn(x, need_weights=True)
    _, _, biased = attn(x, need_weights=True, bias=bias)
    # softmax(s + b) is softmax(s) reweighted by exp(b)
    expected = plain * bias.exp()
    assert torch.allclose(biased, expected / expected.sum(-1, keepdim=True), atol=1e-5)
    reference, _, weights = attn(x, key_padding_mask=pad, need_weights=True, bias=bias)
    assert (weights[1, :, :, 5:] == 0).all()  # padding still masked under a bias
    attn.fast = True
    fast, _, _ = attn(x, key_padding_mask=pad, bias=bias)
    assert (fast - reference).abs().max() <= 1e-5
    assert (attn(x, bias=torch.zeros(H, T, T))[0] - attn(x)[0]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="score bias"):
        attn(torch.randn(4, T, D), torch.randn(2, S, D), bias=torch.zeros(H, T, S))



def test_cpu_bf16_takes_the_literal_path_unless_scores_are_biased(monkeypatch):
    # on a CPU torch's fused kernel is slower than the literal product in bf16, faster in fp32;
    # with a score bias that needs a gradient torch runs its own fp32 path, kept as it is
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4).eval()
    x, pad = torch.randn(2, 5, 32), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    out32, _, _ = attn(x, key_padding_mask=pad)
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, _, weights = attn(x, key_padding_mask=pad)
    assert len(calls) == 1 and out16.dtype == torch.bfloat16
    assert weights is not None and (weights[1, :, :, 3:] == 0).all()  # the literal path, masks applied
    torch.testing.assert_close(out16.float(), out32, atol=3e-2, rtol=3e-2)
    bias = torch.zeros(4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, weights = attn(x, key_padding_mask=pad, bias=bias)
    assert len(calls) == 2 and weights is None
    attn.fused_on_bf16_cpu = True  # asked for the kernel there too (the Sort-of-CLEVR preset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, weights = attn(x, key_padding_mask=pad)
    assert len(calls) == 3 and weights is None
    from mmt import registry
    from mmt.layers.transformer import Decoder, Encoder

    preset = registry.preset("vqa-fast")
    for layers in (preset.vision.encoder, preset.text.encoder, preset.fusion_encoder):
        stack = Encoder(layers) if layers is not preset.fusion_encoder else Decoder(layers, causal=False)
        assert all(m.fused_on_bf16_cpu for m in stack.modules() if isinstance(m, MultiHeadAttention))


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
