"""Text to image end to end: train the tokenizer and the generator (tiny), evaluate both, draw
from a sentence on the command line and through the Python API; the tokenizer's EMA codebook
resumes exactly."""

import json

import numpy as np
import pytest
from PIL import Image

import mmt
from mmt import checkpoint
from mmt import train as train_lib
from mmt.cli import main
from mmt.config import apply_overrides
from mmt.data.worlds.shapes_t2i import CATEGORIES
from mmt.tasks.t2i import VQVAERunConfig, VQVAETask

DATA = ["data.image_size=32", "data.num_train=200", "data.num_val=20", "data.num_test=20"]
TINY_VQVAE = DATA + ["train.steps=20", "train.batch_size=16", "train.eval_every=20", "train.save_every=10"]
TINY_T2I = DATA + ["train.steps=12", "train.batch_size=16", "train.warmup_steps=2", "train.eval_every=12", "train.save_every=12", "images_per_prompt=2"]


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    assert main(["train", "vqvae", str(root / "vqvae"), "--preset", "vqvae-tiny", "--no-progress", *sets(TINY_VQVAE)]) == 0
    args = ["train", "t2i", str(root / "t2i"), "--preset", "t2i-tiny", "--no-progress", *sets(TINY_T2I + [f"image_tokenizer={root / 'vqvae'}"])]
    assert main(args) == 0
    return root / "vqvae", root / "t2i"


@pytest.mark.e2e
def test_both_stages_train_and_evaluate(runs, capsys):
    vqvae, t2i = runs
    record = [json.loads(line) for line in (vqvae / "metrics.jsonl").read_text().splitlines() if '"psnr"' in line][-1]
    assert {"psnr", "parse_exact", "codes_used", "perplexity"} <= record["eval"].keys()
    assert main(["eval", str(vqvae)]) == 0
    assert "scenes parsed exactly from the reconstruction" in capsys.readouterr().out
    assert main(["eval", str(t2i), "--guidance", "2"]) == 0
    out = capsys.readouterr().out
    assert "guidance 2.0" in out and "held-out" in out
    result = json.loads((t2i / "eval.json").read_text())
    for category in CATEGORIES:
        assert 0 <= result[f"seen_{category}"] <= 1
    assert "held_counting" not in result  # counting names no colour: no held-out prompts
    seen = result["seen_scores"]
    assert seen["overall"] == pytest.approx(np.mean(list(seen["categories"].values())))
    grid = Image.open(t2i / "eval_seen.png")
    assert grid.height == len(seen["prompts"]) * 34 - 2 and grid.width == 2 * 34 - 2  # a row per prompt, 2 images of 32 px


@pytest.mark.e2e
def test_generate_from_a_sentence_on_the_command_line_and_in_python(runs, tmp_path, capsys):
    _, t2i = runs
    for out in ("a", "b"):
        assert main(["generate", str(t2i), "--text", "a small red circle", "--text", "two squares", "--num", "3",
                     "--seed", "5", "--out", str(tmp_path / out)]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["grid.png"] + [f"text{t}-{i}.png" for t in range(2) for i in range(3)]
    for name in names:  # a seed draws the same images
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    predictor = mmt.load(t2i)
    images = predictor.generate_images(["a small red circle", "two squares"], num=3, seed=5)[0]  # (a seed draws a batch)
    assert [image.size for image in images] == [(32, 32)] * 3
    assert np.array_equal(np.asarray(images[1]), np.asarray(Image.open(tmp_path / "a" / "text0-1.png")))
    assert len(predictor.generate_images("three crosses", num=2)) == 2  # one text: one list
    with pytest.raises(ValueError, match="text 1 is longer than the model reads"):
        predictor.generate_images(["two squares", " ".join(["a small red circle and"] * 20)])
    with pytest.raises(ValueError, match="text 0 is empty"):
        predictor.generate_images([""])
    assert main(["generate", str(t2i), "--out", str(tmp_path / "c")]) == 2  # no --text
    assert "--text" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_generator_needs_a_tokenizer_run(runs, tmp_path, capsys):
    _, t2i = runs
    args = ["train", "t2i", str(tmp_path / "x"), "--preset", "t2i-tiny", "--no-progress", *sets(TINY_T2I + [f"image_tokenizer={t2i}"])]
    assert main(args) == 2
    assert "holds a t2i model, not a vqvae" in capsys.readouterr().err


def tiny_vqvae():
    return apply_overrides(VQVAERunConfig(model=mmt.registry.preset("vqvae-tiny")), TINY_VQVAE)


@pytest.mark.e2e
def test_the_tokenizer_resumes_exactly(tmp_path):
    """The codebook's moving averages, its "started" flag and the dead-code restarts' random
    draws all come back from a checkpoint."""
    straight = tmp_path / "straight"
    train_lib.train(VQVAETask(tiny_vqvae()), straight, progress=False)
    crashed = tmp_path / "crashed"
    task = VQVAETask(tiny_vqvae())
    real_batch = task.train_batch

    def crash_at_step_13(step, part=0, parts=1):
        if step == 13:
            raise KeyboardInterrupt("simulated crash")
        return real_batch(step, part, parts)

    task.train_batch = crash_at_step_13
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(task, crashed, progress=False)
    train_lib.train(VQVAETask(tiny_vqvae()), crashed, resume=True, progress=False)
    a = checkpoint.read_weights(straight / "model" / "model.safetensors")
    b = checkpoint.read_weights(crashed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and "codebook.count" in a
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
