"""The packed decoding step (CPU): step by step the same logits as the decoder's modules, the
same tokens in every decoding mode, packed weights kept while valid and packed again after
any change, and taken only where it computes what the modules compute."""

import dataclasses

import pytest
import torch

from mmt import registry
from mmt.generation import GenerationConfig, own_step
from mmt.layers.transformer import Decoder, DecoderCache
from mmt.packed_step import PackedStep, packed_step, packs

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


def steps_side_by_side(model, pixels, rows, length=8, dtype=torch.float32, transposed=None):
    """Logits of both steps fed the same random tokens, `rows` rows over the images; checks
    which weight layout the packed step read (transposed: fp32 with few rows)."""
    model = model.to(dtype)
    tokens, padding = model.encode_images(pixels.to(dtype))
    step = packed_step(model, model.embed, model.decoder, model.lm_head, tokens, padding, rows)
    if transposed is not None:
        assert step.weights.transposed == transposed
    modules, cache = model.decode_step(tokens, padding), DecoderCache.empty(len(model.decoder.layers))
    ids = torch.randint(7, 12, (rows, length), generator=torch.Generator().manual_seed(5))
    pairs = []
    for t in range(length):
        packed_logits, step = step(ids[:, t : t + 1], step)
        module_logits, cache = modules(ids[:, t : t + 1], cache)
        pairs.append((packed_logits, module_logits))
    return pairs


@pytest.mark.parametrize("norm_first, activation", [(True, "gelu"), (False, "relu"), (False, "gelu")])
@pytest.mark.parametrize("images", [1, 4])  # 1 image: up to 3 rows, read from transposed weights
@pytest.mark.parametrize("per_image", [1, 3])  # 3: rows share an image's keys/values (beams, samples)
def test_each_step_gives_the_decoder_modules_logits(pixels, norm_first, activation, images, per_image):
    model = captioner(norm_first, activation)
    rows = images * per_image
    with torch.no_grad():
        pairs = steps_side_by_side(model, pixels[:images], rows, transposed=rows <= 3)
    for packed_logits, module_logits in pairs:
        torch.testing.assert_close(packed_logits, module_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pairs[0][0], pairs[-1][0])  # the steps saw different prefixes


def test_bf16_weights_give_the_decoder_modules_logits_to_bf16_rounding(pixels):
    model = captioner()
    with torch.no_grad():
        pairs = steps_side_by_side(model, pixels, rows=8, dtype=torch.bfloat16, transposed=False)
    for packed_logits, module_logits in pairs:
        assert packed_logits.dtype == torch.bfloat16
        # products in another layout may round differently (bf16 keeps 8 bits); logits here are ~10
        torch.testing.assert_close(packed_logits.float(), module_logits.float(), atol=0.125, rtol=0.01)


OPTIONS = [{}, {"num_beams": 3, "num_return": 2}, {"num_beams": 4, "length_penalty": 0.6}, {"do_sample": True, "seed": 4, "num_return": 2}]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("images", [1, 4])
def test_captions_equal_the_decoder_modules_in_every_mode(pixels, options, images):
    model = captioner()
    with torch.no_grad():
        model.lm_head.bias[EOS] += 3.0  # some captions end early
        packed = model.generate(pixels[:images], max_new_tokens=10, **options)
        modules = model.generate(pixels[:images], max_new_tokens=10, packed_step=False, **options)
    assert "_packed_weights" in model.__dict__  # the packed step ran
    assert torch.equal(packed.ids, modules.ids)
    assert torch.allclose(packed.scores, modules.scores, atol=1e-5)


def test_generative_vqa_with_padded_questions_answers_as_the_decoder_modules(generative_vqa):
    model, pixels, questions, image_index = generative_vqa
    for options in ({}, {"num_beams": 2}):
        with torch.no_grad():
            packed = model.generate_answers(pixels, questions, image_index, GenerationConfig(**options))
            modules = model.generate_answers(pixels, questions, image_index, GenerationConfig(packed_step=False, **options))
        assert torch.equal(packed.ids, modules.ids)
        assert torch.allclose(packed.scores, modules.scores, atol=1e-5)
    assert "_packed_weights" in model.__dict__


def test_packed_weights_are_kept_and_packed_again_after_any_weight_change(pixels):
    model, other = captioner(seed=0), captioner(seed=1)
    with torch.no_grad():
        model.generate(pixels, max_new_tokens=5)
        kept = model._packed_weights
        model.generate(pixels, max_new_tokens=5)
        assert model._packed_weights is kept  # nothing changed: packed once
        model.load_state_dict(other.state_dict())  # loaded in place (the same addresses)
        loaded = model.generate(pixels, max_new_tokens=10)
        assert model._packed_weights is not kept
        assert torch.equal(loaded.ids, other.generate(pixels, max_new_tokens=10, packed_step=False).ids)
        model.decoder.layers[0].ffn.fc1.weight.mul_(-1.0)  # an in-place write, as an optimizer step is
        changed = model.generate(pixels, max_new_tokens=10)
        assert torch.equal(changed.ids, model.generate(pixels, max_new_tokens=10, packed_step=False).ids)
        assert not torch.allclose(changed.scores, loaded.scores)
    model.train()  # training drops them (as it drops recorded graphs)
    assert "_packed_weights" not in model.__dict__


def test_weights_made_in_inference_mode_are_packed_at_every_call(pixels):
    with torch.inference_mode():  # such weights keep no version: copies could go stale unseen
        model = captioner()
        first = model.generate(pixels, max_new_tokens=10)
        model.lm_head.bias[EOS] += 3.0
        second = model.generate(pixels, max_new_tokens=10)
        expected = model.generate(pixels, max_new_tokens=10, packed_step=False)
    assert "_packed_weights" not in model.__dict__
    assert torch.equal(second.ids, expected.ids) and not torch.equal(first.ids, second.ids)


def test_the_packed_step_is_taken_only_where_it_computes_what_the_modules_compute(pixels):
    model = captioner()
    tokens, padding = model.encode_images(pixels)

    def chosen(**options):
        return own_step(model, model.embed, model.decoder, model.lm_head, tokens, padding, GenerationConfig(**options), 4, False)

    with torch.no_grad():
        assert isinstance(chosen(), PackedStep)
        assert chosen(packed_step=False) is None
        assert chosen(use_cache=False) is None  # recomputing the prefix is the modules' work
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert chosen() is None
        model.train()
        assert chosen() is None
        model.eval()
    cfg = model.config.decoder
    fusion = Decoder(cfg, causal=False, focus_bias=True)  # a VQA fusion stack: not a text decoder
    assert packs(model.decoder, model.lm_head) and not packs(fusion, model.lm_head)
    assert not packs(model.decoder, torch.nn.Sequential(model.lm_head))


def test_packed_step_refuses_misuse(pixels):
    model = captioner()
    tokens, padding = model.encode_images(pixels)
    with pytest.raises(ValueError, match="6 rows cannot share 4 contexts"):
        packed_step(model, model.embed, model.decoder, model.lm_head, tokens, padding, 6)
    step = packed_step(model, model.embed, model.decoder, model.lm_head, tokens, padding, 4)
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
