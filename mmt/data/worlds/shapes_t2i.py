"""The shapes world for text-to-image generation: prompts that state everything an image must
show, the scenes drawn for them, held-out colour-shape pairs and a fixed prompt suite.

Scenes, sizes, colours and relations are those of mmt.data.worlds.shapes: a white canvas,
footprints inside it and GAP apart, every colour at most once per scene. A prompt lists exactly
the objects its image must hold, no others; an attribute it does not name is free. Categories,
in the spirit of GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment"):
- single:   one object, every attribute: "a small red circle"
- two:      two objects, every attribute: "a small red circle and a large blue square"
- counting: 2..4 objects of one shape, colours and sizes free: "three circles"
- colours:  one object, colour and shape, size free: "a red circle"
- position: two objects, every attribute, and a relation of shapes.RELATIONS between them:
            "a small red circle left of a large blue square" (the first object is <relation>
            the second, by shapes.relation_holds)
- binding:  two objects, colour and shape, sizes free; different colours and different shapes:
            "a red circle and a blue square"
Training also has "listing" (TRAIN_CATEGORIES), 3..4 objects in full: "a small red circle, a
large blue square and a small green cross"; the suite does not. The objects of a prompt always
have different colours (the world never repeats a colour in a scene).

Held-out pairs. HELD_OUT names colour-shape pairs that no training image or caption contains:
one per shape, each with its own colour, so every colour and every shape is still seen with
other partners. A seen prompt names no held-out pair, and the scenes drawn for training never
give a free colour a held-out pair. A held prompt names exactly one held-out pair (its other
object, if any, is a seen pair), so its score measures that one pairing. Counting names no
colour and so has no held prompts.

Scenes for a prompt (`scene_for`): free attributes at random, positions by rejection sampling
as in shapes.place_objects; a position prompt's relation holds by at least SLACK px, so a
ground-truth image never hinges on a pixel (the judge, mmt.metrics.t2i, asks for no slack).
Everything is generated from a seed, deterministically.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmt.data.worlds.shapes import (
    COLOURS,
    GAP,
    HALF_EXTENT,
    IMAGE_SIZE,
    NUMBERS,
    RELATIONS,
    SHAPES,
    SIZES,
    SLACK,
    Draws,
    Obj,
    Scene,
    listing,
    phrase,
    plural,
    relation_margins,
    render,
)

CATEGORIES = ("single", "two", "counting", "colours", "position", "binding")
TRAIN_CATEGORIES = CATEGORIES + ("listing",)
HELD_OUT: tuple[tuple[str, str], ...] = (  # (colour, shape)
    ("red", "triangle"),
    ("blue", "circle"),
    ("green", "cross"),
    ("yellow", "square"),
)
COUNTS = (2, 3, 4)  # counting prompts ask for this many objects
LISTED = (3, 4)  # listing prompts name this many objects
# which attributes a category states for each object
STATES = {
    "single": ("shape", "colour", "size"),
    "two": ("shape", "colour", "size"),
    "counting": ("shape",),
    "colours": ("shape", "colour"),
    "position": ("shape", "colour", "size"),
    "binding": ("shape", "colour"),
    "listing": ("shape", "colour", "size"),
}


@dataclasses.dataclass(frozen=True)
class Want:
    """One object a prompt asks for; None: free."""

    shape: str | None
    colour: str | None
    size: str | None

    def fits(self, o: Obj) -> bool:
        return self.shape in (None, o.shape) and self.colour in (None, o.colour) and self.size in (None, o.size)


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    category: str  # one of TRAIN_CATEGORIES
    wants: tuple[Want, ...]  # exactly these objects, no others
    relation: str | None = None  # position prompts: wants[0] <relation> wants[1]


def is_held(colour: str | None, shape: str | None, held_out) -> bool:
    return (colour, shape) in held_out


def _text(category: str, wants: tuple[Want, ...], relation: str | None) -> str:
    if category == "counting":
        return f"{NUMBERS[len(wants)]} {plural(wants[0].shape)}"
    phrases = [phrase(w.size, w.colour, w.shape, "a") for w in wants]
    if category == "position":
        return f"{phrases[0]} {relation} {phrases[1]}"
    return listing(phrases)


def make_prompt(category: str, wants: tuple[Want, ...], relation: str | None = None) -> Prompt:
    """The prompt of `category` asking for `wants` (and `relation`), with its text."""
    return Prompt(_text(category, wants, relation), category, tuple(wants), relation)


def _prompt(draws: Draws, category: str, held_out, held_pair: tuple[str, str] | None) -> Prompt:
    """A random prompt of `category`; `held_pair`: the one held-out (colour, shape) it names,
    None for a seen prompt."""
    if category not in TRAIN_CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {TRAIN_CATEGORIES}")
    states = STATES[category]
    if category == "counting":
        if held_pair is not None:
            raise ValueError("counting prompts name no colour, so there are no held-out counting prompts")
        shape = draws.choice(SHAPES)
        return make_prompt(category, (Want(shape, None, None),) * draws.choice(COUNTS))
    n = {"single": 1, "colours": 1, "listing": draws.choice(LISTED)}.get(category, 2)
    pairs = [held_pair] if held_pair else []
    while len(pairs) < n:  # seen pairs, each colour once; binding: each shape once too
        colour, shape = draws.choice(list(COLOURS)), draws.choice(SHAPES)
        if (
            not is_held(colour, shape, held_out)
            and all(colour != c for c, _ in pairs)
            and not (category == "binding" and any(shape == s for _, s in pairs))
        ):
            pairs.append((colour, shape))
    if held_pair:  # the held-out object at a random place
        pairs.insert(draws.below(n), pairs.pop(0))
    sized = "size" in states
    wants = tuple(Want(shape, colour, draws.choice(SIZES) if sized else None) for colour, shape in pairs)
    return make_prompt(category, wants, draws.choice(RELATIONS) if category == "position" else None)


def sample_prompt(draws: Draws, category: str, held_out=HELD_OUT, held: bool = False) -> Prompt:
    """A random prompt of `category` (one of TRAIN_CATEGORIES). held=False: it names no held-out
    pair; held=True: exactly one of its objects is a held-out pair (not for counting, which
    names no colour: ValueError)."""
    return _prompt(draws, category, held_out, draws.choice(held_out) if held else None)


def _resolve(prompt: Prompt, draws: Draws, held_out, allow_held: bool) -> list[tuple[str, str, str]]:
    """(shape, colour, size) for each want: stated attributes kept, free ones drawn; colours distinct."""
    stated = [w.colour for w in prompt.wants if w.colour]
    if len(set(stated)) < len(stated):
        raise ValueError(f"prompt {prompt.text!r} names a colour twice; a scene has each colour once")
    used, objects = set(stated), []
    for w in prompt.wants:
        if w.colour and w.shape and is_held(w.colour, w.shape, held_out) and not allow_held:
            raise ValueError(f"prompt {prompt.text!r} names a held-out pair; pass allow_held=True to draw it")
        for _ in range(1000):
            shape = w.shape or draws.choice(SHAPES)
            colour = w.colour or draws.choice([c for c in COLOURS if c not in used])
            if w.colour or allow_held or not is_held(colour, shape, held_out):
                break
        else:
            raise ValueError(f"no colour for {w} in prompt {prompt.text!r} avoids the held-out pairs {held_out}")
        used.add(colour)
        objects.append((shape, colour, w.size or draws.choice(SIZES)))
    return objects


def scene_for(
    prompt: Prompt, draws: Draws, held_out=HELD_OUT, allow_held: bool = False, image_size: int = IMAGE_SIZE
) -> Scene:
    """A scene of exactly the prompt's objects (see the module docstring). allow_held=False: a
    held-out pair in the prompt raises, and free colours never make one."""
    scale = image_size / IMAGE_SIZE
    attrs = _resolve(prompt, draws, held_out, allow_held)
    while True:  # start over when the canvas jams or the relation is not clear enough
        objects: list[Obj] = []
        for shape, colour, size in attrs:
            half = HALF_EXTENT[size] * scale
            low, high = half + 1, image_size - 1 - half
            for _ in range(100):
                x, y = low + draws.uniform() * (high - low), low + draws.uniform() * (high - low)
                if all(
                    max(abs(x - o.x), abs(y - o.y)) >= half + HALF_EXTENT[o.size] * scale + GAP * scale for o in objects
                ):
                    objects.append(Obj(shape, colour, size, x, y))
                    break
            else:
                break
        if len(objects) < len(attrs):
            continue
        if prompt.relation is None:
            return Scene(objects, image_size)
        margin = relation_margins(objects[0], objects[1], image_size)[RELATIONS.index(prompt.relation)]
        if margin >= SLACK * scale:
            return Scene(objects, image_size)


@dataclasses.dataclass
class T2ISplit:
    """Training data: images (N, H, W, 3) uint8, one caption (the prompt's text) per image."""

    images: np.ndarray
    captions: list[str]
    scenes: list[Scene]
    prompts: list[Prompt]

    def __len__(self) -> int:
        return len(self.scenes)

    @classmethod
    def generate(
        cls, num_images: int, seed: int, held_out=HELD_OUT, image_size: int = IMAGE_SIZE, stream: int = 0
    ) -> "T2ISplit":
        """`num_images` seen prompts, categories uniform over TRAIN_CATEGORIES, with a scene
        each; from the random stream (seed, stream). No held-out pair in any caption or image."""
        draws = Draws(np.random.default_rng([seed, stream]))
        images = np.empty((num_images, image_size, image_size, 3), np.uint8)
        prompts, scenes = [], []
        for k in range(num_images):
            prompt = sample_prompt(draws, draws.choice(TRAIN_CATEGORIES), held_out)
            scene = scene_for(prompt, draws, held_out, allow_held=False, image_size=image_size)
            images[k] = render(scene)
            prompts.append(prompt)
            scenes.append(scene)
        return cls(images, [p.text for p in prompts], scenes, prompts)


def prompt_suite(
    held_out=HELD_OUT, per_category: int = 8, held_per_category: int = 8, seed: int = 0
) -> tuple[list[Prompt], list[Prompt]]:
    """A fixed evaluation suite (seen, held), each grouped by CATEGORIES, no repeated text.
    Seen: `per_category` prompts of each category, none naming a held-out pair. Held: up to
    `held_per_category` of each category but counting, the held-out pairs taken in turn so each
    appears equally often; fewer where fewer distinct prompts exist (colours: one per pair)."""
    draws = Draws(np.random.default_rng([seed, 7919]))
    seen: list[Prompt] = []
    held: list[Prompt] = []
    for category in CATEGORIES:
        for group, wanted in ((seen, per_category), (held, held_per_category)):
            if group is held and category == "counting":
                continue
            texts: set[str] = set()
            for k in range(wanted):
                pair = held_out[k % len(held_out)] if group is held else None
                for _ in range(100):  # a new text, or give up on this one
                    prompt = _prompt(draws, category, held_out, pair)
                    if prompt.text not in texts:
                        texts.add(prompt.text)
                        group.append(prompt)
                        break
    return seen, held
