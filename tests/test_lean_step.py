"""The lean decoding step (CPU): step by step the same logits as the decoder's modules, the
same tokens in every decoding mode, always the current weights, and taken only where it
computes what the modules compute."""

import dataclasses

import pytest
import torch

from mmt import registry
from mmt.generation import GenerationConfig, own_step
import mmt.lean_step
from mmt.layers.attention import MultiHeadAttention
from mmt.layers.transformer import Decoder, DecoderCache, DecoderLayer, FeedForward
from mmt.lean_step import LeanStep, head_as_columns, last_level_cache_bytes, lean_applies
from mmt.text import TokenEmbedding

BOS, EOS = 5, 6


def captioner(norm_first=True, activation="gelu", seed=0, vocab=12):
    torch.manual_seed(seed)
    cfg = registry.preset("caption-tiny")
    cfg.vocab_size = vocab
    cfg.decoder = dataclasses.replace(cfg.decoder, norm_first=norm_first, activation=activation)
    model = registry.build(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked random model: decoding choices are not near-ties
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def built(monkeypatch):
    """Every LeanStep that decoding builds, in order."""
    import mmt.generation

    steps = []
    monkeypatch.setattr(mmt.generation, "LeanStep", lambda *args: steps.append(LeanStep(*args)) or steps[-1])
    return steps


def steps_side_by_side(model, pixels, rows, length=8, dtype=torch.float32, padded=False):
    """Logits of both steps fed the same random tokens, `rows` rows over the images (padded:
    some image tokens masked out, differently per image)."""
    model = model.to(dtype)
    tokens, padding = model.encode_images(pixels.to(dtype))
    if padded:
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        for i in range(len(padding)):
            padding[i, 5 * i + 3 :: 4] = True
    step = LeanStep(model.embed, model.decoder, model.lm_head, tokens, padding, rows)
    modules, cache = model.decode_step(tokens, padding), DecoderCache.empty(len(model.decoder.layers))
    ids = torch.randint(7, 12, (rows, length), generator=torch.Generator().manual_seed(5))
    pairs = []
    for t in range(length):
        lean_logits, step = step(ids[:, t : t + 1], step)
        module_logits, cache = modules(ids[:, t : t + 1], cache)
        pairs.append((lean_logits, module_logits))
    return pairs


@pytest.mark.parametrize("norm_first, activation", [(True, "gelu"), (False, "relu"), (False, "gelu")])
@pytest.mark.parametrize("images, per_image", [(1, 1), (1, 3), (4, 1), (4, 3)])  # 3: rows share an image (beams)
@pytest.mark.parametrize("padded", [False, True])
def test_each_step_gives_the_decoder_modules_logits(pixels, norm_first, activation, images, per_image, padded):
    model = captioner(norm_first, activation)
    with torch.no_grad():
        pairs = steps_side_by_side(model, pixels[:images], images * per_image, padded=padded)
        unpadded = steps_side_by_side(model, pixels[:images], images * per_image) if padded else pairs
    for lean_logits, module_logits in pairs:
        torch.testing.assert_close(lean_logits, module_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pairs[0][0], pairs[-1][0])  # the steps saw different prefixes
    if padded:  # the mask changed what the steps saw
        assert not torch.allclose(pairs[0][0], unpadded[0][0])


def test_each_layers_own_norm_settings_and_bias_free_linears_are_kept(pixels):
    model = captioner()
    dim = model.config.decoder.dim
    layer = model.decoder.layers[1]
    layer.norm2 = torch.nn.LayerNorm(dim, eps=0.5)  # an eps far from the default
    layer.norm3 = torch.nn.LayerNorm(dim, elementwise_affine=False)
    with torch.no_grad():
        layer.norm2.weight.uniform_(0.5, 1.5)
        layer.ffn.fc2 = torch.nn.Linear(layer.ffn.fc2.in_features, dim, bias=False)
        model.decoder.norm.bias.fill_(0.3)
        pairs = steps_side_by_side(model.eval(), pixels, 4)
    for lean_logits, module_logits in pairs:
        torch.testing.assert_close(lean_logits, module_logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the changes mattered
        layer.norm2.eps = 1e-5
        assert not torch.allclose(steps_side_by_side(model, pixels, 4)[-1][1], pairs[-1][1], atol=1e-3)


@pytest.fixture
def small_cache(monkeypatch):
    """A 4 KiB last-level cache: the test models' heads (12 x 64 floats) outgrow half of it."""
    monkeypatch.setattr(mmt.lean_step, "last_level_cache_bytes", lambda: 4096)


def test_the_head_is_read_as_columns_only_for_1_to_8_rows_of_a_large_fp32_head(small_cache, monkeypatch):
    large, small = torch.empty(12, 64), torch.empty(12, 32)  # 3072 and 1536 bytes, against half of 4096
    assert [head_as_columns(large, rows) for rows in (1, 2, 8, 9)] == [True, True, True, False]
    assert not head_as_columns(small, 3)
    assert not head_as_columns(large.bfloat16(), 3) and not head_as_columns(torch.empty(12, 128).bfloat16(), 3)
    monkeypatch.setattr(mmt.lean_step, "last_level_cache_bytes", lambda: None)  # not reported
    assert not head_as_columns(large, 3)


def test_a_head_read_as_columns_gives_the_modules_logits_and_tokens(pixels, small_cache, built):
    model = captioner()
    for images, per_image in [(1, 1), (1, 3), (4, 2)]:  # (one row goes in twice)
        rows = images * per_image
        tokens, padding = model.encode_images(pixels[:images])
        assert LeanStep(model.embed, model.decoder, model.lm_head, tokens, padding, rows).head_as_columns
        with torch.no_grad():
            pairs = steps_side_by_side(model, pixels[:images], rows)
        for lean_logits, module_logits in pairs:
            torch.testing.assert_close(lean_logits, module_logits, atol=1e-5, rtol=1e-5)
    for options in ({"num_beams": 3, "num_return": 3}, {}):  # 3 rows, 1 row
        with torch.no_grad():
            lean = model.generate(pixels[:1], max_new_tokens=10, **options)
            modules = model.generate(pixels[:1], max_new_tokens=10, lean_step=False, **options)
        assert built[-1].head_as_columns
        assert torch.equal(lean.ids, modules.ids)
        torch.testing.assert_close(lean.scores, modules.scores)


def test_the_cache_size_is_read_from_the_highest_level_reported(tmp_path):
    for name, level, size in [("index0", "1", "48K"), ("index2", "2", "2048K"), ("index3", "3", "32768K"), ("index9", "x", "1M")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "level").write_text(level + "\n")
        (tmp_path / name / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 32 << 20  # index9's unreadable level is passed over
    assert last_level_cache_bytes(tmp_path / "nowhere") is None
    for size in ("", "0", "K", "1.5M"):  # not a size: passed over, never an error
        (tmp_path / "index3" / "size").write_text(size + "\n")
        assert last_level_cache_bytes.__wrapped__(tmp_path) == 2048 << 10


def test_bf16_weights_give_the_decoder_modules_logits(pixels):
    model = captioner()
    with torch.no_grad():
        pairs = steps_side_by_side(model, pixels, rows=8, dtype=torch.bfloat16)
    for lean_logits, module_logits in pairs:
        assert lean_logits.dtype == torch.bfloat16
        # the same operations on the same weights; a bf16 step of the logits (~10) is 0.0625
        torch.testing.assert_close(lean_logits.float(), module_logits.float(), atol=0.0625, rtol=0)


OPTIONS = [{}, {"num_beams": 3, "num_return": 2}, {"num_beams": 4, "length_penalty": 0.6}, {"do_sample": True, "seed": 4, "num_return": 2}]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("images", [1, 4])
def test_captions_equal_the_decoder_modules_in_every_mode(pixels, options, images, built):
    model = captioner()
    with torch.no_grad():
        model.lm_head.bias[EOS] += 3.0  # some captions end early
        lean = model.generate(pixels[:images], max_new_tokens=10, **options)
        modules = model.generate(pixels[:images], max_new_tokens=10, lean_step=False, **options)
    assert len(built) == 1  # the lean step decoded the first, and only the first
    assert torch.equal(lean.ids, modules.ids)
    assert torch.allclose(lean.scores, modules.scores, atol=1e-5)


def test_generative_vqa_with_padded_questions_answers_as_the_decoder_modules(generative_vqa, built):
    model, pixels, questions, image_index = generative_vqa
    tokens, padding = model.fuse(*model.vision(pixels), questions, image_index)
    assert padding.any()
    for options in ({}, {"num_beams": 2}):
        with torch.no_grad():
            lean = model.generate_answers(pixels, questions, image_index, GenerationConfig(**options))
            modules = model.generate_answers(pixels, questions, image_index, GenerationConfig(lean_step=False, **options))
        assert torch.equal(lean.ids, modules.ids)
        assert torch.allclose(lean.scores, modules.scores, atol=1e-5)
    assert [step.rows for step in built] == [6, 12]  # the lean step answered, greedy then 2 beams
    with torch.no_grad():  # no questions: nothing to decode
        none = model.generate_answers(pixels, questions[:0], image_index[:0])
    assert none.ids.shape == (0, 1, 1) and len(built) == 2


def test_weights_changed_in_any_way_decode_at_once(pixels, built):
    model, other = captioner(seed=0), captioner(seed=1)
    with torch.no_grad():
        before = model.generate(pixels, max_new_tokens=10)
        model.load_state_dict(other.state_dict())  # in place (the same addresses)
        assert torch.equal(model.generate(pixels, max_new_tokens=10).ids, other.generate(pixels, max_new_tokens=10, lean_step=False).ids)
        for p in model.decoder.parameters():  # through .data, as weight averaging often writes (no version bump)
            p.data.mul_(-1.0)
        flipped = model.generate(pixels, max_new_tokens=10)
        assert torch.equal(flipped.ids, model.generate(pixels, max_new_tokens=10, lean_step=False).ids)
    assert not torch.equal(before.ids, flipped.ids)
    assert len(built) == 3  # every decoding without lean_step=False took the lean step


def test_the_lean_step_is_taken_only_where_it_computes_what_the_modules_compute(pixels):
    model = captioner()
    tokens, padding = model.encode_images(pixels)

    def chosen(**options):
        return own_step(model, model.embed, model.decoder, model.lm_head, tokens, padding, GenerationConfig(**options), 4, False)

    with torch.no_grad():
        assert isinstance(chosen(), LeanStep)
        assert chosen(lean_step=False) is None
        assert chosen(use_cache=False) is None  # recomputing the prefix is the modules' work
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert chosen() is None
        model.decoder.layers[0].drop1.train()  # one dropout left in training mode
        assert chosen() is None
        model.eval()
        handle = model.decoder.layers[1].ffn.fc2.register_forward_hook(lambda *args: None)
        assert chosen() is None  # a hook the lean step would skip
        handle.remove()
        handle = model.embed.register_forward_pre_hook(lambda *args: None)
        assert chosen() is None
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
        assert chosen() is None
        handle.remove()
        assert isinstance(chosen(), LeanStep)

    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class HalvedLayer(DecoderLayer):
        def forward(self, *args, **kwargs):
            x, *rest = super().forward(*args, **kwargs)
            return (x / 2, *rest)

    class ScaledFeedForward(FeedForward):
        def forward(self, x):
            return 0.1 * super().forward(x)

    head = ScaledLinear(model.lm_head.in_features, model.lm_head.out_features)
    cfg = model.config.decoder
    assert not lean_applies(model.embed, model.decoder, head)  # its own forward would be skipped
    assert not lean_applies(model.embed, model.decoder, torch.nn.Sequential(model.lm_head))
    for replaced in (HalvedLayer(cfg), ScaledFeedForward(cfg.dim, cfg.ffn_dim, 0.0, cfg.activation), torch.nn.Identity()):
        changed = captioner()
        if not isinstance(replaced, FeedForward):  # a layer replaced (by anything)
            changed.decoder.layers[1] = replaced.eval()
        else:
            changed.decoder.layers[1].ffn = replaced.eval()
        assert not lean_applies(changed.embed, changed.decoder, changed.lm_head)

    class ShiftedEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    class ShiftedTokenEmbedding(TokenEmbedding):
        def forward(self, ids, start=0):
            return super().forward(ids, start) + 1.0

    class ScaledNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    dim, vocab, max_len = cfg.dim, model.config.vocab_size, model.config.max_len
    changes = {  # each makes the modules compute what the lean step would not
        "embedding subclass": lambda m: setattr(m.embed, "tokens", ShiftedEmbedding(vocab, dim)),
        "embedding max_norm": lambda m: setattr(m.embed.tokens, "max_norm", 1.0),  # (looking rows up rescales them)
        "positions replaced": lambda m: setattr(m.embed, "positions", torch.nn.Identity()),
        "token embedding subclass": lambda m: setattr(m, "embed", ShiftedTokenEmbedding(vocab, dim, max_len)),
        "final norm subclass": lambda m: setattr(m.decoder, "norm", ScaledNorm(dim)),
        "a layer's self-attention heads": lambda m: setattr(m.decoder.layers[1], "self_attn", MultiHeadAttention(dim, 2)),
        "a layer's cross-attention heads": lambda m: setattr(m.decoder.layers[1], "cross_attn", MultiHeadAttention(dim, 2)),
        "a post-norm layer among pre-norm ones": lambda m: setattr(m.decoder.layers[1], "norm_first", False),
    }
    for name, change in changes.items():
        changed = captioner()
        assert lean_applies(changed.embed, changed.decoder, changed.lm_head)
        change(changed)
        changed.eval()
        assert not lean_applies(changed.embed, changed.decoder, changed.lm_head), name
    # VQA stacks: cross fusion (non-causal), and with a focus bias; neither is a text decoder
    for fusion in (Decoder(cfg, causal=False), Decoder(cfg, causal=False, focus_bias=True)):
        assert not lean_applies(model.embed, fusion.eval(), model.lm_head)


def test_lean_step_refuses_misuse(pixels):
    model = captioner()
    tokens, padding = model.encode_images(pixels)
    with pytest.raises(ValueError, match="6 rows cannot share 4 contexts"):
        LeanStep(model.embed, model.decoder, model.lm_head, tokens, padding, 6)
    step = LeanStep(model.embed, model.decoder, model.lm_head, tokens, padding, 4)
    ids = torch.full((4, 1), BOS)
    with pytest.raises(ValueError, match="own cache"):
        step(ids, None)
    with pytest.raises(ValueError, match="4 rows"):
        step(torch.full((4, 2), BOS), step)
    with pytest.raises(ValueError, match="never reordered"):
        step.select(torch.arange(4))
    with torch.no_grad():
        for _ in range(step.capacity):
            step(ids, step)
        with pytest.raises(ValueError, match=f"all {step.capacity} positions"):
            step(ids, step)
