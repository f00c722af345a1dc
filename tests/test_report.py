"""`mmt report`: one self-contained HTML page for a run of any task, finished or still training."""

import re
import shutil

import pytest

from mmt.cli import main
from mmt.report import read_metrics

SHAPES = ["data.image_size=32", "data.num_train=64", "data.num_val=8", "data.num_test=8", "train.steps=4",
          "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=4", "train.save_every=4", "train.log_every=1"]
VQA = ["data.num_train=8", "data.num_test=6", "train.steps=4", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=2",
       "train.save_every=2", "train.log_every=1", "model.vision.encoder.depth=1", "model.fusion_encoder.depth=1"]


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


def page(out) -> str:
    text = (out / "report.html").read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    return text


@pytest.mark.e2e
def test_a_vqa_report_has_curves_the_table_and_right_and_wrong_examples(tmp_path):
    run = tmp_path / "vqa"
    assert main(["train", "vqa", str(run), "--no-progress", *sets(VQA)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--examples", "2"]) == 0
    text = page(tmp_path / "out")
    assert "<h2>Training</h2>" in text and "<h2>Evaluation</h2>" in text and "predictions from the final model" in text
    assert re.search(r"<td>overall</td><td>[01]\.\d{4}</td>", text)
    examples = re.findall(r'<div class="example"><img width="\d+" src="data:image/png;base64,', text)
    marks = re.findall(r'<b class="(right|wrong)">', text)
    assert 1 <= len(examples) == len(marks) <= 4  # a 4-step model is right on some questions, wrong on others
    # the same run still training: its newest checkpoint, the metrics so far, a torn last line left out
    live = tmp_path / "live"
    shutil.copytree(run, live)
    shutil.rmtree(live / "model")
    with (live / "metrics.jsonl").open("a") as log:
        log.write('{"step": 5, "loss": 1.2')
    assert len(read_metrics(live)) == len(read_metrics(run))
    assert main(["report", str(live), "--out", str(tmp_path / "live-out")]) == 0
    assert "checkpoint step-0000004 (the run is still training)" in page(tmp_path / "live-out")


@pytest.mark.e2e
@pytest.mark.parametrize("task,preset", [("caption", "caption-tiny"), ("retrieval", "retrieval-tiny"), ("pretrain", "retrieval-tiny")])
def test_caption_and_retrieval_reports(tmp_path, task, preset):
    run = tmp_path / task
    assert main(["train", task, str(run), "--preset", preset, "--no-progress", *sets(SHAPES)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--examples", "1"]) == 0
    text = page(tmp_path / "out")
    assert "<h2>Training</h2>" in text and text.count('<div class="example">') >= 1
    assert ("truth: " in text) and (task == "caption" or '<b class="' in text)


@pytest.mark.e2e
def test_a_joint_fusion_report_shows_gradient_maps(tmp_path):
    run = tmp_path / "joint"
    overrides = [s for s in VQA if not s.startswith("model.")] + ["model.fusion_encoder.depth=1"]
    assert main(["train", "vqa", str(run), "--preset", "vqa-joint-small", "--no-progress", *sets(overrides)]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--examples", "1"]) == 0
    assert page(tmp_path / "out").count('<div class="example">') >= 1  # (joint fusion: no cross-attention, gradient maps)


def test_a_report_needs_a_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no run_config.json" in capsys.readouterr().err
