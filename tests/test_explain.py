"""Heat maps of where a model looked (mmt.explain): every model, every kind of map, checked
against the attention weights computed by hand, and the command that draws them."""

import numpy as np
import pytest
import torch
from PIL import Image

import mmt
from mmt.cli import main
from mmt.explain import explain, on_object
from tests.test_api import saved

QUESTION = "a red circle"  # the tiny models' tokenizer knows these words


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    return tmp_path / "scene.png"


def vqa(tmp_path):
    from mmt.data.answers import AnswerVocab

    directory, _ = saved(tmp_path, "vqa-small", num_answers=3)
    AnswerVocab(["yes", "no", "2"]).save(directory / "answers.json")  # a classifier's answers sit beside it
    return mmt.load(directory, device="cpu")


def test_vqa_attention_map_is_the_first_cross_attention_of_cls(tmp_path, image):
    predictor = vqa(tmp_path)
    model = predictor.model
    explained = explain(predictor, image, question=QUESTION)
    grid = model.vision.grid_size(predictor.image_size)
    (heat,) = explained.maps
    assert heat.shape == grid and heat.max() == pytest.approx(1.0) and heat.min() >= 0
    assert explained.result["answer"] in ("yes", "no", "2") and explained.labels == [explained.result["answer"]]
    # by hand: the first fusion layer's [CLS] query over the image tokens, mean of heads
    with torch.no_grad():
        pixels = predictor.pixels([image])
        tokens, padding = model.vision(pixels)
        ids, _ = predictor.tokenizer.batch([QUESTION], model.config.text.max_len, wrap="cls")
        layer = model.fusion.layers[0]
        x = layer.self_attention(model.text(ids)[0], None)
        h = layer.norm2(x) if layer.norm_first else x
        weights = layer.cross_attn.weights(h, kv=layer.cross_attn.project_kv(tokens), key_padding_mask=padding)
        expected = weights[0, :, 0].mean(0)
    np.testing.assert_allclose(heat, (expected / expected.max()).reshape(grid).numpy(), atol=1e-5)
    last = explain(predictor, image, question=QUESTION, layer="last", head=0).maps[0]
    assert last.shape == grid and not np.allclose(last, heat)
    for method in ("gradient", "gradcam"):
        assert explain(predictor, image, question=QUESTION, method=method).maps[0].shape == grid
    with pytest.raises(ValueError, match="layer 7"):
        explain(predictor, image, question=QUESTION, layer=7)
    with pytest.raises(ValueError, match="needs a question"):
        explain(predictor, image)


def test_a_caption_gets_one_map_per_word_and_a_retrieval_match_one(tmp_path, image):
    captioner = mmt.load(saved(tmp_path, "caption-tiny", vocab_size=14)[0], device="cpu")
    explained = explain(captioner, image)
    words = explained.result["caption"].split()
    mean = explain(captioner, image, layer="mean")  # a caption word's default: the mean over layers
    assert all(np.array_equal(a, b) for a, b in zip(explained.maps, mean.maps))
    assert explained.labels == words and len(explained.maps) == len(words)
    gradient = explain(captioner, image, method="gradient")
    assert len(gradient.maps) == len(words) and all(m.max() <= 1.0 for m in gradient.maps)
    retrieval = mmt.load(saved(tmp_path, "retrieval-tiny")[0], device="cpu")
    match = explain(retrieval, image, text="a red circle")  # a dual encoder: the gradient map
    assert match.labels == ["a red circle"] and -1.0 <= match.result["score"] <= 1.0
    assert match.maps[0].shape == retrieval.model.vision.grid_size(retrieval.image_size)


def test_on_object_counts_the_peak_and_its_neighbours():
    heat = np.zeros((10, 10))
    heat[3, 4] = 1.0  # the cell covering x 30-40, y 22.5-30 of a 75-pixel image
    assert on_object(heat, (31, 23, 39, 29), 75)
    assert on_object(heat, (41, 23, 49, 29), 75)  # one cell to the right
    assert not on_object(heat, (56, 23, 64, 29), 75)  # two cells away


def test_explain_command_draws_the_maps(tmp_path, image, capsys):
    captioner_dir, _ = saved(tmp_path, "caption-tiny", vocab_size=14)
    out = tmp_path / "caption.png"
    assert main(["explain", str(captioner_dir), "--image", str(image), "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size[0] >= 224 and "wrote" in capsys.readouterr().out
    retrieval_dir, _ = saved(tmp_path, "retrieval-tiny")
    assert main(["explain", str(retrieval_dir), "--image", str(image), "--out", str(out)]) == 2
    assert "--text" in capsys.readouterr().err


def test_an_image_tower_with_a_class_token_maps_its_grid(tmp_path, image):
    from mmt import checkpoint, registry
    from mmt.text import Tokenizer

    cfg = registry.preset("caption-tiny")
    cfg.vision.class_token, cfg.vision.positions = True, "flat"  # as a ViT or CLIP tower (--init-vision)
    tokenizer = Tokenizer.train(["a red circle", "a blue square"])
    cfg.vocab_size = tokenizer.vocab_size
    checkpoint.save_pretrained(registry.build(cfg).eval(), tmp_path / "cls", tokenizer)
    captioner = mmt.load(tmp_path / "cls", device="cpu")
    grid = captioner.model.vision.grid_size(captioner.image_size)
    for method in ("attention", "gradient"):
        explained = explain(captioner, image, method=method)
        assert all(m.shape == grid for m in explained.maps) and len(explained.maps) == len(explained.labels)
