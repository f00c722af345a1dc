"""Own data at scale: is the loader or the model the bottleneck, and how much memory does a run take?

Generates (once; images already there are kept) a COCO-format captions set in FOLDER: N JPEG
images of 640x480 (FOLDER/images/*.jpg, FOLDER/captions.json, 5 captions each) and 200 more
for validation (FOLDER/val.json). The pictures are smooth random colour fields with a few
shapes and a little noise (JPEGs of ~40 KB; a decode costs about what a photo's does).

Then measures, at image size 224, batch 32:
  (a) images/s of the own-data training loader alone (`mmt.data.loader.StepImages` over the
      N files: read, decode, fit or augment, stack), with source.workers 0, 1 and 2, without
      and with source.augment;
  (b) images/s of a training step of the retrieval model, the real trainer (`mmt train
      retrieval`) on the shapes world rendered at 224 and held in memory (no loader);
  (c) the same model trained on the generated set through the real code path (`mmt train
      retrieval --set source.train=FOLDER/captions.json`, source.workers=2): its images/s,
      and the peak memory of the process and its DataLoader workers, sampled every 0.2 s
      (RSS of the training process; RSS and PSS summed over the process tree).

The model: preset retrieval-small with model.vision.image_size=224, model.vision.stem=patch,
model.vision.patch_size=16 (14x14 image tokens; the preset's conv stem would give 28x28).

    python benchmarks/own_data_loader.py FOLDER [--n 20000] [--steps 30] [--batches 8]

The loader is not the bottleneck when (a) at the run's workers is well above (b), and (c)
trains about as fast as (b).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WORDS = ("red blue green small large circle square dog cat person street car tree table window "
         "sitting standing next to on under a the of with and near two three").split()


VAL_IMAGES = 200  # images after the N training ones, for source.val


def _picture(rng: np.random.Generator) -> Image.Image:
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.integers(0, 600), rng.integers(0, 440)
        w, h = rng.integers(20, 200, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-6, 7, (480, 640, 3), dtype=np.int16)  # sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(folder: Path, n: int) -> tuple[Path, Path]:
    """FOLDER/captions.json (COCO captions of images 0..n-1) and FOLDER/val.json (the next
    VAL_IMAGES) over FOLDER/images/{i:06d}.jpg; images already there are kept."""
    train_path, val_path = folder / "captions.json", folder / "val.json"
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    words = np.array(WORDS)
    started = time.perf_counter()
    entries = []
    for i in range(n + VAL_IMAGES):
        name = f"{i:06d}.jpg"
        if not (images_dir / name).is_file():
            _picture(np.random.default_rng([0, i])).save(images_dir / name, quality=85)
        captions = [" ".join(np.random.default_rng([1, i, k]).choice(words, size=8)) for k in range(5)]
        entries.append(({"id": i, "file_name": name, "height": 480, "width": 640}, captions))
        if (i + 1) % 2000 == 0:
            print(f"images: {i + 1}/{n + VAL_IMAGES} ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    for path, part in ((train_path, entries[:n]), (val_path, entries[n:])):
        annotations = [{"id": 5 * image["id"] + k, "image_id": image["id"], "caption": c} for image, caps in part for k, c in enumerate(caps)]
        path.write_text(json.dumps({"images": [image for image, _ in part], "annotations": annotations}))
    return train_path, val_path


# ----------------------------------------------------------------------------- measurements

MODEL = ["--preset", "retrieval-small", "--set", "model.vision.image_size=224", "--set", "model.vision.stem=patch",
         "--set", "model.vision.patch_size=16"]  # 14x14 image tokens (retrieval-small's conv stem would give 28x28 at 224)


def loader_rate(train_path: Path, folder: Path, workers: int, augment: bool, batches: int, batch: int) -> tuple[float, float]:
    """(images/s of StepImages over `batches` batches after the first, seconds to the first batch)."""
    from mmt.data.images import Fit
    from mmt.data.loader import StepImages
    from mmt.tasks.common import SourceConfig, epoch_order, read_image_texts, share

    if str(train_path) not in _FILES:
        src = SourceConfig(train=str(train_path), image_root=str(folder / "images"))
        started = time.perf_counter()
        _FILES[str(train_path)] = read_image_texts(src.train, src, Fit(224), "train").files
        _FILES["check_seconds"] = time.perf_counter() - started
    files = _FILES[str(train_path)]

    def plan(step, part, parts):
        slots = share(np.arange(batch), part, parts)
        return epoch_order(0, step, batch, len(files))[slots], slots

    images = StepImages(files, plan, seed=0, augment=augment, workers=workers)
    started = time.perf_counter()
    images.take(0)
    first = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(1, batches + 1):
        images.take(step)
    rate = batches * batch / max(1e-9, time.perf_counter() - started)
    images._batches = None  # (ends the workers)
    return rate, first


_FILES: dict = {}


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kib(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_with_memory(args: list[str]) -> tuple[int, dict[str, float], float]:
    """(exit status, peak memory in GB: the main process's RSS, the sum of RSS and of PSS over
    it and its workers, sampled every 0.2 s; wall seconds) of `mmt ARGS`."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mmt.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"main_rss": 0, "tree_rss": 0, "tree_pss": 0, "processes": 0}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout))
    reader.start()
    while process.poll() is None:
        pids = _tree(process.pid)
        peak["main_rss"] = max(peak["main_rss"], _kib(process.pid, "status", "VmRSS:"))
        peak["tree_rss"] = max(peak["tree_rss"], sum(_kib(p, "status", "VmRSS:") for p in pids))
        peak["tree_pss"] = max(peak["tree_pss"], sum(_kib(p, "smaps_rollup", "Pss:") for p in pids))
        peak["processes"] = max(peak["processes"], len(pids))
        time.sleep(0.2)
    reader.join()
    if process.returncode:
        print("".join(lines[-40:]), file=sys.stderr)
    return process.returncode, {k: (v / 2**20 if k != "processes" else v) for k, v in peak.items()}, time.perf_counter() - started


def steady_rate(run: Path) -> float:
    """samples/s of a run's training log windows after the first (which holds the warm-up)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="where the data set is generated (reused when present)")
    parser.add_argument("--n", type=int, default=20_000, help="training images")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (loader and training)")
    parser.add_argument("--batches", type=int, default=8, help="(a): batches timed per setting, after the first")
    parser.add_argument("--steps", type=int, default=30, help="(b), (c): training steps")
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()
    folder = Path(args.folder)
    train_path, val_path = generate(folder, args.n)
    if args.generate_only:
        return

    rows = []
    loader_rate(train_path, folder, 0, False, 0, args.batch)  # (reads and checks the records: timed)
    rows.append((f"start-up check of {args.n:,} records (image headers)", f"{_FILES['check_seconds']:8.1f} s", "no image decoded"))
    for augment in (False, True):
        for workers in (0, 1, 2):
            rate, first = loader_rate(train_path, folder, workers, augment, args.batches, args.batch)
            rows.append((f"(a) loader, workers={workers}, augment={str(augment).lower()}", f"{rate:8.1f} img/s", f"first batch {first:.2f}s"))
            print(*rows[-1], sep="  ", file=sys.stderr)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        common = [*MODEL, "--no-progress", "--set", f"train.steps={args.steps}", "--set", f"train.batch_size={args.batch}",
                  "--set", "train.log_every=5", "--set", f"train.eval_every={args.steps}", "--set", f"train.save_every={args.steps}"]
        model_run = Path(tmp) / "model"
        status, _, seconds = run_with_memory(["train", "retrieval", str(model_run), *common, "--set", "data.image_size=224",
                                              "--set", "data.num_train=512", "--set", "data.num_val=32"])
        assert status == 0, "model-only run failed"
        rows.append(("(b) training step, shapes world in memory", f"{steady_rate(model_run):8.1f} img/s", f"run {seconds:.0f}s"))
        print(*rows[-1], sep="  ", file=sys.stderr)
        own_run = Path(tmp) / "own"
        status, peak, seconds = run_with_memory(["train", "retrieval", str(own_run), *common, "--set", f"source.train={train_path}",
                                                 "--set", f"source.val={val_path}", "--set", f"source.image_root={folder / 'images'}",
                                                 "--set", "source.workers=2"])
        assert status == 0, "own-data run failed"
        report = json.loads((own_run / "data_report.json").read_text())
        rows.append((f"(c) training on {report['train_images']:,} own images, workers=2", f"{steady_rate(own_run):8.1f} img/s",
                     f"run {seconds:.0f}s (start-up, {args.steps} steps, evaluation of {report['val_images']} images)"))
        rows.append(("(c) peak RSS, training process", f"{peak['main_rss']:8.2f} GB", ""))
        rows.append((f"(c) peak RSS summed over {peak['processes']} processes", f"{peak['tree_rss']:8.2f} GB", "(shared pages counted in each)"))
        rows.append(("(c) peak PSS summed over them", f"{peak['tree_pss']:8.2f} GB", "(shared pages split among them)"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'result':>14}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")


if __name__ == "__main__":
    main()
