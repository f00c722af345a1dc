"""Text-to-image scores on the shapes world, judged exactly from the parsed image, as GenEval
(Ghosh et al. 2023) judges with a detector: an image is right or wrong, and a score is a share
of right images.

Judging (`judge`). The image is parsed into objects (mmt.data.worlds.shapes_parse). It is right
when it holds exactly as many objects as the prompt wants and some one-to-one assignment of
objects to wants gives every want an object with each stated attribute (free attributes fit
anything); for a position prompt, the objects assigned to wants[0] and wants[1] must also stand
in the prompt's relation (shapes.relation_holds, no slack). Any extra object makes it wrong.

Scores (`suite_scores`), for images[i] generated for prompts[i] (e.g. 4 each): per category,
the share of its images that are right; "overall" is the mean of the per-category shares (the
GenEval convention: each category weighs the same, whatever its number of prompts).
Diversity: for each prompt, the number of distinct layouts among its images, a layout being the
parsed objects with their attributes and their centres in cells of 8 x 8 px (at 64x64); the
mean over prompts ("diversity") and the same among the right images only ("right_diversity",
over the prompts with at least one right image). A generator that draws one image per prompt
whatever the seed scores 1.
"""

from __future__ import annotations

import numpy as np

from mmt.data.worlds.shapes import IMAGE_SIZE, Obj, relation_holds
from mmt.data.worlds.shapes_parse import assignments, parse
from mmt.data.worlds.shapes_t2i import CATEGORIES, TRAIN_CATEGORIES, Prompt

CELL = 8.0  # px at 64x64: layouts whose centres fall in the same cells count as the same


def judge(prompt: Prompt, objects: list[Obj], image_size: int = IMAGE_SIZE) -> bool:
    """Whether `objects` (parsed from an image of side `image_size`) are exactly what `prompt` states."""
    if len(objects) != len(prompt.wants):
        return False
    for chosen in assignments(len(prompt.wants), objects, lambda slot, o: prompt.wants[slot].fits(o)):
        if prompt.relation is None:
            return True
        subject, other = objects[chosen[0]], objects[chosen[1]]
        if relation_holds(subject, other, prompt.relation, image_size):
            return True
    return False


def layout(objects: list[Obj], image_size: int = IMAGE_SIZE) -> tuple:
    """The objects with their attributes and centres quantised to CELL; equal for near-equal images."""
    cell = CELL * image_size / IMAGE_SIZE
    return tuple(sorted((o.shape, o.colour, o.size, int(o.x // cell), int(o.y // cell)) for o in objects))


def suite_scores(prompts: list[Prompt], images: list[list[np.ndarray]]) -> dict:
    """Parse and judge images[i], the images generated for prompts[i]; see the module docstring.

    Returns a dict: "categories" {category: share right}, "overall", "right" and "images" (totals),
    "counts" {category: [right, images]}, "diversity", "right_diversity", and "prompts": per
    prompt {"text", "category", "right": [bool per image], "layouts": distinct layouts}.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but images for {len(images)}; pass one list of images per prompt")
    counts: dict[str, list[int]] = {}
    details, distinct, distinct_right = [], [], []
    for prompt, generated in zip(prompts, images):
        parsed = [parse(image) for image in generated]
        right = [judge(prompt, objects, image.shape[0]) for objects, image in zip(parsed, generated)]
        layouts = [layout(objects, image.shape[0]) for objects, image in zip(parsed, generated)]
        tally = counts.setdefault(prompt.category, [0, 0])
        tally[0] += sum(right)
        tally[1] += len(right)
        distinct.append(len(set(layouts)))
        if any(right):
            distinct_right.append(len({lay for lay, ok in zip(layouts, right) if ok}))
        details.append({"text": prompt.text, "category": prompt.category, "right": right, "layouts": distinct[-1]})
    order = [c for c in TRAIN_CATEGORIES if c in counts]
    shares = {c: counts[c][0] / counts[c][1] if counts[c][1] else 0.0 for c in order}
    return {
        "categories": shares,
        "overall": float(np.mean(list(shares.values()))) if shares else 0.0,
        "right": sum(r for r, _ in counts.values()),
        "images": sum(n for _, n in counts.values()),
        "counts": {c: counts[c] for c in order},
        "diversity": float(np.mean(distinct)) if distinct else 0.0,
        "right_diversity": float(np.mean(distinct_right)) if distinct_right else 0.0,
        "prompts": details,
    }


def format_table(seen: dict, held: dict | None = None) -> str:
    """A text table of suite_scores results: categories as rows, seen and held-out columns."""
    columns = [("seen", seen)] + ([("held-out", held)] if held is not None else [])
    categories = [c for c in TRAIN_CATEGORIES if any(c in result["counts"] for _, result in columns)]
    categories = [c for c in CATEGORIES if c in categories] + [c for c in categories if c not in CATEGORIES]

    def cell(result: dict, category: str) -> str:
        if category not in result["counts"]:
            return "-"
        right, total = result["counts"][category]
        return f"{result['categories'][category]:.3f} ({right}/{total})"

    rows = [["category"] + [name for name, _ in columns]]
    rows += [[c] + [cell(result, c) for _, result in columns] for c in categories]
    rows.append(["overall"] + [f"{result['overall']:.3f}" for _, result in columns])
    rows.append(["diversity"] + [f"{result['diversity']:.2f}" for _, result in columns])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in rows)
