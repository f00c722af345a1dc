"""Training that streams its images from webdataset shards (`mmt data pack`, then
source.train=SHARD_DIR): it trains, resumes exactly where it stopped, and asks for
validation data it cannot hold out."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import mmt.tasks.caption
from mmt.cli import main
from mmt.data.formats.shards import pack
from mmt.train import latest_checkpoint
from tests.own_data import caption_lines, shapes_images


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 training images with 1-3 captions each, packed in 5 shards, and 4 validation images."""
    root = tmp_path_factory.mktemp("streaming")
    lines = caption_lines(shapes_images(root, 28, seed=5))
    (root / "train.jsonl").write_text("\n".join(line for image in lines[:24] for line in image) + "\n")
    (root / "val.jsonl").write_text("\n".join(line for image in lines[24:] for line in image) + "\n")
    summary = pack(root / "train.jsonl", root / "shards", shard_size=5)
    assert summary["num_samples"] == 24 and summary["num_shards"] == 5
    return root


def train_args(task, run, data, steps=6, workers=2):
    preset = {"caption": "caption-tiny", "retrieval": "retrieval-tiny"}[task]
    return ["train", task, str(run), "--preset", preset, "--no-progress"] + sets([
        f"source.train={data / 'shards'}", f"source.val={data / 'val.jsonl'}", f"source.workers={workers}", "source.shuffle_buffer=6",
        f"train.steps={steps}", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=6", "train.save_every=2",
        "train.log_every=1", "train.threads=1",
    ])


def losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_retrieval_trains_from_shards(data, capsys):
    run = data / "retrieval-run"
    assert main(train_args("retrieval", run, data, steps=3)) == 0
    assert json.loads((run / "data_report.json").read_text()) == {
        "train_images": 24, "val_images": 4, "skipped_train": {}, "skipped_val": {}
    }
    assert [step for step, _ in losses(run)] == [1, 2, 3]
    assert "i2t_R@1" in (run / "metrics.jsonl").read_text()


class Stop(Exception):
    pass


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_caption_run_from_shards_resumes_exactly(data, monkeypatch):
    whole, broken = data / "whole", data / "broken"
    assert main(train_args("caption", whole, data)) == 0

    real = mmt.tasks.caption.CaptionTask.train_batch

    def stop_at_step_3(self, step, part=0, parts=1):
        if step == 3:
            raise Stop  # after checkpoint step-2: steps 2 and 3 are redone on resume
        return real(self, step, part, parts)

    monkeypatch.setattr(mmt.tasks.caption.CaptionTask, "train_batch", stop_at_step_3)
    with pytest.raises(Stop):
        main(train_args("caption", broken, data))
    assert latest_checkpoint(broken).name.endswith("2")
    monkeypatch.setattr(mmt.tasks.caption.CaptionTask, "train_batch", real)
    assert main(["train", "caption", str(broken), "--resume", "--no-progress"]) == 0  # a fresh stream, restarted at step 2

    assert losses(broken) == losses(whole)
    a = load_file(latest_checkpoint(whole) / "model.safetensors")
    b = load_file(latest_checkpoint(broken) / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.e2e
def test_training_from_shards_needs_validation_data(data, capsys):
    args = train_args("caption", data / "no-val", data, steps=1)
    args[args.index(f"source.val={data / 'val.jsonl'}")] = "source.val="
    assert main(args) == 2
    assert "give validation data as source.val" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_vqa_trains_from_shards_and_reads_a_shard_folder_as_validation_and_test_data(tmp_path):
    split = shapes_images(tmp_path, 6, seed=3)
    lines = []
    for i, qas in enumerate(split.qa):
        lines += [json.dumps({"image": f"img/{i}.png", "question": qa.question, "answer": [qa.answer] * 3 + ["maybe"]}) for qa in qas]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    summary = pack(tmp_path / "qa.jsonl", tmp_path / "shards", shard_size=10)
    assert summary["num_samples"] == len(lines) and summary["kind"] == "vqa"
    run = tmp_path / "run"
    args = ["train", "vqa", str(run), "--no-progress"] + sets([
        f"source.train={tmp_path / 'shards'}", f"source.val={tmp_path / 'shards'}", "source.workers=2", "model.vision.image_size=32",
        "model.vision.encoder.depth=1", "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=2",
        "train.save_every=2", "train.log_every=1",
    ])
    assert main(args) == 0
    assert json.loads((run / "data_report.json").read_text()) == {"train_questions": len(lines), "skipped_train": {}}
    answers = json.loads((run / "answers.json").read_text())["answers"]
    assert "maybe" not in answers and set(answers) == {qa.answer for qas in split.qa for qa in qas}
    evals = [json.loads(line)["eval"] for line in (run / "metrics.jsonl").read_text().splitlines() if "eval" in line]
    assert len(evals) == 1 and 0.0 <= evals[0]["overall"] <= 1.0
    assert main(["eval", str(run), "--set", f"source.test={tmp_path / 'shards'}"]) == 0  # a shard folder as test data, read whole
