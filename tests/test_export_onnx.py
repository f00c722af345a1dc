"""mmt export --format onnx: each model kind's graphs compute what the PyTorch model computes
(onnxruntime, at batch sizes and text lengths other than the traced example's), the greedy loop
over the exported step writes the captions mmt writes, and bad input stops with clear errors."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mmt import checkpoint, registry  # noqa: E402
from mmt.cli import main  # noqa: E402
from mmt.data.answers import AnswerVocab  # noqa: E402
from mmt.export import TOLERANCE, OnnxCaptioner, check_export, export_run, read_manifest, session  # noqa: E402
from mmt.extras import MissingExtra  # noqa: E402
from mmt.text import Tokenizer  # noqa: E402

WORDS = ["a red circle left of a blue square", "what colour is the big triangle", "how many green crosses are there"]


def save_run(directory, preset, **changes):
    """A random model of `preset` saved as a run's model/ (every parameter nudged off its initial
    value, so that parts that start at zero, like the focus bias, count), with its tokenizer."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORDS)
    cfg = registry.preset(preset)
    if hasattr(cfg, "text"):
        cfg.text.vocab_size = tokenizer.vocab_size
    else:
        cfg.vocab_size = tokenizer.vocab_size
    for key, value in changes.items():
        setattr(cfg, key, value)
    model = registry.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if hasattr(model, "lm_head"):
            model.lm_head.weight.mul_(8.0)  # peaked: greedy choices are not near-ties
    checkpoint.save_pretrained(model, directory / "model", tokenizer)
    if model.model_type == "vqa":
        AnswerVocab([f"answer {i}" for i in range(cfg.num_answers)]).save(directory / "model" / "answers.json")
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """preset -> (run directory, export directory, model), each exported once."""
    made = {}

    def make(preset, **changes):
        if preset not in made:
            root = tmp_path_factory.mktemp(preset)
            model = save_run(root / "run", preset, **changes)
            export_run(root / "run", root / "onnx")
            made[preset] = (root / "run", root / "onnx", model)
        return made[preset]

    return make


@pytest.mark.parametrize("preset", ["vqa-fast", "vqa-joint-small"])
def test_the_vqa_classifier_exports_and_answers_as_pytorch(exported, preset):
    run, out, model = exported(preset)
    manifest = read_manifest(out)
    assert manifest["model_type"] == "vqa"
    assert sorted(manifest["files"]) == ["answers.json", "export.json", "tokenizer.json", "vqa.onnx"]
    assert (out / "answers.json").read_text() == (run / "model" / "answers.json").read_text()
    assert (out / "tokenizer.json").read_text() == (run / "model" / "tokenizer.json").read_text()
    graph = manifest["graphs"][0]
    S = model.config.vision.image_size
    assert graph["inputs"]["pixels"]["shape"] == ["batch", 3, S, S]
    assert graph["inputs"]["question_ids"]["shape"] == ["batch", "question_length"]
    assert graph["outputs"]["answer_logits"]["shape"] == ["batch", model.config.num_answers]
    # 5 questions of random lengths (the graph was traced with 2 of 6 tokens)
    result = check_export(run, out, rows=5)
    assert result["ok"], result
    assert result["max_abs_diff"]["answer_logits"] <= TOLERANCE
    assert result["answers_equal"] == 5
    # repeated questions: PyTorch encodes them once, the graph every row; the answers agree
    pixels = torch.rand(6, 3, S, S) * 2 - 1
    ids = Tokenizer.load(out / "tokenizer.json").batch([WORDS[1], WORDS[2]] * 3, model.config.text.max_len)[0]
    with torch.no_grad():
        expected = model.answer_logits(pixels, ids).numpy()
    got = session(out / "vqa.onnx").run(None, {"pixels": pixels.numpy(), "question_ids": ids.numpy()})[0]
    assert np.abs(expected - got).max() <= TOLERANCE


def test_the_retrieval_towers_export_as_two_graphs_of_unit_embeddings(exported):
    run, out, model = exported("retrieval-tiny")
    manifest = read_manifest(out)
    assert [g["file"] for g in manifest["graphs"]] == ["image_tower.onnx", "text_tower.onnx"]
    result = check_export(run, out, rows=7, texts=None)
    assert result["ok"], result
    assert set(result["max_abs_diff"]) == {"image_embedding", "text_embedding"}
    texts = Tokenizer.load(out / "tokenizer.json").batch(WORDS, 48)[0]
    embedding = session(out / "text_tower.onnx").run(None, {"text_ids": texts.numpy()})[0]
    assert embedding.shape == (3, model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_greedy_captions_from_the_exported_graphs_equal_mmts(exported):
    run, out, model = exported("caption-tiny", max_len=40)
    manifest = read_manifest(out)
    # without a run config, mmt.load decodes as far as the positions go; so does the loop
    assert manifest["decoding"]["max_new_tokens"] == 39
    step = next(g for g in manifest["graphs"] if g["file"] == "caption_step.onnx")
    depth = len(model.decoder.layers)
    assert list(step["inputs"])[:2] == ["ids", "position"]
    assert sum(name.startswith("past_") for name in step["inputs"]) == 2 * depth
    assert step["inputs"]["past_key.0"]["shape"][2] == "past" and step["outputs"]["present_key.0"]["shape"][2] == "present"
    result = check_export(run, out, rows=6)
    assert result["ok"], result
    assert result["captions_equal"] == result["captions"] == 6 and not result["mismatches"]
    assert result["max_abs_diff"]["step_logits"] <= TOLERANCE
    # the ids too, token for token, with the [PAD]s after [EOS]
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ids, scores = OnnxCaptioner(out).generate(pixels.numpy())
    expected = model.generate(pixels, max_new_tokens=manifest["decoding"]["max_new_tokens"])
    np.testing.assert_array_equal(ids, expected.ids[:, 0].numpy())
    np.testing.assert_allclose(scores, expected.scores[:, 0].numpy(), atol=TOLERANCE)


def test_the_check_fails_when_the_graphs_are_not_the_models(exported, tmp_path):
    run, out, model = exported("retrieval-tiny")
    other = save_run(tmp_path / "other", "retrieval-tiny")
    with torch.no_grad():
        other.image_proj.weight.mul_(-1.0)
    checkpoint.save_pretrained(other, tmp_path / "other" / "model", Tokenizer.load(out / "tokenizer.json"))
    result = check_export(tmp_path / "other", out, rows=3)
    assert not result["ok"] and result["max_abs_diff"]["image_embedding"] > 0.1


def test_bad_input_stops_with_an_error_naming_it(exported, tmp_path, capsys):
    run, out, _ = exported("retrieval-tiny")
    with pytest.raises(ValueError, match="'tflite' is not one of: onnx"):
        export_run(run, tmp_path / "new", format="tflite")
    with pytest.raises(Exception, match=f"{tmp_path}: not a run or model directory"):
        export_run(tmp_path, tmp_path / "new")
    with pytest.raises(ValueError, match=f"{out}: exists and is not an empty folder"):
        export_run(run, out)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), "--out", str(tmp_path / "empty")]) == 0  # an empty folder will do
    assert "image_tower.onnx" in capsys.readouterr().out
    assert json.loads((tmp_path / "empty" / "export.json").read_text())["model_type"] == "retrieval"
    assert main(["export", str(run), "--out", str(tmp_path / "empty")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    generative = tmp_path / "generative"
    save_run(generative, "vqa-small", head="generate")
    with pytest.raises(ValueError, match="only a VQA classifier"):
        export_run(generative, tmp_path / "gen-out")


def test_a_missing_onnx_names_the_extra(exported, tmp_path, monkeypatch):
    run, _, _ = exported("retrieval-tiny")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails
    with pytest.raises(MissingExtra, match=r"mmt-vl\[export\]"):
        export_run(run, tmp_path / "out")
