"""The Python API (mmt.load): any kind of image in, one result per input, in batches; clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

import mmt
from mmt import checkpoint, registry
from mmt.data.images import ImageError, load_image, to_pixels
from mmt.text import Tokenizer

WORDS = ["a red circle", "a blue square", "a green cross on the left"]


def saved(tmp_path, preset, **sizes):
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORDS)
    cfg = registry.preset(preset)
    for key, value in sizes.items():
        setattr(cfg, key, value)
    model = registry.build(cfg).eval()
    checkpoint.save_pretrained(model, tmp_path / preset, tokenizer)
    return tmp_path / preset, model


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "scene.png")
    return tmp_path / "scene.png", array


def test_a_captioner_takes_any_image_and_answers_one_per_input(tmp_path, scene):
    path, array = scene
    directory, model = saved(tmp_path, "caption-tiny", vocab_size=14)
    captioner = mmt.load(directory)
    assert captioner.task == "caption" and "caption" in repr(captioner)
    one = captioner.caption(path)
    assert set(one) == {"caption", "score"} and isinstance(one["caption"], str)
    pixels = to_pixels(array[None])[0]
    for image in (str(path), Image.open(path), array, pixels):
        assert captioner.caption(image) == one  # the same picture, however it is given
    many = captioner.caption([path, array, path], batch_size=2)
    assert many == [one, one, one]
    with torch.no_grad():
        direct = model.generate(to_pixels(load_image(path, 32)[None]))
    assert one["caption"] == captioner.tokenizer.decode(direct.ids[0, 0])
    beams = captioner.caption(path, num_beams=3, num_return=3)
    assert len(beams["captions"]) == 3 and beams["caption"] == beams["captions"][0]["caption"]


def test_a_retrieval_model_embeds_and_classifies(tmp_path, scene):
    path, _ = scene
    directory, model = saved(tmp_path, "retrieval-tiny")
    retrieval = mmt.load(directory)
    image = retrieval.embed_images(path)
    texts = retrieval.embed_texts(WORDS)
    assert image.shape == (model.config.embed_dim,) and texts.shape == (3, model.config.embed_dim)
    assert torch.allclose(image.norm(), torch.tensor(1.0), atol=1e-5)
    ranked = retrieval.classify([path, path], ["red circle", "blue square"], template="a {}")
    assert len(ranked) == 2 and ranked[0] == ranked[1]
    assert sum(item["score"] for item in ranked[0]["labels"]) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="needs labels"):
        retrieval.classify(path, [" "])


def test_wrong_inputs_are_named(tmp_path, scene):
    path, _ = scene
    directory, _ = saved(tmp_path, "caption-tiny", vocab_size=14)
    captioner = mmt.load(directory)
    with pytest.raises(ValueError, match="holds a caption model; this needs a vqa model"):
        captioner.answer(path, "what?")
    with pytest.raises(ValueError, match=r"image 0: a tensor image must be the model's pixels"):
        captioner.caption(torch.zeros(3, 8, 8))
    with pytest.raises(ImageError, match="missing.png: image not found"):
        captioner.caption([path, tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="greedy decoding returns one sequence"):
        captioner.caption(path, num_return=2)


def test_overrides_change_the_saved_settings(tmp_path):
    directory, _ = saved(tmp_path, "retrieval-tiny")
    assert mmt.load(directory, overrides=["model.rerank_k=3"]).model.config.rerank_k == 3
    assert mmt.load(directory, overrides=["generation.num_beams=2"]).generation.num_beams == 2
    with pytest.raises(mmt.ConfigError, match="only model.\\* and generation.\\*"):
        mmt.load(directory, overrides=["train.steps=3"])


def test_a_vqa_classifier_refuses_answers_that_are_not_its_own(tmp_path):
    from mmt.data.answers import AnswerVocab

    directory, _ = saved(tmp_path, "vqa-small", num_answers=3)
    AnswerVocab(["yes", "no"]).save(directory / "answers.json")  # another model's: 2 answers for 3 outputs
    with pytest.raises(ValueError, match=r"answers\.json: 2 answers for a classifier of 3 outputs"):
        mmt.load(directory)
    AnswerVocab(["yes", "no", "2"]).save(directory / "answers.json")
    assert mmt.load(directory).answers.answers == ["yes", "no", "2"]


def test_predict_captions_a_folder_or_a_pattern_of_images_into_json_lines(tmp_path, scene, capsys):
    import json

    from mmt.cli import main

    path, _ = scene
    directory, _ = saved(tmp_path, "caption-tiny", vocab_size=14)
    one = mmt.load(directory).caption(path)
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for name in ("b.png", "trip/a.JPG", "c.png"):
        Image.open(path).save(photos / name, "PNG" if name.endswith(".png") else "JPEG")
    (photos / "broken.png").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("not an image file by its name: not listed")
    out = tmp_path / "captions.jsonl"
    assert main(["predict", str(directory), "--image", str(photos), "--out", str(out)]) == 1  # one image failed
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in results] == [str(photos / n) for n in ("b.png", "broken.png", "c.png", "trip/a.JPG")]
    assert results[0]["caption"] == results[2]["caption"] == one["caption"] and "error" not in results[0]
    assert results[1]["caption"] is None and results[1]["error"].startswith("image 2: ") and "broken.png" in results[1]["error"]
    assert "answered 3 of 4 images" in capsys.readouterr().out
    assert main(["predict", str(directory), "--image", str(photos / "*.png"), "--out", str(out)]) == 1
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == [str(photos / n) for n in ("b.png", "broken.png", "c.png")]
    capsys.readouterr()
    odd = photos / "odd[1].png"  # a file whose name looks like a pattern is one image
    Image.open(path).save(odd)
    assert main(["predict", str(directory), "--image", str(odd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"] == one["caption"]
    assert main(["predict", str(directory), "--image", str(photos)]) == 2  # several images need --out
    assert "needs --out" in capsys.readouterr().err
    assert main(["predict", str(directory), "--image", str(tmp_path / "none" / "*.png"), "--out", str(out)]) == 2
    assert "no image files" in capsys.readouterr().err


def test_a_retrieval_model_searches_an_index_built_with_it(tmp_path, scene):
    from mmt.search import SearchIndexError, build_index

    directory, _ = saved(tmp_path, "retrieval-tiny")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(gallery / f"{i}.png")
    build_index(directory, gallery, tmp_path / "index", progress=False)
    retrieval = mmt.load(directory)
    by_image = retrieval.search(tmp_path / "index", image=Image.open(gallery / "2.png"), k=2)
    assert by_image[0]["path"].endswith("2.png") and by_image[0]["score"] == pytest.approx(1.0, abs=1e-4)
    by_text = retrieval.search(tmp_path / "index", text="a red circle", k=3)
    assert [hit["rank"] for hit in by_text] == [1, 2, 3]
    from mmt.search import search

    assert [hit["path"] for hit in by_text] == [hit["path"] for hit in search(tmp_path / "index", text="a red circle", k=3)]
    other, _ = saved(tmp_path / "other", "retrieval-tiny", embed_dim=16)
    with pytest.raises(SearchIndexError, match="built with another model"):
        mmt.load(other).search(tmp_path / "index", text="a red circle")
    with pytest.raises(ValueError, match="exactly one query"):
        retrieval.search(tmp_path / "index")


def test_device_and_precision_of_a_loaded_model(tmp_path, scene):
    path, _ = scene
    directory, _ = saved(tmp_path, "retrieval-tiny")
    fp32 = mmt.load(directory)  # device "auto": the CPU here unless torch sees a GPU
    assert fp32.device.type == ("cuda" if torch.cuda.is_available() else "cpu") and fp32.dtype is None
    bf16 = mmt.load(directory, device="cpu", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and "bf16 autocast" in repr(bf16)
    a, b = fp32.embed_images(path).cpu(), bf16.embed_images(path)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05  # the same model, in bf16 arithmetic
    assert mmt.load(directory, device="cpu", dtype=torch.float32).dtype is None
    with pytest.raises(ValueError, match="precision 'half' is not one of"):
        mmt.load(directory, dtype="half")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            mmt.load(directory, device="cuda")
