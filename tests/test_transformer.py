import pytest
import torch
from torch import nn

from mmt.config import TransformerConfig
from mmt.layers.transformer import Decoder, DecoderCache, DecoderLayer, Encoder, EncoderLayer, Positions1D, Positions2D
from mmt.vision import token_coordinates
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
    for fast in (True, False):
        ours.attn.fast = fast
        got, _ = ours(x, key_padding_mask=pad, causal=causal)
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
    for fast in (True, False):
        ours.self_attn.fast = ours.cross_attn.fast = fast
        got = ours(x, memory, key_padding_mask=text_pad, context_padding_mask=image_pad)[0]
        assert (got - expected).abs().max() <= 1e-5


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
    got, _ = ours(x, key_padding_mask=pad)
    assert (got - theirs(x, src_key_padding_mask=pad)).abs().max() <= 1e-5


def test_encoder_returns_per_layer_attention_weights():
    encoder = Encoder(cfg(True, depth=3)).eval()
    out_fast, none = encoder(torch.randn(B, T, D))
    assert none == []
    _, weights = encoder(torch.randn(B, T, D), need_weights=True)
    assert len(weights) == 3 and weights[0].shape == (B, H, T, T)


@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_decoding_equals_full_forward_step_by_step(norm_first):
    decoder = Decoder(cfg(norm_first, depth=3), context_dim=48).eval()
    randomise_norms(decoder)
    x, image = torch.randn(B, T, D), torch.randn(B, S, 48)
    image_pad = padding([5, 3, 4], S)
    full, none = decoder(x, image, context_padding_mask=image_pad)
    assert none is None
    cache = DecoderCache.empty(3)
    for t in range(T):
        step, cache = decoder(x[:, t : t + 1], image, context_padding_mask=image_pad, cache=cache)
        assert cache.length == t + 1
        assert (step[:, 0] - full[:, t]).abs().max() <= 1e-5, f"step {t}"


def test_cross_attention_keys_are_computed_once_per_image():
    decoder = Decoder(cfg(True, depth=2)).eval()
    x, image = torch.randn(B, T, D), torch.randn(B, S, D)
    calls = []
    for layer in decoder.layers:
        layer.cross_attn.k_proj.register_forward_hook(lambda *a: calls.append(1))
    cache = DecoderCache.empty(2)
    for t in range(T):
        _, cache = decoder(x[:, t : t + 1], image, cache=cache)
    assert len(calls) == 2  # once per layer, on the first step only
    first = cache.cross_kv[0].k
    _, cache = decoder(x[:, :1], image, cache=cache)
    assert cache.cross_kv[0].k is first


def test_cache_select_reorders_batch_rows():
    decoder = Decoder(cfg(True, depth=1)).eval()
    x, image = torch.randn(B, 2, D), torch.randn(B, S, D)
    _, cache = decoder(x, image, cache=DecoderCache.empty(1))
    picked = cache.select(torch.tensor([2, 0]))
    assert torch.equal(picked.self_kv[0].k[0], cache.self_kv[0].k[2])
    assert picked.length == 2


def test_multi_token_step_with_cache_uses_offset_causal_mask():
    decoder = Decoder(cfg(True, depth=2)).eval()
    x, image = torch.randn(B, T, D), torch.randn(B, S, D)
    full, _ = decoder(x, image)
    _, cache = decoder(x[:, :2], image, cache=DecoderCache.empty(2))
    rest, _ = decoder(x[:, 2:], image, cache=cache)  # 4 new tokens after 2 cached
    assert (rest - full[:, 2:]).abs().max() <= 1e-5


def test_position_embeddings():
    learned = Positions1D(10, D)
    assert learned(4, start=3).shape == (4, D)
    assert torch.equal(learned(4, start=3), learned.table[3:7])
    with pytest.raises(ValueError, match="max_len"):
        learned(8, start=4)
    fixed = Positions1D(10, D, "sincos")
    assert "table" not in fixed.state_dict()  # fixed embeddings are not weights
    assert not torch.allclose(fixed(1, 0), fixed(1, 1))
    grid = Positions2D(4, 5, D, "learned")(3, 4)
    assert grid.shape == (12, D)
    sincos = Positions2D(4, 5, D, "sincos")(3, 4).view(3, 4, D)
    # the first half of the channels codes the row only, the second half the column only
    assert torch.equal(sincos[0, 0, : D // 2], sincos[0, 3, : D // 2])
    assert torch.equal(sincos[0, 2, D // 2 :], sincos[2, 2, D // 2 :])
    assert not torch.equal(sincos[0, 0], sincos[1, 0])
    xy = Positions2D(4, 5, D, "xy")
    grid = xy(4, 5).view(4, 5, D)
    # a linear map of (x, y) in [-1, 1]: equal steps along a row or column change it equally
    assert torch.allclose(grid[0, 1] - grid[0, 0], grid[3, 4] - grid[3, 3], atol=1e-6)
    assert torch.allclose(grid[1, 2] - grid[0, 2], grid[3, 0] - grid[2, 0], atol=1e-6)
    assert torch.allclose(grid[0, 0], xy.xy(torch.tensor([-1.0, -1.0])), atol=1e-6)  # top left: x = y = -1


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
            out, _ = model(x_, key_padding_mask=pad, first=first)
        else:
            out, _ = model(x_, context, key_padding_mask=pad, context_padding_mask=context_pad, first=first)
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


def grid_positions(rows, cols):
    return token_coordinates(rows, cols).float()


def test_focus_bias_draws_attention_towards_or_away_from_the_focus():
    torch.manual_seed(0)
    layer = DecoderLayer(cfg(True), causal=False, focus_bias=True).eval()
    positions = grid_positions(4, 4)
    x, context = torch.randn(B, T, D), torch.randn(B, 16, D)
    focus = torch.zeros(B, H, T, 16)
    focus[..., 5] = 1.0  # every head of every query looked at token 5 alone, (row 1, col 1)

    def weights(scale, **kw):
        with torch.no_grad():
            layer.focus_scale.fill_(scale)
            return layer(x, context, need_weights=True, **kw)[3]

    near = weights(50.0, focus=focus, context_positions=positions)
    assert (near.argmax(-1) == 5).all() and near.max(-1).values.min() > 0.99
    far = weights(-50.0, focus=focus, context_positions=positions)
    assert (far.argmax(-1) == 15).all()  # (3, 3) is the token furthest from (1, 1)
    assert torch.allclose(weights(0.0, focus=focus, context_positions=positions), weights(0.0), atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        weights(1.0, focus=focus)


def test_focus_per_query_sets_each_querys_scale_and_inhibition():
    torch.manual_seed(0)
    layer = DecoderLayer(cfg(True), causal=False, focus_bias=True, focus_per_query=True).eval()
    plain = DecoderLayer(cfg(True), causal=False, focus_bias=True).eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("focus_query")})
    positions = grid_positions(4, 4)
    x, context = torch.randn(B, T, D), torch.randn(B, 16, D)
    focus = torch.rand(B, H, T, 16).softmax(-1)
    with torch.no_grad():
        layer.focus_scale.uniform_(-1.0, 1.0)
        plain.focus_scale.copy_(layer.focus_scale)

    def weights(module, look):
        with torch.no_grad():
            return module(x, context, need_weights=True, focus=look, context_positions=positions)[3]

    assert (weights(layer, focus) - weights(plain, focus)).abs().max() <= 1e-6  # zero at the start: the plain bias
    # by hand: -(scale_h + a_h . q) * d^2 - (b_h . q) * seen / max(seen), q the query
    queries = []
    layer.cross_attn.register_forward_pre_hook(lambda module, args: queries.append(args[0]))
    with torch.no_grad():
        for p in layer.focus_query.values():
            p.normal_()
        got = weights(layer, focus)
        q = queries[-1]
        per_query = torch.einsum("btd,hd->bht", q, layer.focus_query["weight"]) + layer.focus_query["bias"][:, None]
        centre = focus @ positions  # (B, H, T, 2)
        d2 = (centre[:, :, :, None] - positions).square().sum(-1)
        seen = focus / focus.amax(-1, keepdim=True)
        bias = -(layer.focus_scale[:, None] + per_query[:, :H])[..., None] * d2 - per_query[:, H:, :, None] * seen
        want = layer.cross_attn(q, context, need_weights=True, bias=bias)[2]
    assert (got - want).abs().max() <= 1e-5 and (got - weights(plain, focus)).abs().max() > 1e-2

    # drawn near token 5 but kept off it: the queries go to its neighbours
    one_hot = torch.zeros(B, H, T, 16)
    one_hot[..., 5] = 1.0
    with torch.no_grad():
        layer.focus_scale.zero_()
        layer.focus_query["weight"].zero_()
        layer.focus_query["bias"].copy_(torch.cat([torch.full((H,), 20.0), torch.full((H,), 1000.0)]))
        near = weights(layer, one_hot)
    assert near[..., 5].max() < 1e-6
    assert set(near.argmax(-1).unique().tolist()) <= {1, 4, 6, 9} and near.topk(4, -1).values.sum(-1).min() > 0.99
    with pytest.raises(ValueError, match="needs focus_bias=True"):
        DecoderLayer(cfg(True), causal=False, focus_per_query=True)
    with pytest.raises(ValueError, match="needs focus_bias=True"):
        Decoder(cfg(True, depth=2), causal=False, focus_per_query=True)


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_decoder_focus_is_where_each_head_looked_in_the_layer_before(checkpointing, per_query):
    torch.manual_seed(0)
    decoder = Decoder(cfg(True, depth=3), causal=False, focus_bias=True, focus_per_query=per_query)
    assert decoder.layers[0].focus_scale is None  # the first layer has no layer before it
    with torch.no_grad():
        for layer in decoder.layers[1:]:
            layer.focus_scale.uniform_(-1.0, 1.0)
            if per_query:
                for p in layer.focus_query.values():
                    p.normal_()
    positions = grid_positions(3, 3)
    x, pad = torch.randn(B, T, D), padding([6, 2, 5], T)
    context, context_pad = torch.randn(B, 9, D), padding([9, 7, 4], 9)
    with torch.no_grad():  # by hand: each layer gets the attention weights of the one before
        h, focus = x, None
        for layer in decoder.layers:
            h, _, _, w, looked = layer(
                h, context, key_padding_mask=pad, context_padding_mask=context_pad, need_weights=True, focus=focus,
                context_positions=positions, look_rows=2,
            )
            focus = w
            assert (looked - focus[:, :, :2]).abs().max() <= 1e-5  # the separate computation for a few rows
        expected = decoder.norm(h)
    decoder.activation_checkpointing = checkpointing
    got, _ = decoder(x, context, key_padding_mask=pad, context_padding_mask=context_pad, context_positions=positions)
    assert (got - expected).abs().max() <= 1e-5
    head, _ = decoder(x, context, key_padding_mask=pad, context_padding_mask=context_pad, context_positions=positions, first=2)
    assert (head - expected[:, :2]).abs().max() <= 1e-5
    got.pow(2).sum().backward()
    assert all(layer.focus_scale.grad.abs().sum() > 0 for layer in decoder.layers[1:])
    if per_query:
        assert all(p.grad.abs().sum() > 0 for layer in decoder.layers[1:] for p in layer.focus_query.values())
    with pytest.raises(ValueError, match="context_positions"):
        decoder(x, context)
    with pytest.raises(ValueError, match="non-causal"):
        Decoder(cfg(True, depth=2), causal=True, focus_bias=True)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("first", [None, 1])
def test_decoder_row_index_equals_copying_the_rows(checkpointing, first):
    # distinct rows shared by several queries: the first self-attention runs once per
    # distinct row, and outputs and gradients equal those of fusing every copy
    torch.manual_seed(0)
    decoder = Decoder(cfg(True, depth=2), causal=False, focus_bias=True, focus_per_query=True)
    with torch.no_grad():
        decoder.layers[1].focus_scale.uniform_(-1.0, 1.0)
        for p in decoder.layers[1].focus_query.values():
            p.normal_()
    decoder.activation_checkpointing = checkpointing
    positions = grid_positions(3, 3)
    distinct, pad = torch.randn(2, T, D), padding([6, 3], T)
    row_index = torch.tensor([0, 1, 1, 0, 1])
    context, context_pad = torch.randn(5, 9, D), padding([9, 7, 4, 9, 8], 9)

    def run(copied):
        decoder.zero_grad()
        x = distinct.clone().requires_grad_()
        if copied:
            out, _ = decoder(
                x[row_index], context, key_padding_mask=pad[row_index], context_padding_mask=context_pad,
                context_positions=positions, first=first,
            )
        else:
            out, _ = decoder(
                x, context, key_padding_mask=pad, context_padding_mask=context_pad, context_positions=positions,
                first=first, row_index=row_index,
            )
        out.pow(2).sum().backward()
        return out.detach(), x.grad, [p.grad.clone() for p in decoder.parameters()]

    (want, want_x, want_params), (got, got_x, got_params) = run(True), run(False)
    assert got.shape == (5, first or T, D)
    assert (got - want).abs().max() <= 1e-5
    assert (got_x - want_x).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got_params, want_params))

    with pytest.raises(ValueError, match="non-causal"):
        Decoder(cfg(True)).forward(distinct, context[:2], row_index=row_index)
    layer = DecoderLayer(cfg(True), causal=False)
    _, past, _, _, _ = layer(distinct, context[:2])
    with pytest.raises(ValueError, match="row_index= cannot be combined"):
        layer(distinct, context[:2], past_kv=past, row_index=row_index)
