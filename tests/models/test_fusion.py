"""The VQA cross fusion's research (mmt.models.fusion): the focus bias, its per-query terms,
and distinct questions computed once, each checked against a computation written out here."""

import pytest
import torch

from mmt.config import TransformerConfig
from mmt.models.fusion import CrossFusion, FusionLayer, copy_rows
from mmt.vision import token_coordinates

B, T, D, H, F = 3, 6, 32, 4, 64


def padding(lengths, total):
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def cfg(depth=1):
    return TransformerConfig(dim=D, depth=depth, heads=H, ffn_dim=F, dropout=0.0, activation="relu", norm_first=True)


def grid_positions(rows, cols):
    return token_coordinates(rows, cols).float()


def looked(layer, x, context, seen, positions, context_pad=None):
    """Where each head of `layer` looks, for every query of `x`, given the layer before's look."""
    kv = layer.cross_attn.project_kv(context)
    with torch.no_grad():
        return layer(x, kv, None, context_pad, first=None, row_index=None, seen=seen, positions=positions, look=x.shape[1])[1]


def test_focus_bias_draws_attention_towards_or_away_from_the_focus():
    torch.manual_seed(0)
    layer = FusionLayer(cfg(), focus=True).eval()
    positions = grid_positions(4, 4)
    x, context = torch.randn(B, T, D), torch.randn(B, 16, D)
    focus = torch.zeros(B, H, T, 16)
    focus[..., 5] = 1.0  # every head of every query looked at token 5 alone, (row 1, col 1)

    def weights(scale, seen=focus):
        with torch.no_grad():
            layer.focus_scale.fill_(scale)
        return looked(layer, x, context, seen, positions)

    near = weights(50.0)
    assert (near.argmax(-1) == 5).all() and near.max(-1).values.min() > 0.99
    far = weights(-50.0)
    assert (far.argmax(-1) == 15).all()  # (3, 3) is the token furthest from (1, 1)
    assert torch.allclose(weights(0.0), weights(0.0, seen=None), atol=1e-6)  # no look before: no bias


def test_focus_per_query_sets_each_querys_scale_and_inhibition():
    torch.manual_seed(0)
    layer = FusionLayer(cfg(), focus=True, per_query=True).eval()
    plain = FusionLayer(cfg(), focus=True).eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("focus_query")})
    positions = grid_positions(4, 4)
    x, context = torch.randn(B, T, D), torch.randn(B, 16, D)
    focus = torch.rand(B, H, T, 16).softmax(-1)
    with torch.no_grad():
        layer.focus_scale.uniform_(-1.0, 1.0)
        plain.focus_scale.copy_(layer.focus_scale)

    assert (looked(layer, x, context, focus, positions) - looked(plain, x, context, focus, positions)).abs().max() <= 1e-6
    # by hand: -(scale_h + a_h . q) * d^2 - (b_h . q) * seen / max(seen), q the query
    with torch.no_grad():
        for p in layer.focus_query.values():
            p.normal_()
        got = looked(layer, x, context, focus, positions)
        q = layer.norm2(layer.self_attention(x))  # what the cross-attention reads
        per_query = torch.einsum("btd,hd->bht", q, layer.focus_query["weight"]) + layer.focus_query["bias"][:, None]
        centre = focus @ positions  # (B, H, T, 2)
        d2 = (centre[:, :, :, None] - positions).square().sum(-1)
        seen = focus / focus.amax(-1, keepdim=True)
        bias = -(layer.focus_scale[:, None] + per_query[:, :H])[..., None] * d2 - per_query[:, H:, :, None] * seen
        want = layer.cross_attn.weights(q, context, bias=bias)
    assert (got - want).abs().max() <= 1e-5 and (got - looked(plain, x, context, focus, positions)).abs().max() > 1e-2

    # drawn near token 5 but kept off it: the queries go to its neighbours
    one_hot = torch.zeros(B, H, T, 16)
    one_hot[..., 5] = 1.0
    with torch.no_grad():
        layer.focus_scale.zero_()
        layer.focus_query["weight"].zero_()
        layer.focus_query["bias"].copy_(torch.cat([torch.full((H,), 20.0), torch.full((H,), 1000.0)]))
    near = looked(layer, x, context, one_hot, positions)
    assert near[..., 5].max() < 1e-6
    assert set(near.argmax(-1).unique().tolist()) <= {1, 4, 6, 9} and near.topk(4, -1).values.sum(-1).min() > 0.99
    with pytest.raises(ValueError, match="needs focus_bias=True"):
        FusionLayer(cfg(), per_query=True)
    with pytest.raises(ValueError, match="needs focus_bias=True"):
        CrossFusion(cfg(depth=2), focus_per_query=True)


def test_focus_parameters_come_first_as_in_earlier_checkpoints():
    # the order of the parameters is the order the gradient norm sums them in
    names = [name for name, _ in FusionLayer(cfg(), focus=True, per_query=True).named_parameters()]
    assert names[:4] == ["focus_scale", "focus_query.bias", "focus_query.weight", "self_attn.q_proj.weight"]


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_each_layers_focus_is_where_its_heads_looked_in_the_layer_before(checkpointing, per_query):
    torch.manual_seed(0)
    fusion = CrossFusion(cfg(depth=3), focus_bias=True, focus_per_query=per_query)
    assert fusion.layers[0].focus_scale is None  # the first layer has no layer before it
    with torch.no_grad():
        for layer in fusion.layers[1:]:
            layer.focus_scale.uniform_(-1.0, 1.0)
            if per_query:
                for p in layer.focus_query.values():
                    p.normal_()
    positions = grid_positions(3, 3)
    x, pad = torch.randn(B, T, D), padding([6, 2, 5], T)
    context, context_pad = torch.randn(B, 9, D), padding([9, 7, 4], 9)
    image_kv = fusion.project_context(context)
    with torch.no_grad():  # by hand: each layer gets the attention weights (all rows) of the one before
        h, seen = x, None
        for layer, kv in zip(fusion.layers, image_kv):
            h_next, look = layer(h, kv, pad, context_pad, first=None, row_index=None, seen=seen, positions=positions, look=T)
            _, few = layer(h, kv, pad, context_pad, first=None, row_index=None, seen=seen, positions=positions, look=2)
            assert (few - look[:, :, :2]).abs().max() <= 1e-6  # the rows asked for, computed apart
            h, seen = h_next, look
        expected = fusion.norm(h)
    fusion.activation_checkpointing = checkpointing
    options = dict(text_padding=pad, image_padding=context_pad, positions=positions)
    got = fusion(x, image_kv, **options)
    assert (got - expected).abs().max() <= 1e-5
    head = fusion(x, image_kv, **options, first=2)
    assert (head - expected[:, :2]).abs().max() <= 1e-5
    got.pow(2).sum().backward()
    assert all(layer.focus_scale.grad.abs().sum() > 0 for layer in fusion.layers[1:])
    if per_query:
        assert all(p.grad.abs().sum() > 0 for layer in fusion.layers[1:] for p in layer.focus_query.values())
    with pytest.raises(ValueError, match="positions"):
        fusion(x, image_kv)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("first", [None, 1])
def test_distinct_rows_equal_copying_the_rows(checkpointing, first):
    # distinct questions shared by several images: the first self-attention runs once per
    # distinct question, and outputs and gradients equal those of fusing every copy
    torch.manual_seed(0)
    fusion = CrossFusion(cfg(depth=2), focus_bias=True, focus_per_query=True)
    with torch.no_grad():
        fusion.layers[1].focus_scale.uniform_(-1.0, 1.0)
        for p in fusion.layers[1].focus_query.values():
            p.normal_()
    fusion.activation_checkpointing = checkpointing
    positions = grid_positions(3, 3)
    distinct, pad = torch.randn(2, T, D), padding([6, 3], T)
    row_index = torch.tensor([0, 1, 1, 0, 1])
    context, context_pad = torch.randn(5, 9, D), padding([9, 7, 4, 9, 8], 9)

    def run(copied):
        fusion.zero_grad()
        x = distinct.clone().requires_grad_()
        image_kv = fusion.project_context(context)
        if copied:
            out = fusion(x[row_index], image_kv, text_padding=pad[row_index], image_padding=context_pad, positions=positions, first=first)
        else:
            out = fusion(
                x, image_kv, text_padding=pad, image_padding=context_pad, positions=positions, first=first, row_index=row_index
            )
        out.pow(2).sum().backward()
        return out.detach(), x.grad, [p.grad.clone() for p in fusion.parameters()]

    (want, want_x, want_params), (got, got_x, got_params) = run(True), run(False)
    assert got.shape == (5, first or T, D)
    assert (got - want).abs().max() <= 1e-5
    assert (got_x - want_x).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got_params, want_params))
    with pytest.raises(ValueError, match="at least one fusion layer"):
        CrossFusion(cfg(depth=0))(distinct, [], row_index=row_index)


def test_copy_rows_is_indexing():
    x = torch.randn(4, 3, 2)
    index = torch.tensor([3, 0, 0, 2])
    assert torch.equal(copy_rows(x, index), x[index])
    assert copy_rows(x, torch.tensor([], dtype=torch.long)).shape == (0, 3, 2)


def test_fusion_layers_are_called_as_modules():
    # hooks on a fusion layer see its calls (the fusion does not reach around nn.Module's call)
    torch.manual_seed(0)
    fusion = CrossFusion(cfg(depth=2), focus_bias=True)
    seen = []
    fusion.layers[1].register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    x, context = torch.randn(B, T, D), torch.randn(B, 9, D)
    fusion(x, fusion.project_context(context), positions=grid_positions(3, 3), first=1)
    assert seen == [(B, 1, D)]
