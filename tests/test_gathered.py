"""Decoding on a CPU through gathered views (mmt.gathered): the modules' own forward functions over
their parameters, so step by step bit for bit the modules' logits, the same tokens in every
decoding mode, always the current weights; hooks, training mode and foreign modules are called
as themselves. And the output head's product for a few rows (LogitsHead)."""

import dataclasses

import pytest
import torch

import mmt.generation
from mmt import registry
from mmt.gathered import gathered
from mmt.generation import GenerationConfig
from mmt.layers.transformer import DecoderLayer, FeedForward
from mmt.text import LogitsHead, TokenEmbedding

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
    """Every module that decoding gathers, in order."""
    modules = []
    gather = mmt.generation.gathered
    monkeypatch.setattr(mmt.generation, "gathered", lambda module: modules.append(module) or gather(module))
    return modules


def steps_side_by_side(model, pixels, rows, length=8, dtype=torch.float32, padded=False):
    """Logits of the gathered and the modules' steps fed the same random tokens, `rows` rows over
    the images (padded: some image tokens masked out, differently per image)."""
    model = model.to(dtype)
    tokens, padding = model.encode_images(pixels.to(dtype))
    if padded:
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool)
        for i in range(len(padding)):
            padding[i, 5 * i + 3 :: 4] = True
    steps = [model.decode_step(tokens, padding, GenerationConfig(gathered=g), rows) for g in (True, False)]
    ids = torch.randint(7, 12, (rows, length), generator=torch.Generator().manual_seed(5))
    return [(steps[0](ids[:, : t + 1]), steps[1](ids[:, : t + 1])) for t in range(length)]


@pytest.mark.parametrize("norm_first, activation", [(True, "gelu"), (False, "relu"), (False, "gelu")])
@pytest.mark.parametrize("images, per_image", [(1, 1), (1, 3), (4, 1), (4, 3)])  # 3: rows share an image (beams)
@pytest.mark.parametrize("padded", [False, True])
def test_each_step_gives_the_decoder_modules_logits_bit_for_bit(pixels, norm_first, activation, images, per_image, padded):
    model = captioner(norm_first, activation)
    with torch.no_grad():
        pairs = steps_side_by_side(model, pixels[:images], images * per_image, padded=padded)
    for gathered_logits, module_logits in pairs:
        assert torch.equal(gathered_logits, module_logits)


def test_bf16_weights_give_the_decoder_modules_logits_bit_for_bit(pixels):
    model = captioner()
    with torch.no_grad():
        pairs = steps_side_by_side(model, pixels, rows=8, dtype=torch.bfloat16)
    for gathered_logits, module_logits in pairs:
        assert gathered_logits.dtype == torch.bfloat16 and torch.equal(gathered_logits, module_logits)


OPTIONS = [{}, {"num_beams": 3, "num_return": 2}, {"num_beams": 4, "length_penalty": 0.6}, {"do_sample": True, "seed": 4, "num_return": 2}]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("images", [1, 4])
def test_captions_equal_the_decoder_modules_in_every_mode(pixels, options, images, built):
    model = captioner()
    with torch.no_grad():
        model.lm_head.bias[EOS] += 3.0  # some captions end early
        fast = model.generate(pixels[:images], max_new_tokens=10, **options)
        modules = model.generate(pixels[:images], max_new_tokens=10, gathered=False, **options)
    assert [type(m).__name__ for m in built] == ["TokenEmbedding", "Decoder", "LogitsHead"]  # the first decoding only
    assert torch.equal(fast.ids, modules.ids)
    assert torch.equal(fast.scores, modules.scores)


def test_generative_vqa_with_padded_questions_answers_as_the_decoder_modules(generative_vqa, built):
    model, pixels, questions, image_index = generative_vqa
    _, padding = model.fuse(*model.vision(pixels), questions, image_index)
    assert padding.any()
    for options in ({}, {"num_beams": 2}):
        with torch.no_grad():
            fast = model.generate_answers(pixels, questions, image_index, GenerationConfig(**options))
            modules = model.generate_answers(pixels, questions, image_index, GenerationConfig(gathered=False, **options))
        assert torch.equal(fast.ids, modules.ids)
        assert torch.equal(fast.scores, modules.scores)
    assert len(built) == 6  # both decodings were gathered
    with torch.no_grad():  # no questions: nothing to decode
        none = model.generate_answers(pixels, questions[:0], image_index[:0])
    assert none.ids.shape == (0, 1, 1)


def test_weights_changed_in_any_way_decode_at_once(pixels):
    model, other = captioner(seed=0), captioner(seed=1)
    with torch.no_grad():
        before = model.generate(pixels, max_new_tokens=10)
        model.load_state_dict(other.state_dict())  # in place (the same addresses)
        assert torch.equal(model.generate(pixels, max_new_tokens=10).ids, other.generate(pixels, max_new_tokens=10, gathered=False).ids)
        for p in model.decoder.parameters():  # through .data, as weight averaging often writes (no version bump)
            p.data.mul_(-1.0)
        flipped = model.generate(pixels, max_new_tokens=10)
        assert torch.equal(flipped.ids, model.generate(pixels, max_new_tokens=10, gathered=False).ids)
    assert not torch.equal(before.ids, flipped.ids)


def test_a_view_calls_the_module_itself_where_it_could_differ():
    model = captioner()
    assert gathered(model.decoder) is not model.decoder
    assert gathered(model.decoder.train()) is model.decoder  # training mode: dropout
    model.eval()
    handle = model.decoder.layers[1].ffn.fc2.register_forward_hook(lambda *args: None)
    view = gathered(model.decoder)
    assert view.layers[1].ffn.fc2 is model.decoder.layers[1].ffn.fc2  # the hooked module is called itself
    assert view.layers[0].ffn.fc2 is not model.decoder.layers[0].ffn.fc2
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert gathered(model.decoder) is model.decoder  # a hook on every module
    handle.remove()
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert gathered(sequential) is sequential  # not mmt's, not a leaf torch computes in one function


def test_a_view_runs_subclasses_own_code(pixels):
    # the view is made from each module's own class, so a subclass's forward runs, in the view too

    class ScaledLinear(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class HalvedLayer(DecoderLayer):
        def forward(self, *args, **kwargs):
            return DecoderLayer.forward(self, *args, **kwargs) / 2

    class ScaledFeedForward(FeedForward):
        def forward(self, x):
            return 0.1 * FeedForward.forward(self, x)

    class ShiftedTokenEmbedding(TokenEmbedding):
        def forward(self, ids, start=0):
            return TokenEmbedding.forward(self, ids, start) + 1.0

    cfg = captioner().config.decoder
    changes = {
        "a linear subclass": lambda m: setattr(m.decoder.layers[0].self_attn, "q_proj", ScaledLinear(cfg.dim, cfg.dim)),
        "a layer subclass": lambda m: m.decoder.layers.__setitem__(1, HalvedLayer(cfg)),
        "a feed-forward subclass": lambda m: setattr(m.decoder.layers[1], "ffn", ScaledFeedForward(cfg.dim, cfg.ffn_dim, 0.0, "gelu")),
        "an embedding subclass": lambda m: setattr(m, "embed", ShiftedTokenEmbedding(m.config.vocab_size, cfg.dim, m.config.max_len)),
        "an embedding with max_norm": lambda m: setattr(m.embed.tokens, "max_norm", 1.0),
    }
    for name, change in changes.items():
        model = captioner()
        change(model)
        model.eval()
        with torch.no_grad():
            for fast, modules in steps_side_by_side(model, pixels[:2], rows=2, length=4):
                assert torch.equal(fast, modules), name


def test_the_head_takes_a_few_rows_as_columns_only_for_a_large_fp32_head(monkeypatch):
    head = LogitsHead(64, 12)
    monkeypatch.setattr(LogitsHead, "COLUMNS_FROM", 12 * 64 - 1)  # the test head counts as large
    calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or addmm(*a, **k))
    for rows, columns in [(1, True), (3, True), (8, True), (9, False)]:
        x = torch.randn(rows, 64)
        calls.clear()
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight, head.bias))
        assert bool(calls) == columns, rows
    calls.clear()
    head(torch.randn(2, 64).bfloat16().float().to(torch.float64).float())  # fp32 again: columns
    assert calls
    calls.clear()
    head.bfloat16()(torch.randn(2, 64).bfloat16())  # bf16: the plain product
    assert not calls
    head.float()
    monkeypatch.setattr(LogitsHead, "COLUMNS_FROM", 12 * 64)  # not larger than the threshold
    head(torch.randn(2, 64))
    assert not calls


def test_a_head_taken_as_columns_decodes_as_the_plain_product(pixels, monkeypatch):
    model = captioner()
    with torch.no_grad():
        plain = [model.generate(pixels[:1], max_new_tokens=10, **options) for options in ({}, {"num_beams": 3, "num_return": 3})]
    monkeypatch.setattr(LogitsHead, "COLUMNS_FROM", 0)
    with torch.no_grad():
        columns = [model.generate(pixels[:1], max_new_tokens=10, **options) for options in ({}, {"num_beams": 3, "num_return": 3})]
    for a, b in zip(columns, plain):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.scores, b.scores)


def test_a_forward_replaced_on_the_instance_is_called_as_it_is(pixels):
    # (as wrappers such as accelerate's hooks do): the view would run the class's forward instead
    model = captioner()
    original = model.decoder.layers[0].ffn.forward
    model.decoder.layers[0].ffn.forward = lambda x: 0.5 * original(x)
    view = gathered(model.decoder)
    assert view.layers[0].ffn is model.decoder.layers[0].ffn
    with torch.no_grad():
        for fast, modules in steps_side_by_side(model, pixels[:2], rows=2, length=3):
            assert torch.equal(fast, modules)
