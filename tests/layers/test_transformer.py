import pytest
import torch
from torch import nn

from mmt.config import TransformerConfig
from mmt.layers.attention import attention_kernel
from mmt.layers.transformer import Decoder, DecoderLayer, Encoder, EncoderLayer
from tests.peers import copy_decoder_layer, copy_encoder_layer, randomise_norms

B, T, S, D, H, F = 3, 6, 5, 32, 4, 64


def padding(lengths, total):
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def cfg(norm_first, activation="relu", depth=1):
    return TransformerConfig(dim=D, depth=depth, heads=H, ffn_dim=F, dropout=0.0, activation=activation, norm_first=norm_first)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_matches_torch(norm_first, activation, causal):
    theirs = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first)
    ours = EncoderLayer(cfg(norm_first, activation))
    randomise_norms(theirs)
    copy_encoder_layer(ours, theirs)
    theirs.eval(), ours.eval()
    x = torch.randn(B, T, D)
    pad = padding([6, 4, 1], T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None
    expected = theirs(x, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
    for kernel in ("fused", "literal"):
        with attention_kernel(kernel):
            got = ours(x, key_padding_mask=pad, causal=causal)
        assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_layer_matches_torch(norm_first):
    theirs = nn.TransformerDecoderLayer(D, H, F, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first)
    ours = DecoderLayer(cfg(norm_first, "gelu"))
    randomise_norms(theirs)
    copy_decoder_layer(ours, theirs)
    theirs.eval(), ours.eval()
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    text_pad, image_pad = padding([6, 3, 2], T), padding([5, 5, 2], S)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    expected = theirs(
        x, memory, tgt_mask=causal, tgt_key_padding_mask=text_pad, memory_key_padding_mask=image_pad, tgt_is_causal=True
    )
    for kernel in ("fused", "literal"):
        with attention_kernel(kernel):
            got = ours(x, memory, key_padding_mask=text_pad, context_padding_mask=image_pad)
        assert (got - expected).abs().max() <= 1e-5
    # the context's keys/values projected once give the same layer
    kv = ours.cross_attn.project_kv(memory)
    plain = ours(x, memory, key_padding_mask=text_pad, context_padding_mask=image_pad)
    assert torch.equal(ours(x, kv, key_padding_mask=text_pad, context_padding_mask=image_pad), plain)


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_stack_matches_torch(norm_first):
    layer = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, batch_first=True, norm_first=norm_first)
    theirs = nn.TransformerEncoder(layer, num_layers=3, norm=nn.LayerNorm(D) if norm_first else None, enable_nested_tensor=False)
    randomise_norms(theirs)
    ours = Encoder(cfg(norm_first, depth=3))
    for mine, peer in zip(ours.layers, theirs.layers):
        copy_encoder_layer(mine, peer)
    if norm_first:
        ours.norm.load_state_dict(theirs.norm.state_dict())
    theirs.eval(), ours.eval()
    x, pad = torch.randn(B, T, D), padding([6, 2, 5], T)
    got = ours(x, key_padding_mask=pad)
    assert (got - theirs(x, src_key_padding_mask=pad)).abs().max() <= 1e-5


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("kind", ["growing", "growing-in-place", "static"])
def test_cached_decoding_equals_full_forward_step_by_step(norm_first, kind):
    decoder = Decoder(cfg(norm_first, depth=3), context_dim=48).eval()
    randomise_norms(decoder)
    x, image = torch.randn(B, T, D), torch.randn(B, S, 48)
    image_pad = padding([5, 3, 4], S)
    full = decoder(x, image, context_padding_mask=image_pad)
    cache = decoder.new_cache(capacity=None if kind == "growing" else T, static=kind == "static")
    context = decoder.project_context(image)
    for t in range(T):
        step = decoder(x[:, t : t + 1], context, context_padding_mask=image_pad, cache=cache)
        cache.advance(1)
        assert cache.length == t + 1
        assert (step[:, 0] - full[:, t]).abs().max() <= 1e-5, f"step {t}"


def test_cross_attention_keys_are_computed_once_per_image():
    decoder = Decoder(cfg(True, depth=2)).eval()
    x, image = torch.randn(B, T, D), torch.randn(B, S, D)
    calls = []
    for layer in decoder.layers:
        layer.cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    context, cache = decoder.project_context(image), decoder.new_cache()
    assert len(calls) == 2  # once per layer
    for t in range(T):
        decoder(x[:, t : t + 1], context, cache=cache)
        cache.advance(1)
    assert len(calls) == 2  # and never again while decoding


@pytest.mark.parametrize("kind", ["growing", "growing-in-place", "static"])
def test_cache_reorder_keeps_and_reorders_rows(kind):
    decoder = Decoder(cfg(True, depth=2)).eval()
    x, image = torch.randn(B, 3, D), torch.randn(B, S, D)
    context = decoder.project_context(image)
    cache = decoder.new_cache(capacity=None if kind == "growing" else 4, static=kind == "static")
    for t in range(2):
        decoder(x[:, t : t + 1], context, cache=cache)
        cache.advance(1)
    index = torch.tensor([2, 0, 0])
    cache.reorder(index)
    got = decoder(x[index, 2:3], [kv.select(index) for kv in context], cache=cache)
    want = decoder(x[index], [kv.select(index) for kv in context])[:, 2:3]
    assert (got - want).abs().max() <= 1e-5


def test_multi_token_step_with_cache_uses_offset_causal_mask():
    decoder = Decoder(cfg(True, depth=2)).eval()
    x, image = torch.randn(B, T, D), torch.randn(B, S, D)
    full = decoder(x, image)
    cache = decoder.new_cache()
    decoder(x[:, :2], image, cache=cache)
    cache.advance(2)
    rest = decoder(x[:, 2:], image, cache=cache)  # 4 new tokens after 2 cached
    assert (rest - full[:, 2:]).abs().max() <= 1e-5


def test_a_static_cache_takes_one_position_per_step_and_needs_a_capacity():
    decoder = Decoder(cfg(True, depth=1)).eval()
    image = torch.randn(B, S, D)
    cache = decoder.new_cache(capacity=2, static=True)
    with pytest.raises(ValueError, match="one position per step"):
        decoder(torch.randn(B, 2, D), image, cache=cache)
    with pytest.raises(ValueError, match="capacity"):
        decoder.new_cache(static=True)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_first_rows_equal_the_full_stack_in_values_and_gradients(norm_first, stack, checkpointing):
    torch.manual_seed(0)
    if stack == "encoder":
        model = Encoder(cfg(norm_first, depth=2))
    else:
        model = Decoder(cfg(norm_first, depth=2), causal=False)
    model.activation_checkpointing = checkpointing
    x, pad = torch.randn(B, T, D), padding([6, 2, 5], T)
    context, context_pad = torch.randn(B, 4, D), padding([4, 3, 1], 4)

    def run(first):
        x_ = x.clone().requires_grad_()
        if stack == "encoder":
            out = model(x_, key_padding_mask=pad, first=first)
        else:
            out = model(x_, context, key_padding_mask=pad, context_padding_mask=context_pad, first=first)
        out[:, :2].pow(2).sum().backward()
        grads = [x_.grad] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return out, grads

    full, full_grads = run(None)
    head, head_grads = run(2)
    assert head.shape == (B, 2, D)
    assert (head - full[:, :2]).abs().max() <= 1e-5
    for a, b in zip(head_grads, full_grads):
        assert (a - b).abs().max() <= 1e-5


def test_first_rows_refuse_causal_attention():
    with pytest.raises(ValueError, match="causal"):
        Encoder(cfg(True, depth=1))(torch.randn(B, T, D), causal=True, first=1)
    with pytest.raises(ValueError, match="causal"):
        Decoder(cfg(True, depth=1))(torch.randn(B, T, D), torch.randn(B, 4, D), first=1)


def test_a_growing_cache_keeps_rows_by_any_index_and_says_when_it_is_full():
    decoder = Decoder(cfg(True, depth=1)).eval()
    image = decoder.project_context(torch.randn(B, S, D))
    cache = decoder.new_cache(capacity=2)
    with torch.no_grad():
        decoder(torch.randn(B, 1, D), image, cache=cache)
        cache.advance(1)
        cache.reorder(torch.tensor([0, 1]))  # fewer rows: beams of images that finished dropped
        kept = [kv.select(torch.tensor([0, 1])) for kv in image]
        decoder(torch.randn(2, 1, D), kept, cache=cache)
        cache.advance(1)
        with pytest.raises(ValueError, match="outgrow the cache"):
            decoder(torch.randn(2, 1, D), kept, cache=cache)
