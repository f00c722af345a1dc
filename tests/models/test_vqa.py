import pytest
import torch

from mmt import registry
from mmt.data.answers import AnswerVocab


def small(fusion):
    cfg = registry.preset("vqa-small" if fusion == "cross" else "vqa-joint-small")
    cfg.text.vocab_size, cfg.num_answers = 40, 10
    return registry.build(cfg).eval()


@pytest.mark.parametrize("fusion", ["cross", "joint"])
@pytest.mark.parametrize("order", ["scattered", "grouped"])
def test_shared_images_equal_repeated_images(fusion, order):
    model = small(fusion)
    pixels = torch.randn(2, 3, 75, 75)
    # "grouped" (consecutive, equally many per image) takes the copy-free path
    image_index = torch.tensor([0, 1, 1, 0, 1] if order == "scattered" else [0, 0, 0, 1, 1, 1])
    ids = torch.randint(7, 40, (len(image_index), 8))
    ids[:, 0] = 2
    ids[3, 5:] = 0  # a padded question
    ids[4] = ids[1]  # a repeated question
    with torch.no_grad():
        shared = model.answer_logits(pixels, ids, image_index)
        repeated = model.answer_logits(pixels[image_index], ids)
    assert (shared - repeated).abs().max() <= 1e-4


def test_soft_targets_use_binary_cross_entropy():
    model = small("cross")
    pixels, ids = torch.randn(2, 3, 75, 75), torch.randint(7, 40, (2, 6))
    soft = torch.zeros(2, 10)
    soft[0, 3], soft[1, 1] = 1.0, 0.6
    out = model(pixels, ids, soft)
    logits = out["answer_logits"].float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="sum") / 2
    assert torch.allclose(out["answer_loss"], expected, atol=1e-5)
    hard = model(pixels, ids, torch.tensor([3, 1]))["answer_loss"]
    assert torch.allclose(hard, torch.nn.functional.cross_entropy(logits, torch.tensor([3, 1])), atol=1e-5)


def test_width_mismatch_is_a_clear_error():
    cfg = registry.preset("vqa-small")
    cfg.text.encoder.dim = 64
    with pytest.raises(ValueError, match="text.encoder.dim=64 must equal fusion_encoder.dim=128"):
        registry.build(cfg)


def test_answer_vocab_round_trip(tmp_path):
    vocab = AnswerVocab.build(["no", "yes", "yes", "2", "square", "no", "yes"])
    assert vocab.answers == ["yes", "no", "2", "square"]  # by frequency, ties alphabetical
    vocab.save(tmp_path / "answers.json")
    loaded = AnswerVocab.load(tmp_path / "answers.json")
    assert loaded.answers == vocab.answers and loaded.id("square") == 3
    assert len(AnswerVocab.build(["a", "b", "b", "c", "c", "c"], max_size=2)) == 2
    with pytest.raises(KeyError, match="'purple' is not in the answer vocabulary"):
        loaded.id("purple")
    (tmp_path / "bad.json").write_text('{"answers": [1, 2]}')
    with pytest.raises(ValueError, match="bad.json: 'answers' must be a list of strings"):
        AnswerVocab.load(tmp_path / "bad.json")


def test_grouped_path_trains_like_the_copying_path():
    model = small("cross").train()
    pixels = torch.randn(2, 3, 75, 75)
    ids = torch.randint(7, 40, (4, 8))
    answers = torch.tensor([1, 2, 3, 4])
    grads = []
    for image_index in (torch.tensor([0, 0, 1, 1]), None):
        model.zero_grad()
        inputs = pixels if image_index is not None else pixels[torch.tensor([0, 0, 1, 1])]
        model.eval()  # BatchNorm statistics differ between 2 and 4 images; compare the rest exactly
        model(inputs, ids, answers, image_index)["answer_loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize("fusion", ["cross", "joint"])
def test_repeated_questions_are_encoded_once_with_the_same_result(fusion):
    model = small(fusion)
    pixels = torch.randn(3, 3, 75, 75)
    two = torch.randint(7, 40, (2, 8))
    ids = two[torch.tensor([0, 1, 0, 0, 1, 0])]  # 2 distinct questions among 6: the de-duplicating path
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    calls = []
    model.text.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    if fusion == "cross":  # so is the fusion's first self-attention, which sees only the question
        model.fusion.layers[0].self_attn.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad():
        batched = model.answer_logits(pixels, ids, image_index)
        assert calls == ([2, 2] if fusion == "cross" else [2])
        alone = torch.cat([model.answer_logits(pixels[i : i + 1], ids[q : q + 1]) for q, i in enumerate(image_index.tolist())])
    assert (batched - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("fusion", ["cross", "joint"])
def test_classifier_computes_only_the_cls_state_with_the_same_loss_and_gradients(fusion):
    # the classifier reads only [CLS], so the last fusion layer computes nothing else: the
    # loss and every gradient must equal those of fusing all tokens
    torch.manual_seed(0)
    model = small(fusion).train()
    pixels, image_index = torch.randn(2, 3, 75, 75), torch.tensor([0, 0, 1, 1])
    ids = torch.randint(7, 40, (4, 8))
    ids[:, 0], ids[1, 6:] = 2, 0
    answers = torch.tensor([1, 3, 0, 9])
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm statistics move each pass

    def grads(first):
        model.load_state_dict(state)
        model.zero_grad()
        image_tokens, image_padding = model.vision(pixels)
        fused, padding = model.fuse(image_tokens, image_padding, ids, image_index, first=first)
        loss = torch.nn.functional.cross_entropy(model.head(fused[:, 0]), answers)
        loss.backward()
        return loss.detach(), fused.shape, padding.shape, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss_all, shape_all, _, grads_all = grads(None)
    loss_cls, shape_cls, padding_cls, grads_cls = grads(1)
    assert shape_cls[1] == 1 and padding_cls == (4, 1) and shape_all[1] > 1
    assert torch.allclose(loss_cls, loss_all, atol=1e-6)
    assert len(grads_cls) == len(grads_all)
    for a, b in zip(grads_cls, grads_all):
        assert (a - b).abs().max() <= 1e-5
    model.load_state_dict(state)
    assert torch.allclose(model(pixels, ids, answers, image_index)["answer_loss"], loss_all, atol=1e-6)


def test_focus_bias_starts_as_the_plain_model_and_keeps_shared_images_equal():
    def build(focus_bias):
        cfg = registry.preset("vqa-fast")
        cfg.text.vocab_size, cfg.num_answers, cfg.focus_bias, cfg.focus_per_query = 40, 10, focus_bias, focus_bias
        torch.manual_seed(0)
        return registry.build(cfg).eval()

    plain, focused = build(False), build(True)
    missing, unexpected = plain.load_state_dict(focused.state_dict(), strict=False)
    # 2 fusion layers: the second has the focus parameters
    assert not missing
    assert sorted(unexpected) == ["fusion.layers.1.focus_query.bias", "fusion.layers.1.focus_query.weight", "fusion.layers.1.focus_scale"]
    pixels = torch.randn(2, 3, 75, 75)
    image_index = torch.tensor([0, 0, 0, 1, 1, 1])  # consecutive and equally many: the grouped path
    ids = torch.randint(7, 40, (6, 8))
    ids[:, 0] = 2
    ids[3, 5:] = 0
    with torch.no_grad():
        assert (focused.answer_logits(pixels, ids, image_index) - plain.answer_logits(pixels, ids, image_index)).abs().max() <= 1e-5
        focused.fusion.layers[1].focus_scale.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
        for p in focused.fusion.layers[1].focus_query.values():  # per question: scale and inhibition
            p.normal_()
        shared = focused.answer_logits(pixels, ids, image_index)
        repeated = focused.answer_logits(pixels[image_index], ids)
        scattered = torch.tensor([0, 1, 1, 0, 1, 0])
        assert (focused.answer_logits(pixels, ids, scattered) - focused.answer_logits(pixels[scattered], ids)).abs().max() <= 1e-4
    assert (shared - repeated).abs().max() <= 1e-4
    assert (shared - plain.answer_logits(pixels, ids, image_index)).abs().max() > 1e-3


def test_focus_bias_needs_cross_fusion():
    cfg = registry.preset("vqa-joint-small")
    cfg.focus_bias = True
    with pytest.raises(ValueError, match="focus_bias needs model.fusion='cross'"):
        registry.build(cfg)
    cfg = registry.preset("vqa-fast")
    cfg.focus_bias = False
    with pytest.raises(ValueError, match="focus_per_query needs model.focus_bias=true"):
        registry.build(cfg)
