import pytest
import torch

from mmt import registry
from mmt.data.answers import AnswerVocab


def small(fusion):
    cfg = registry.preset("vqa-small" if fusion == "cross" else "vqa-joint-small")
    cfg.text.vocab_size, cfg.num_answers = 40, 10
    return registry.build(cfg).eval()


@pytest.mark.parametrize("fusion", ["cross", "joint"])
def test_shared_images_equal_repeated_images(fusion):
    model = small(fusion)
    pixels = torch.randn(2, 3, 75, 75)
    ids = torch.randint(7, 40, (5, 8))
    ids[:, 0] = 2
    ids[3, 5:] = 0  # a padded question
    image_index = torch.tensor([0, 1, 1, 0, 1])
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
