"""Own image files for training and evaluation (`mmt.data.loader`): batches that are a pure
function of (seed, step) with augmentation, in worker processes or not, split or whole; a
corrupt image named wherever it is met; each image decoded at most once before training;
progress bars only where a person sees them."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmt.data.formats.records
import mmt.data.images
import mmt.tasks.retrieval
from mmt.cli import main
from mmt.data.formats.records import DataError
from mmt.data.images import Fit, load_image, to_pixels
from mmt.data.loader import ImageFiles, Pixels, StepImages, decode_all
from mmt.data.progress import bar, progress_bars
from mmt.tasks.common import SourceConfig, epoch_order, own_image_texts, share
from mmt.train import latest_checkpoint
from tests.own_data import caption_lines, shapes_images


def photo_files(folder: Path, n: int) -> ImageFiles:
    """n random 40x30 PNG photos (not square: fitting crops them), as ImageFiles at 16."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
    return ImageFiles(paths, Fit(16), ["data.jsonl"] * n, [f"line {i + 1}" for i in range(n)])


def plan_for(n: int, batch: int, seed: int = 3):
    def plan(step, part, parts):
        slots = share(np.arange(batch), part, parts)
        return epoch_order(seed, step, batch, n)[slots], slots
    return plan


def children() -> list[int]:
    """The live child processes of this process (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_augmented_batches_are_a_function_of_seed_and_step_alone(tmp_path):
    files = photo_files(tmp_path / "img", 10)
    plan = plan_for(10, 6)
    whole = StepImages(files, plan, seed=3, augment=True, workers=0)
    steps = [whole.take(step) for step in range(5)]
    assert all(b.shape == (6, 16, 16, 3) and b.dtype == np.uint8 for b in steps)

    # in 2 worker processes, restarted at step 3 (a resumed run): the same images
    resumed = StepImages(files, plan, seed=3, augment=True, workers=2)
    assert all(np.array_equal(resumed.take(step), steps[step]) for step in (3, 4))
    assert all(np.array_equal(resumed.take(step), steps[step]) for step in (1, 2))  # asked out of order: restarts there
    if Path("/proc/self/stat").is_file():  # (Linux: count this process's children)
        assert len(children()) >= 2
        resumed.close()  # its DataLoader processes stop now, not at a garbage collection
        assert children() == []
    resumed.close()

    # split in 3 shares (processes x micro-steps, accumulation 3): the shares make up the whole batch
    split = StepImages(files, plan, seed=3, augment=True, workers=1, accumulate=3)
    for step in range(3):
        assert np.array_equal(np.concatenate([split.take(step, part, 3) for part in range(3)]), steps[step])
    split.close()

    # the augmentation is real: another seed, or none, gives other pixels; the fitted image is the pipeline's
    plain = StepImages(files, plan, seed=3, augment=False, workers=0).take(0)
    assert not np.array_equal(plain, steps[0])
    first = int(plan(0, 0, 1)[0][0])
    assert np.array_equal(plain[0], load_image(files.paths[first], Fit(16)))
    assert not np.array_equal(StepImages(files, plan, seed=4, augment=True, workers=0).take(0)[1:], steps[0][1:])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_met_while_training_is_named_with_its_record(tmp_path, workers):
    files = photo_files(tmp_path / "img", 4)
    data = Path(files.paths[2]).read_bytes()
    Path(files.paths[2]).write_bytes(data[: len(data) // 2])  # truncated: its header still reads
    images = StepImages(files, lambda step, part, parts: (np.array([0, 1, 2, 3]), np.arange(4)), seed=0, augment=False, workers=workers)
    with pytest.raises(DataError) as caught:
        images.take(0)
    message = str(caught.value)
    assert message.startswith("data.jsonl: line 3: image ") and "2.png" in message and "mmt data check" in message


def test_decode_all_keeps_order_and_skips_and_counts_only_when_asked(tmp_path):
    files = photo_files(tmp_path / "img", 5)
    Path(files.paths[1]).write_bytes(b"not an image")
    with pytest.raises(DataError, match="line 2: image .*1.png"):
        decode_all(files, workers=0)
    images, kept, bad = decode_all(files, workers=2, skip_bad=True)
    assert kept == [0, 2, 3, 4] and bad.counts == {"corrupt_image": 1}
    assert all(np.array_equal(images[k], load_image(files.paths[i], Fit(16))) for k, i in enumerate(kept))
    pixels = Pixels(images)
    assert len(pixels) == 4 and torch.equal(pixels[1:3], to_pixels(images[1:3]))
    assert torch.equal(pixels[torch.tensor([3, 0])], to_pixels(images[[3, 0]]))


def test_each_image_is_decoded_at_most_once_before_training(tmp_path, monkeypatch):
    lines = caption_lines(shapes_images(tmp_path, 20, seed=1))
    (tmp_path / "pairs.jsonl").write_text("\n".join(line for image in lines for line in image) + "\n")
    decodes: dict[str, int] = {}
    real = mmt.data.images.with_image

    def counting(source, use, *, name=None, max_pixels=mmt.data.images.MAX_PIXELS, load=True):
        if load:
            decodes[str(source)] = decodes.get(str(source), 0) + 1
        return real(source, use, name=name, max_pixels=max_pixels, load=load)

    monkeypatch.setattr(mmt.data.images, "with_image", counting)
    monkeypatch.setattr(mmt.data.formats.records, "with_image", counting)
    for skip_bad in (False, True):
        decodes.clear()
        src = SourceConfig(train=str(tmp_path / "pairs.jsonl"), workers=0, skip_bad=skip_bad)
        train, val = own_image_texts(src, Fit(16), tmp_path)
        assert (len(train), len(val)) == (18, 2)
        # without skip_bad only the 2 held-out validation images; with it every image, once
        assert sorted(decodes.values()) == [1] * (20 if skip_bad else 2), skip_bad


def test_skip_bad_finds_a_corrupt_training_image_before_training(tmp_path):
    lines = caption_lines(shapes_images(tmp_path, 12, seed=2))
    (tmp_path / "pairs.jsonl").write_text("\n".join(line for image in lines for line in image) + "\n")
    (tmp_path / "img" / "3.png").write_bytes((tmp_path / "img" / "3.png").read_bytes()[:60])  # header intact, pixels cut
    src = SourceConfig(train=str(tmp_path / "pairs.jsonl"), workers=0)
    train, _ = own_image_texts(src, Fit(16), tmp_path)  # headers only: found later, when decoded
    assert len(train) == 11
    src.skip_bad = True
    train, _ = own_image_texts(src, Fit(16), tmp_path)
    assert len(train) == 10 and train.skipped == {"corrupt_image": 1}
    assert "3.png" not in " ".join(train.files.paths)
    assert json.loads((tmp_path / "data_report.json").read_text())["skipped_train"] == {"corrupt_image": 1}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_show_only_on_a_terminal_and_when_on(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert bar(range(3), desc="x").disable  # not a terminal (a pipe, a log, a test)
    monkeypatch.setattr("sys.stderr", Terminal())
    assert not bar(range(3), desc="x").disable
    with progress_bars(False):  # mmt train --no-progress
        assert bar(range(3), desc="x").disable
    assert not bar(range(3), desc="x").disable


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


def train_args(run, data, steps=6):
    return ["train", "retrieval", str(run), "--preset", "retrieval-tiny", "--no-progress"] + sets([
        f"source.train={data / 'train.jsonl'}", f"source.val={data / 'val.jsonl'}", "source.workers=2", "source.augment=true",
        f"train.steps={steps}", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=6", "train.save_every=2",
        "train.log_every=1", "train.threads=1",
    ])


def losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


class Stop(Exception):
    pass


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_augmented_run_on_image_files_resumes_exactly(tmp_path, monkeypatch):
    lines = caption_lines(shapes_images(tmp_path, 16, seed=4))
    (tmp_path / "train.jsonl").write_text("\n".join(line for image in lines[:12] for line in image) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(line for image in lines[12:] for line in image) + "\n")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(train_args(whole, tmp_path)) == 0

    real = mmt.tasks.retrieval.RetrievalTask.train_batch

    def stop_at_step_3(self, step, part=0, parts=1):
        if step == 3:
            raise Stop  # after checkpoint step-2: steps 2 and 3 are redone on resume
        return real(self, step, part, parts)

    monkeypatch.setattr(mmt.tasks.retrieval.RetrievalTask, "train_batch", stop_at_step_3)
    with pytest.raises(Stop):
        main(train_args(broken, tmp_path))
    monkeypatch.setattr(mmt.tasks.retrieval.RetrievalTask, "train_batch", real)
    assert main(["train", "retrieval", str(broken), "--resume", "--no-progress"]) == 0  # fresh workers, restarted at step 2

    assert losses(broken) == losses(whole) and len(losses(whole)) == 6
    a = load_file(latest_checkpoint(whole) / "model.safetensors")
    b = load_file(latest_checkpoint(broken) / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
