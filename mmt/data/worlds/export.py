"""Built-in scenes as files: PNG images beside JSON Lines of their questions (and captions), in
the format `mmt predict --input`, `mmt data check` and `--set source.train=...` read, so any
example that needs an image or a data file can be run without writing code."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmt.data.worlds import shapes, sort_of_clevr
from mmt.files import atomic_write_text

SPLITS = {"sort-of-clevr": ("train", "test"), "shapes": ("train", "val", "test")}


def _scenes(world: str, num_scenes: int, seed: int, split: str):
    """The first `num_scenes` scenes of the world's split, as training and `mmt eval` draw them
    with data seed `seed` (each split's scenes come from its own random stream, in order)."""
    if world == "sort-of-clevr":
        return sort_of_clevr.SortOfClevr.generate(num_scenes, seed=2 * seed + SPLITS[world].index(split))
    return shapes.ShapesSplit.generate(num_scenes, seed, stream=SPLITS[world].index(split))


def export_world(world: str, out: str | Path, num_scenes: int = 10, seed: int = 0, split: str = "test") -> list[Path]:
    """Write scenes of `world` into the new folder `out` as scene-NNN.png, with questions.jsonl
    ({"image", "question", "answer", "question_type"} per question) and, for the shapes world,
    captions.jsonl ({"image", "text": [5 captions]} per image). Returns the JSON Lines files."""
    if world not in SPLITS:
        raise ValueError(f"unknown world {world!r} (available: {', '.join(SPLITS)})")
    if split not in SPLITS[world]:
        raise ValueError(f"{world} has no {split!r} split (it has {', '.join(SPLITS[world])})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty folder; give a new folder for the scenes")
    data = _scenes(world, num_scenes, seed, split)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"scene-{i:03d}.png" for i in range(num_scenes)]
    for name, image in zip(names, data.images):
        Image.fromarray(image).save(out / name)
    if world == "sort-of-clevr":
        questions = [{"image": names[q.image_index], "question": q.text, "answer": q.answer, "question_type": q.subtype}
                     for q in data.questions]
        written = {"questions.jsonl": questions}
    else:
        questions = [{"image": name, "question": qa.question, "answer": qa.answer, "question_type": qa.qtype}
                     for name, qas in zip(names, data.qa) for qa in qas]
        written = {"captions.jsonl": [{"image": name, "text": texts} for name, texts in zip(names, data.captions)],
                   "questions.jsonl": questions}
    for file_name, lines in written.items():
        atomic_write_text(out / file_name, "".join(json.dumps(line) + "\n" for line in lines))
    return [out / file_name for file_name in written]
