"""Where the model looked, measured where the truth is known: on Sort-of-CLEVR's test scenes,
the share of questions whose heat map (`mmt.explain`) peaks on, or one token next to, the
object the question names by its colour; for "closest" and "furthest" also the share that
peaks on the object that is the answer. With a captioner of the shapes world, the share of
the shape nouns of its captions ("circle", ...) whose word map peaks on an object the noun
phrase fits (the shape, and the size and colour words just before it, where there are).
Every kind of map is measured on the same questions (words).

    python benchmarks/explain_hits.py runs/vqa [--scenes 200]
    python benchmarks/explain_hits.py runs/caption --scenes 200
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import mmt
from mmt.data.worlds import shapes, sort_of_clevr
from mmt.explain import explain, on_object

KINDS = {  # name: explain's options
    "attention, first layer": dict(method="attention", layer="first"),
    "attention, last layer": dict(method="attention", layer="last"),
    "attention, mean of layers": dict(method="attention", layer="mean"),
    "gradient x input": dict(method="gradient"),
    "Grad-CAM": dict(method="gradcam"),
}


def box(obj: sort_of_clevr.SceneObject, scale: float) -> tuple[float, float, float, float]:
    half = sort_of_clevr.HALF
    return ((obj.x - half) * scale, (obj.y - half) * scale, (obj.x + half) * scale, (obj.y + half) * scale)


def answer_object(scene, subject, subtype: str):
    others = [o for o in scene if o is not subject]
    distance = [(o.x - subject.x) ** 2 + (o.y - subject.y) ** 2 for o in others]
    return others[distance.index(min(distance) if subtype == "closest" else max(distance))]


def caption_nouns(predictor, scenes: int) -> None:
    """The shape nouns of the captions of the shapes world's test scenes, each word's map."""
    split = shapes.ShapesSplit.generate(scenes, 0, predictor.image_size, stream=2)  # the test split's first scenes
    kinds = {k: v for k, v in KINDS.items() if "Grad-CAM" not in k}
    hits, nouns = dict.fromkeys(kinds, 0), 0
    for image, scene in zip(split.images, split.scenes):
        explained = {kind: explain(predictor, image, **options) for kind, options in kinds.items()}
        words = explained["attention, first layer"].labels
        for t, word in enumerate(words):
            if word not in shapes.SHAPES:
                continue
            before = words[max(0, t - 2) : t]
            fits = [o for o in scene.objects if o.shape == word
                    and all(o.colour == w for w in before if w in shapes.COLOURS) and all(o.size == w for w in before if w in shapes.SIZES)]
            if not fits:  # a noun the scene has no object for: the caption is wrong there, not the map
                continue
            nouns += 1
            for kind in kinds:
                heat = explained[kind].maps[t]
                hits[kind] += any(on_object(heat, box_of(o), predictor.image_size) for o in fits)
    print(f"{predictor.directory}: {nouns} shape nouns that fit an object, in the captions of {scenes} test scenes")
    for kind in kinds:
        print(f"{kind:<27}{100 * hits[kind] / max(1, nouns):>8.1f}%")


def box_of(obj: shapes.Obj) -> tuple[float, float, float, float]:
    half = shapes.HALF_EXTENT[obj.size]  # (scenes generated at the model's size: already in its pixels)
    return obj.x - half, obj.y - half, obj.x + half, obj.y + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a Sort-of-CLEVR VQA run (or model) directory")
    parser.add_argument("--scenes", type=int, default=200, help="test scenes (the first of the default test split)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = mmt.load(args.run, device="cpu")
    if predictor.task == "caption":
        caption_nouns(predictor, args.scenes)
        return
    _, test = sort_of_clevr.splits(num_train=0, num_test=args.scenes)
    scale = predictor.image_size / sort_of_clevr.IMAGE_SIZE
    hits = {kind: defaultdict(int) for kind in KINDS}
    answer_hits = {kind: defaultdict(int) for kind in KINDS}
    counts: dict[str, int] = defaultdict(int)
    start = time.perf_counter()
    for q in test.questions:
        scene = test.scenes[q.image_index]
        subject = next(o for o in scene if o.colour == q.colour)
        counts[q.subtype] += 1
        for kind, options in KINDS.items():
            heat = explain(predictor, test.images[q.image_index], question=q.text, **options).maps[0]
            hits[kind][q.subtype] += on_object(heat, box(subject, scale), predictor.image_size)
            if q.subtype in ("closest", "furthest"):
                target = answer_object(scene, subject, q.subtype)
                answer_hits[kind][q.subtype] += on_object(heat, box(target, scale), predictor.image_size)
    print(f"{args.run}: {len(test.questions)} questions about {args.scenes} test scenes, {time.perf_counter() - start:.0f} s")
    print("share of maps that peak on (or one token next to) the named object; [on the answer object]")
    types = [*sort_of_clevr.NON_RELATIONAL, *sort_of_clevr.RELATIONAL]
    print(f"{'map':<27}{'non-rel':>9}" + "".join(f"{t:>15}" for t in types))
    for kind in KINDS:
        nonrel = sum(hits[kind][t] for t in sort_of_clevr.NON_RELATIONAL) / sum(counts[t] for t in sort_of_clevr.NON_RELATIONAL)
        cells = []
        for t in types:
            cell = f"{100 * hits[kind][t] / counts[t]:.1f}"
            if t in ("closest", "furthest"):
                cell += f" [{100 * answer_hits[kind][t] / counts[t]:.1f}]"
            cells.append(f"{cell:>15}")
        print(f"{kind:<27}{100 * nonrel:>8.1f}%" + "".join(cells))


if __name__ == "__main__":
    main()
