"""Sort-of-CLEVR (Santoro et al. 2017, "A simple neural network module for relational reasoning").

Each scene: a 75x75 RGB image on a white background with 6 objects, one of each colour
(red, green, blue, orange, gray, yellow), each a 10x10 square or a circle of radius 5
with equal probability, centres uniform over the canvas such that no two objects overlap.
Each image gets 20 questions about colour-identified objects, 10 non-relational
(shape; is it on the left, x < 37.5; is it on the top, y < 37.5) and 10 relational
(shape of the closest object; shape of the furthest object, by Euclidean distance
between centres, the object itself excluded; how many objects share its shape, itself
included). Answers come from: yes, no, square, circle, 1..6.

Questions are sentences, so models read them as text. Two choices the paper leaves open:
- "closest"/"furthest" never consider the queried object itself. (A widely used
  re-implementation lets the object be its own closest whenever every other object is far
  away; mmt does not.)
- a closest/furthest question whose answer would be ambiguous (two objects of different
  shapes exactly equally near/far) is not asked; another colour is drawn instead.
  With real-valued centres this almost never happens, but it is defined.

Everything is generated from a seed, deterministically.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

IMAGE_SIZE = 75
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "orange": (255, 165, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
SHAPES = ("square", "circle")
HALF = 5.0  # squares are 10x10, circles have radius 5: each fits a 10x10 box around its centre
ANSWERS = ("yes", "no", "square", "circle", "1", "2", "3", "4", "5", "6")

NON_RELATIONAL = ("shape", "left", "top")
RELATIONAL = ("closest", "furthest", "count")
TEMPLATES = {
    "shape": "What is the shape of the {} object?",
    "left": "Is the {} object on the left?",
    "top": "Is the {} object on the top?",
    "closest": "What is the shape of the object closest to the {} object?",
    "furthest": "What is the shape of the object furthest from the {} object?",
    "count": "How many objects have the same shape as the {} object?",
}


@dataclasses.dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    x: float  # centre, pixels from the left edge
    y: float  # centre, pixels from the top edge


@dataclasses.dataclass(frozen=True)
class Question:
    image_index: int
    text: str
    answer: str
    family: str  # "non-relational" or "relational"
    subtype: str  # one of NON_RELATIONAL + RELATIONAL
    colour: str  # the colour the question is about


def place_objects(rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[SceneObject]:
    """Six objects, one per colour, with non-overlapping 10x10 footprints (rejection sampling)."""
    objects: list[SceneObject] = []
    for colour in COLOURS:
        while True:
            x, y = rng.uniform(HALF, size - HALF, size=2)
            # footprints are 10x10 boxes: they are apart when the centres differ by >= 10 on some axis
            if all(abs(x - o.x) >= 2 * HALF or abs(y - o.y) >= 2 * HALF for o in objects):
                break
        objects.append(SceneObject(colour, SHAPES[int(rng.integers(2))], float(x), float(y)))
    return objects


def draw(objects: list[SceneObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 image; a pixel belongs to a shape when its centre is inside."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    for o in objects:
        # only the pixels of the 10x10 box around the centre can be inside
        x0, x1 = max(int(o.x - HALF), 0), min(int(o.x + HALF) + 1, size)
        y0, y1 = max(int(o.y - HALF), 0), min(int(o.y + HALF) + 1, size)
        py, px = np.mgrid[y0:y1, x0:x1] + 0.5
        if o.shape == "square":
            inside = (np.abs(px - o.x) < HALF) & (np.abs(py - o.y) < HALF)
        else:
            inside = (px - o.x) ** 2 + (py - o.y) ** 2 < HALF**2
        image[y0:y1, x0:x1][inside] = COLOURS[o.colour]
    return image


def answer(objects: list[SceneObject], colour: str, subtype: str, size: int = IMAGE_SIZE) -> str | None:
    """The answer to `subtype` about the `colour` object, or None when it would be ambiguous."""
    target = next(o for o in objects if o.colour == colour)
    if subtype == "shape":
        return target.shape
    if subtype == "left":
        return "yes" if target.x < size / 2 else "no"
    if subtype == "top":
        return "yes" if target.y < size / 2 else "no"
    if subtype == "count":
        return str(sum(o.shape == target.shape for o in objects))
    others = [o for o in objects if o is not target]  # the object itself is never its own neighbour
    distances = [math.hypot(o.x - target.x, o.y - target.y) for o in others]
    best = min(distances) if subtype == "closest" else max(distances)
    shapes = {o.shape for o, d in zip(others, distances) if d == best}
    return shapes.pop() if len(shapes) == 1 else None


def ask(objects: list[SceneObject], image_index: int, rng: np.random.Generator) -> list[Question]:
    """10 non-relational then 10 relational questions, each about a random colour and subtype."""
    questions = []
    for family, subtypes in (("non-relational", NON_RELATIONAL), ("relational", RELATIONAL)):
        for _ in range(10):
            while True:
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                subtype = subtypes[int(rng.integers(len(subtypes)))]
                reply = answer(objects, colour, subtype)
                if reply is not None:
                    break
            questions.append(Question(image_index, TEMPLATES[subtype].format(colour), reply, family, subtype, colour))
    return questions


@dataclasses.dataclass
class SortOfClevr:
    """One split: images (N, 75, 75, 3) uint8, their scenes, and 20 questions per image."""

    images: np.ndarray
    scenes: list[list[SceneObject]]
    questions: list[Question]

    @classmethod
    def generate(cls, num_images: int, seed: int) -> "SortOfClevr":
        rng = np.random.default_rng(seed)
        scenes, questions, images = [], [], np.empty((num_images, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for i in range(num_images):
            objects = place_objects(rng)
            scenes.append(objects)
            images[i] = draw(objects)
            questions.extend(ask(objects, i, rng))
        return cls(images, scenes, questions)


def splits(num_train: int = 9800, num_test: int = 200, seed: int = 0) -> tuple[SortOfClevr, SortOfClevr]:
    """The default train and test splits; separate seeds keep them independent."""
    return SortOfClevr.generate(num_train, seed=2 * seed), SortOfClevr.generate(num_test, seed=2 * seed + 1)


def question_corpus() -> list[str]:
    """Every question sentence the templates can produce (to build a tokenizer)."""
    return [template.format(colour) for template in TEMPLATES.values() for colour in COLOURS]
