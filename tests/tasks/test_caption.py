"""Captioning and generative VQA on the shapes world: tiny train -> eval -> predict, and the scorer CLI."""

import json

import pytest
from PIL import Image

from mmt.cli import main
from mmt.data.worlds import shapes
from tests.own_data import caption_lines, shapes_images

TINY_CAPTION = [
    "data.image_size=32",
    "data.num_train=64",
    "data.num_val=8",
    "data.num_test=8",
    "train.steps=6",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.eval_every=3",
    "train.save_every=3",
    "train.log_every=1",
]


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("caption") / "run"
    args = ["train", "caption", str(directory), "--preset", "caption-tiny", "--no-progress", *sets(TINY_CAPTION)]
    assert main(args) == 0
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    scene = shapes.ShapesSplit.generate(1, seed=5).images[0]
    Image.fromarray(scene).save(folder / "scene.png")  # 64x64: predict resizes to the model's 32
    (folder / "corrupt.png").write_bytes(b"not a png")
    return folder


@pytest.mark.e2e
def test_caption_run_logs_caption_metrics_and_truth(caption_run):
    records = [json.loads(line) for line in (caption_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    assert len(evals) == 2
    assert {"BLEU-4", "CIDEr-D", "ROUGE-L", "fact_precision", "fact_recall"} <= set(evals[-1])
    losses = [r["caption_loss"] for r in records if "caption_loss" in r]
    assert losses[-1] < losses[0]  # six steps already lower the loss
    assert {"tokenizer.json", "model", "checkpoints", "run_config.json"} <= {p.name for p in caption_run.iterdir()}
    # caption-tiny's 16 positions are raised to fit the longest training caption, so none is cut
    config = json.loads((caption_run / "model" / "config.json").read_text())
    assert config["max_len"] > 16 and json.loads((caption_run / "run_config.json").read_text())["model"]["max_len"] == config["max_len"]


@pytest.mark.e2e
def test_caption_eval_writes_scores_and_coco_files(caption_run, capsys):
    out = caption_run / "test_eval.json"
    assert main(["eval", str(caption_run), "--out", str(out), "--set", "generation.num_beams=2"]) == 0
    printed = capsys.readouterr().out
    assert "8 test images captioned" in printed and "beam search, width 2" in printed and "CIDEr-D" in printed
    scores = json.loads(out.read_text())
    assert 0.0 <= scores["fact_precision"] <= 1.0 and 0.0 <= scores["BLEU-1"] <= 1.0
    results = json.loads((caption_run / "test_eval_captions.json").read_text())
    assert len(results) == 8 and {"image_id", "caption"} <= set(results[0])
    # the written files score again through `mmt score captions`, to the same numbers
    refs = caption_run / "test_eval_references.json"
    again = caption_run / "again.json"
    assert main(["score", "captions", "--results", str(caption_run / "test_eval_captions.json"), "--references", str(refs), "--out", str(again)]) == 0
    rescored = json.loads(again.read_text())
    assert rescored["CIDEr-D"] == pytest.approx(scores["CIDEr-D"], abs=1e-9)


@pytest.mark.e2e
def test_predict_captions_with_beams_and_samples(caption_run, images, capsys):
    image = str(images / "scene.png")
    assert main(["predict", str(caption_run), "--image", image, "--beam", "3", "--num-return", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["captions"]) == 3 and result["caption"] == result["captions"][0]["caption"]
    scores = [c["score"] for c in result["captions"]]
    assert scores == sorted(scores, reverse=True)
    sampled = []
    for _ in range(2):
        assert main(["predict", str(caption_run), "--image", image, "--sample", "--top-p", "0.9", "--seed", "4", "--json"]) == 0
        sampled.append(json.loads(capsys.readouterr().out)["caption"])
    assert sampled[0] == sampled[1]  # same seed, same caption
    assert main(["predict", str(caption_run), "--image", image, "--beam", "2", "--sample"]) == 2  # contradictory options


@pytest.mark.e2e
def test_batch_caption_reports_bad_lines_and_captions_the_rest(caption_run, images, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"image": str(images / "scene.png"), "id": 1}),
                json.dumps({"image": str(images / "corrupt.png")}),
                "{oops",
                json.dumps({"image": str(images / "scene.png"), "id": 4}),
            ]
        )
        + "\n"
    )
    assert main(["predict", str(caption_run), "--input", str(src), "--out", str(out)]) == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("id") for line in lines] == [1, None, None, 4]
    assert isinstance(lines[0]["caption"], str) and lines[0]["caption"] == lines[3]["caption"]
    assert "corrupt.png: " in lines[1]["error"] and "invalid JSON" in lines[2]["error"]
    assert "in.jsonl:2" in capsys.readouterr().err


@pytest.mark.e2e
def test_image_size_mismatch_is_a_clear_error(tmp_path, capsys):
    args = ["train", "caption", str(tmp_path / "r"), "--preset", "caption-tiny", "--no-progress"]
    assert main(args + sets(["data.num_train=4", "data.num_val=2", "data.num_test=2"])) == 2
    assert "data.image_size=64" in capsys.readouterr().err


# ----------------------------------------------------------------------------- generative VQA

TINY_VQA = [
    "dataset=shapes",
    "model.head=generate",
    "model.vision.image_size=32",
    "model.vision.encoder.depth=1",
    "model.fusion_encoder.depth=1",
    "shapes.image_size=32",
    "shapes.num_train=40",
    "shapes.num_val=6",
    "shapes.num_test=6",
    "train.steps=4",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.log_every=1",
]


@pytest.mark.e2e
def test_generative_vqa_trains_evaluates_and_answers_in_words(tmp_path, images, capsys):
    run = tmp_path / "gen"
    assert main(["train", "vqa", str(run), "--no-progress", *sets(TINY_VQA)]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["eval"]) == {"overall", *shapes.QTYPES}
    assert main(["eval", str(run)]) == 0
    table = capsys.readouterr().out
    assert all(qtype in table for qtype in shapes.QTYPES)
    assert main(["predict", str(run), "--image", str(images / "scene.png"), "--question", "how many objects are there?", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert isinstance(answer["answer"], str) and 0.0 <= answer["score"] <= 1.0
    # decoding options reach the answer decoder too
    args = ["predict", str(run), "--image", str(images / "scene.png"), "--question", "is there a cross?", "--beam", "2", "--num-return", "2", "--json"]
    assert main(args) == 0
    beams = json.loads(capsys.readouterr().out)["answers"]
    assert len(beams) == 2 and beams[0]["score"] >= beams[1]["score"]


@pytest.mark.e2e
def test_vqa_on_shapes_needs_the_matching_image_size(tmp_path, capsys):
    args = ["train", "vqa", str(tmp_path / "r"), "--no-progress", "--set", "dataset=shapes"]
    assert main(args) == 2  # vqa-small reads 75x75 Sort-of-CLEVR images; the shapes world is 64x64
    assert "set model.vision.image_size=64" in capsys.readouterr().err


@pytest.mark.e2e
def test_eval_of_a_model_directory_uses_the_runs_data_settings(caption_run, tmp_path, capsys):
    # the model directory carries the run's config, so its 8 test images at 32x32 are used
    assert main(["eval", str(caption_run / "model"), "--out", str(tmp_path / "e.json")]) == 0
    assert "8 test images captioned" in capsys.readouterr().out


@pytest.mark.e2e
def test_caption_trains_and_evaluates_on_your_own_json_lines(tmp_path, capsys):
    lines = [line for image in caption_lines(shapes_images(tmp_path, 12, seed=4)) for line in image]  # 1-3 captions each
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    args = ["train", "caption", str(run), "--preset", "caption-tiny", "--no-progress",
            "--set", f"source.train={tmp_path / 'pairs.jsonl'}", "--set", "captions_per_image=2"]
    assert main(args + sets(["train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2", "train.save_every=2"])) == 0
    assert json.loads((run / "data_report.json").read_text())["train_images"] == 11
    assert main(["eval", str(run), "--set", f"source.test={tmp_path / 'pairs.jsonl'}"]) == 0
    out = capsys.readouterr().out
    assert "CIDEr-D" in out and "fact_precision" not in out  # no scene graphs: reference metrics only
    results = json.loads((run / "eval_captions.json").read_text())
    assert len(results) == 12
