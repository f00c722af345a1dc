"""Where a Sort-of-CLEVR model's "closest" and "furthest" answers go wrong, by how near the call was.

For each closest (furthest) test question the margin is how much nearer (further) the
object that decides the answer is than the nearest (furthest) object of the other shape:
below the margin's scale a model has to compare two distances that close to answer right.
Objects of the answer's own shape do not count, since confusing them changes nothing.

Beside the model's accuracy per margin band the script prints a ceiling: the answers
computed from object centres measured in the drawn pixels (each object's colour is
unique, so its centre is the mean of its pixels), which is as well as the image allows
to place an object, up to how pixels quantise its edge.

    python benchmarks/sort_of_clevr_margins.py RUN_DIR [--threads 2]

RUN_DIR is a `mmt train vqa` run on the built-in Sort-of-CLEVR (or its model directory);
the test split is the run's own (data.num_test and data.seed from its run_config.json).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import mmt
from mmt.data.worlds import sort_of_clevr
from mmt.data.worlds.sort_of_clevr import SceneObject
from mmt.tasks.vqa import Question, QuestionSet, VQASplit, VQATask, question_types

BANDS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)  # px; the last band is open


def margin(objects: list[SceneObject], colour: str, subtype: str) -> float:
    """Distance between the answer object and the nearest (furthest) object of the other
    shape, minus its own; inf when every other object has the answer's shape."""
    target = next(o for o in objects if o.colour == colour)
    ranked = sorted((math.hypot(o.x - target.x, o.y - target.y), o.shape) for o in objects if o is not target)
    if subtype == "furthest":
        ranked.reverse()
    best, shape = ranked[0]
    rivals = [d for d, s in ranked if s != shape]
    return abs(rivals[0] - best) if rivals else math.inf


def pixel_centres(image: np.ndarray, objects: list[SceneObject]) -> list[SceneObject]:
    """The objects with their centres measured as the mean of their pixels."""
    measured = []
    for o in objects:
        ys, xs = np.nonzero(np.all(image == np.array(sort_of_clevr.COLOURS[o.colour], np.uint8), axis=-1))
        measured.append(SceneObject(o.colour, o.shape, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
    return measured


def band_of(m: float) -> int:
    return max(i for i, low in enumerate(BANDS) if m >= low)


def band_name(i: int) -> str:
    return f"{BANDS[i]:g}-{BANDS[i + 1]:g} px" if i + 1 < len(BANDS) else f">= {BANDS[i]:g} px"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    config_path = run_dir / "run_config.json"
    data = json.loads(config_path.read_text())["data"] if config_path.is_file() else {"num_test": 200, "seed": 0}
    _, test = sort_of_clevr.splits(0, data["num_test"], data["seed"])

    vqa = mmt.load(run_dir)
    split = VQASplit(test.images, [Question(q.image_index, q.text, q.answer, question_types(q)) for q in test.questions])
    right = VQATask.predictions_correct(vqa.model, QuestionSet(split, vqa.tokenizer, vqa.answers, vqa.model.config))

    measured = [pixel_centres(image, objects) for image, objects in zip(test.images, test.scenes)]
    print(f"{'question':<10} {'margin':<12} {'questions':>9} {'model':>8} {'pixel ceiling':>14}")
    for subtype in ("closest", "furthest"):
        bands: dict[int, list[tuple[float, bool]]] = {}
        for ok, q in zip(right, test.questions):
            if q.subtype == subtype:
                ceiling = sort_of_clevr.answer(measured[q.image_index], q.colour, subtype) == q.answer
                bands.setdefault(band_of(margin(test.scenes[q.image_index], q.colour, subtype)), []).append((ok, ceiling))
        rows = [row for i in sorted(bands) for row in bands[i]]
        for i in sorted(bands):
            ok, ceiling = np.array(bands[i], dtype=float).T
            print(f"{subtype:<10} {band_name(i):<12} {len(ok):>9} {100 * ok.mean():>7.1f}% {100 * ceiling.mean():>13.1f}%")
        ok, ceiling = np.array(rows, dtype=float).T
        print(f"{subtype:<10} {'all':<12} {len(ok):>9} {100 * ok.mean():>7.1f}% {100 * ceiling.mean():>13.1f}%")


if __name__ == "__main__":
    main()
