"""The shapes world: generated scenes for image captioning, open-ended VQA and image-text retrieval.

Scenes. A white `image_size` x `image_size` RGB canvas (default 64) with 2..6 objects (uniform).
Each object has a shape (circle, square, triangle, cross), one of 8 colours (COLOURS) and a size:
small has half-extent 5 px, large 9 px. Every pixel constant here is given for 64x64 and scales
with image_size / 64. An object's footprint is the square of side 2 * half-extent around its
centre (x, y), in pixels from the left / top edge; footprints lie inside the canvas with a 1 px
border and are at least 2 px apart along x or along y (rejection sampling), so objects never
touch. Choice: each colour appears at most once per scene, so "the red object" always names one
object and no (size, colour, shape) repeats; shapes and sizes may repeat.

Relations (the definitions the captions, questions and shapes_truth all use; i, j distinct):
- i "left of" j   when x_j - x_i > 5 px;  i "right of" j when j is left of i.
- i "above" j     when y_j - y_i > 5 px;  i "below" j    when j is above i.
- i "next to" j   when the distance between the centres is < 24 px.
Two objects always stand in at least one relation (within 5 px on both axes means < 24 px apart).
Superlatives: "the largest object" is the object larger (large vs small) than every other one,
so it exists only when exactly one object is large; likewise "smallest". "The leftmost
(rightmost) object" is the object left of (right of) every other object; it may not exist.

Captions: 5 per image, lower case, no final period, each naming every object in full as
"a <size> <colour> <shape>" (so a caption identifies its scene up to scenes of the same objects,
and the framed ones usually beyond that), the objects in their own random order each time.
Captions 0..2 are the listings "{objects}", "there are {n} objects: {objects}" and "the picture
shows {objects}", in random order. Captions 3 and 4 are two different framings of: a relation
between two objects, then the rest ("a small red circle is above a large blue cross, with
{rest}"), counts by shape or by size, then every object ("two circles and one square:
{objects}"), and a superlative when one exists, then the rest ("the largest object is a red
circle, with {rest}"). Captions draw from their own random stream, so the scenes and questions
do not depend on the caption grammar.

Questions: about 10 per image, two of each qtype, no repeats: attribute ("what colour is the large
circle?"), count ("how many circles are there?" -> number words "zero".."six"), exist ("is there
a green square?", "no" answers mostly change one attribute of an object present), compare ("is
the red object larger than the blue object?", "do the red object and the blue square have the
same shape?"), spatial ("is the red circle left of the blue square?", or "what is above the red
circle?" -> "the small blue square", asked only when exactly one object is). Every object a
question refers to is described so that only it fits ("the circle" only when there is one
circle), and never by the attribute asked about. Yes/no questions draw their answer first, so
yes and no are about equally common. Captions and questions state or ask about relations only
where the centres are at least SLACK = 2 px past the threshold either way (where there are such),
so that no answer hinges on a pixel: "what is above X?" needs one object clearly above X and
every other one clearly not; the leftmost object must be clearly left of every other one.

Everything is generated from a seed, deterministically.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {  # far apart in RGB (>= 95), none close to white
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 0),
    "purple": (140, 40, 190),
    "orange": (255, 125, 0),
    "gray": (120, 120, 120),
    "brown": (120, 70, 20),
}
SIZES = ("small", "large")
QTYPES = ("attribute", "count", "exist", "compare", "spatial")
RELATIONS = ("left of", "right of", "above", "below", "next to")
SUPERLATIVE_RELATIONS = {"largest": "larger", "smallest": "smaller", "leftmost": "left of", "rightmost": "right of"}
SUPERLATIVES = tuple(SUPERLATIVE_RELATIONS)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

# pixel constants at IMAGE_SIZE; multiplied by image_size / IMAGE_SIZE
HALF_EXTENT = {"small": 5.0, "large": 9.0}
GAP = 2.0  # least distance between footprints, on x or on y
MARGIN = 5.0  # left of / right of / above / below need centres more than this apart on that axis
NEXT_TO = 24.0  # next to: centres closer than this
SLACK = 2.0  # captions and questions only use relations whose truth is this far from a threshold
ATTRS = ("size", "colour", "shape")
ATTR_SUBSETS = tuple(  # the non-empty subsets of ATTRS, for describing an object partly
    tuple(a for k, a in enumerate(ATTRS) if mask >> k & 1) for mask in range(1, 8)
)


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str  # "small" or "large"
    x: float  # centre, pixels from the left edge
    y: float  # centre, pixels from the top edge


def relation_margins(a: Obj, b: Obj, image_size: int = IMAGE_SIZE) -> tuple[float, ...]:
    """For each of RELATIONS, how many pixels past its threshold `a` is that relation to `b`:
    positive exactly when it holds. The one definition of the spatial relations."""
    scale = image_size / IMAGE_SIZE
    dx, dy, margin = b.x - a.x, b.y - a.y, MARGIN * scale
    return dx - margin, -dx - margin, dy - margin, -dy - margin, NEXT_TO * scale - math.hypot(dx, dy)


def relation_holds(a: Obj, b: Obj, relation: str, image_size: int = IMAGE_SIZE) -> bool:
    """Whether `a` is `relation` `b` (see the module docstring); also "larger" / "smaller"."""
    if relation == "larger":
        return a.size == "large" and b.size == "small"
    if relation == "smaller":
        return a.size == "small" and b.size == "large"
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS + ('larger', 'smaller')}")
    return relation_margins(a, b, image_size)[RELATIONS.index(relation)] > 0


@dataclasses.dataclass
class Scene:
    objects: list[Obj]
    image_size: int = IMAGE_SIZE

    def relations(self) -> list[tuple[int, str, int]]:
        """Every (i, relation, j) that holds, i != j, in the order of RELATIONS for each pair."""
        return [
            (i, relation, j)
            for i, a in enumerate(self.objects)
            for j, b in enumerate(self.objects)
            if i != j
            for relation in RELATIONS
            if relation_holds(a, b, relation, self.image_size)
        ]

    def superlative(self, name: str, candidates: list[int] | None = None) -> int | None:
        """Index of the candidate (default: every object) that is larger / smaller / left of /
        right of every other candidate, for name largest / smallest / leftmost / rightmost;
        None when no candidate is, or fewer than two candidates are given."""
        relation, objects = SUPERLATIVE_RELATIONS[name], self.objects
        candidates = range(len(objects)) if candidates is None else candidates
        if len(candidates) < 2:
            return None
        for i in candidates:
            if all(relation_holds(objects[i], objects[j], relation, self.image_size) for j in candidates if j != i):
                return i
        return None

    def to_dict(self) -> dict:
        """JSON-able scene graph; "relations" is derived, listed for readers, ignored by from_dict."""
        return {
            "image_size": self.image_size,
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "relations": [list(r) for r in self.relations()],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls([Obj(**o) for o in d["objects"]], int(d["image_size"]))


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str  # one of QTYPES


class Draws:
    """Random draws from a numpy Generator, fetched in blocks: a scene makes ~100 small draws,
    and one numpy call per draw would cost more than everything else together."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.block = rng, []

    def uniform(self) -> float:
        if not self.block:
            self.block = self.rng.random(512).tolist()
        return self.block.pop()

    def below(self, n: int) -> int:
        return int(self.uniform() * n)

    def coin(self) -> bool:
        return self.uniform() < 0.5

    def choice(self, options):
        return options[self.below(len(options))]

    def shuffled(self, items) -> list:
        items = list(items)
        for k in range(len(items) - 1, 0, -1):  # Fisher-Yates
            m = self.below(k + 1)
            items[k], items[m] = items[m], items[k]
        return items


def place_objects(draws: Draws, image_size: int = IMAGE_SIZE) -> list[Obj]:
    """2..6 objects with distinct colours and footprints inside the canvas, GAP apart."""
    scale = image_size / IMAGE_SIZE
    colours = draws.shuffled(COLOURS)[: 2 + draws.below(5)]
    while True:  # start over in the rare case that the canvas jams
        objects: list[Obj] = []
        for colour in colours:
            shape, size = draws.choice(SHAPES), draws.choice(SIZES)
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
        if len(objects) == len(colours):
            return objects


def render(scene: Scene) -> np.ndarray:
    """(image_size, image_size, 3) uint8 image of the scene, without anti-aliasing."""
    size = scene.image_size
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        half = HALF_EXTENT[o.size] * size / IMAGE_SIZE
        box = [round(o.x - half), round(o.y - half), round(o.x + half), round(o.y + half)]
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif o.shape == "square":
            draw.rectangle(box, fill=colour)
        elif o.shape == "triangle":  # apex up
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=colour)
        else:  # cross: a plus sign, bars a third of the extent thick
            bar = half / 3
            draw.rectangle([box[0], round(o.y - bar), box[2], round(o.y + bar)], fill=colour)
            draw.rectangle([round(o.x - bar), box[1], round(o.x + bar), box[3]], fill=colour)
    return np.asarray(image)


def phrase(size: str | None, colour: str | None, shape: str | None, det: str = "the") -> str:
    """ "the large red circle", "an orange object", "a cross"; None leaves an attribute out."""
    words = [w for w in (size, colour) if w] + [shape or "object"]
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det] + words)


def plural(shape: str | None) -> str:
    return "objects" if shape is None else shape + ("es" if shape.endswith("s") else "s")


def listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def matches(o: Obj, size: str | None, colour: str | None, shape: str | None) -> bool:
    """Whether `o` fits the description; None fits anything."""
    return (size in (None, o.size)) and (colour in (None, o.colour)) and (shape in (None, o.shape))


def described(o: Obj, attrs: tuple[str, ...]) -> tuple[str | None, str | None, str | None]:
    """(size, colour, shape) of `o`, None for attributes not in `attrs`."""
    return (
        o.size if "size" in attrs else None,
        o.colour if "colour" in attrs else None,
        o.shape if "shape" in attrs else None,
    )


@dataclasses.dataclass
class Known:
    """A scene with what its captions and questions look up again and again, computed once."""

    scene: Scene
    relations: list[tuple[int, str, int]]  # scene.relations()
    holding: set[tuple[int, str, int]]  # the same, for lookups
    clearly_true: list[tuple[int, str, int]]  # relations holding by at least SLACK px
    clearly_false: set[tuple[int, str, int]]  # relations failing by at least SLACK px
    unique: list[list[tuple[str | None, str | None, str | None]]]  # per object, the descriptions only it fits

    @classmethod
    def of(cls, scene: Scene) -> "Known":
        relations, clearly_true, clearly_false = [], [], set()
        slack = SLACK * scene.image_size / IMAGE_SIZE
        for i, a in enumerate(scene.objects):
            for j, b in enumerate(scene.objects):
                for relation, margin in zip(RELATIONS, relation_margins(a, b, scene.image_size) if i != j else ()):
                    if margin > 0:
                        relations.append((i, relation, j))
                    if margin >= slack:
                        clearly_true.append((i, relation, j))
                    elif margin <= -slack:
                        clearly_false.add((i, relation, j))
        unique: list[list] = [[] for _ in scene.objects]
        for attrs in ATTR_SUBSETS:
            descs = [described(o, attrs) for o in scene.objects]
            counts = Counter(descs)
            for i, desc in enumerate(descs):
                if counts[desc] == 1:
                    unique[i].append(desc)
        return cls(scene, relations, set(relations), clearly_true, clearly_false, unique)

    def referring(self, i: int, draws: Draws, without: str | None = None) -> str | None:
        """A random description that fits object i alone ("the red circle"), never naming `without`."""
        k = ATTRS.index(without) if without else None
        options = [desc for desc in self.unique[i] if k is None or desc[k] is None]
        return phrase(*draws.choice(options)) if options else None


def captions(known: Known, draws: Draws) -> list[str]:
    """5 true captions, each naming every object in full: 3 plain listings, then 2 listings
    framed by a relation, counts or a superlative."""
    scene, relations, objects = known.scene, known.relations, known.scene.objects
    clear = set(known.clearly_true)

    def full(o: Obj) -> str:
        return phrase(o.size, o.colour, o.shape, "a")

    def everything(leaving_out: tuple[Obj, ...] = ()) -> str:
        return listing([full(o) for o in draws.shuffled(objects) if o not in leaving_out])

    def with_rest(head: str, *named: Obj) -> str:
        return head + (f", with {everything(named)}" if len(named) < len(objects) else "")

    listings = [
        everything,
        lambda: f"there are {NUMBERS[len(objects)]} objects: {everything()}",
        lambda: f"the picture shows {everything()}",
    ]

    def related() -> str:
        i, relation, j = draws.choice(known.clearly_true or relations)
        return with_rest(f"{full(objects[i])} is {relation} {full(objects[j])}", objects[i], objects[j])

    def counts() -> str:
        if draws.coin():  # by shape: "two circles, one square and one cross"
            groups = draws.shuffled(Counter(o.shape for o in objects).items())
            said = listing([f"{NUMBERS[n]} {plural(shape) if n > 1 else shape}" for shape, n in groups])
        else:  # by size: "three large objects and one small object"
            groups = draws.shuffled(Counter(o.size for o in objects).items())
            said = listing([f"{NUMBERS[n]} {size} {plural(None) if n > 1 else 'object'}" for size, n in groups])
        return f"{said}: {everything()}"

    superlatives = [  # leftmost / rightmost only when clearly left / right of every other object
        (name, i)
        for name, relation in SUPERLATIVE_RELATIONS.items()
        if (i := scene.superlative(name)) is not None
        and (relation not in RELATIONS or all((i, relation, j) in clear for j in range(len(objects)) if j != i))
    ]

    def superlative() -> str:
        name, i = draws.choice(superlatives)
        o = objects[i]
        if name in ("largest", "smallest"):  # the size is implied
            return with_rest(f"the {name} object is {phrase(None, o.colour, o.shape, 'a')}", o)
        return with_rest(f"the {name} object is {full(o)}", o)

    framed = [related, counts] + ([superlative] if superlatives else [])
    return [template() for template in draws.shuffled(listings)] + [template() for template in draws.shuffled(framed)[:2]]


def ask_attribute(known: Known, draws: Draws) -> QA | None:
    attr, i = draws.choice(ATTRS), draws.below(len(known.scene.objects))
    ref = known.referring(i, draws, without=attr)
    if ref is None:
        return None
    return QA(f"what {attr} is {ref}?", getattr(known.scene.objects[i], attr), "attribute")


def ask_count(known: Known, draws: Draws) -> QA | None:
    objects = known.scene.objects
    kind = draws.choice(("shape", "shape", "size", "size shape", "total"))
    shape = draws.choice(SHAPES if draws.below(4) == 0 else [o.shape for o in objects])  # mostly one present
    size = draws.choice(SIZES)
    size, shape = {"shape": (None, shape), "size": (size, None), "size shape": (size, shape), "total": (None, None)}[
        kind
    ]
    n = sum(matches(o, size, None, shape) for o in objects)
    words = f"{size} {plural(shape)}" if size else plural(shape)
    return QA(f"how many {words} are there?", NUMBERS[n], "count")


def ask_exist(known: Known, draws: Draws) -> QA | None:
    objects = known.scene.objects
    want = draws.coin()
    for _ in range(5):  # a near miss may still fit another object: try again for a "no"
        o = draws.choice(objects)
        if want:
            desc = described(o, draws.choice(ATTR_SUBSETS))
        else:  # a near miss: change one attribute of an object present, maybe leave out others
            changed = draws.choice(ATTRS)
            values = {"size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES}[changed]
            new = draws.choice([v for v in values if v != getattr(o, changed)])
            desc = tuple(new if a == changed else (getattr(o, a) if draws.coin() else None) for a in ATTRS)
        present = any(matches(p, *desc) for p in objects)
        if present == want:
            break
    return QA(f"is there {phrase(*desc, 'a')}?", "yes" if present else "no", "exist")


def ask_compare(known: Known, draws: Draws) -> QA | None:
    objects = known.scene.objects
    kind = draws.choice(("larger", "smaller", "shape", "size"))

    def answer(i: int, j: int) -> bool:
        if kind in ("larger", "smaller"):
            return relation_holds(objects[i], objects[j], kind)
        return getattr(objects[i], kind) == getattr(objects[j], kind)

    want = draws.coin()
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects)) if i != j]
    i, j = draws.choice([p for p in pairs if answer(*p) == want] or pairs)
    without = "shape" if kind == "shape" else "size"  # never name what is compared
    a, b = known.referring(i, draws, without), known.referring(j, draws, without)  # colour always fits one
    if kind in ("larger", "smaller"):
        question = f"is {a} {kind} than {b}?"
    else:
        question = f"do {a} and {b} have the same {kind}?"
    return QA(question, "yes" if answer(i, j) else "no", "compare")


def ask_spatial(known: Known, draws: Draws) -> QA | None:
    objects, relations = known.scene.objects, known.relations
    if draws.below(3) == 0:  # "what is above the red circle?": one object clearly is, all others clearly not
        options = [
            (i, relation, j)
            for i, relation, j in known.clearly_true
            if all((k, relation, j) in known.clearly_false for k in range(len(objects)) if k not in (i, j))
        ]
        if not options:
            return None
        i, relation, j = draws.choice(options)
        return QA(f"what is {relation} {known.referring(j, draws)}?", phrase(*described(objects[i], ATTRS)), "spatial")
    if draws.coin():
        i, relation, j = draws.choice(known.clearly_true or relations)
    else:
        n = len(objects)
        false = sorted(known.clearly_false) or [  # sorted: set order varies between processes
            (i, r, j) for i in range(n) for j in range(n) if i != j for r in RELATIONS if (i, r, j) not in known.holding
        ]
        if not false:
            return None
        i, relation, j = draws.choice(false)
    answer = "yes" if (i, relation, j) in known.holding else "no"
    return QA(f"is {known.referring(i, draws)} {relation} {known.referring(j, draws)}?", answer, "spatial")


ASK = dict(zip(QTYPES, (ask_attribute, ask_count, ask_exist, ask_compare, ask_spatial)))


def questions(known: Known, draws: Draws, per_type: int = 2) -> list[QA]:
    """`per_type` questions of each qtype (fewer only if 20 tries find no new one)."""
    asked: list[QA] = []
    for qtype in QTYPES:
        for _ in range(per_type):
            for _ in range(20):
                qa = ASK[qtype](known, draws)
                if qa is not None and all(qa.question != q.question for q in asked):
                    asked.append(qa)
                    break
    return asked


@dataclasses.dataclass
class ShapesSplit:
    """One split: images (N, H, W, 3) uint8 with their scenes, 5 captions and ~10 QA pairs each."""

    images: np.ndarray
    scenes: list[Scene]
    captions: list[list[str]]
    qa: list[list[QA]]

    def __len__(self) -> int:
        return len(self.scenes)

    @classmethod
    def generate(cls, num_images: int, seed: int, image_size: int = IMAGE_SIZE, stream: int = 0) -> "ShapesSplit":
        """`num_images` scenes from the random stream (seed, stream); splits use different streams."""
        draws = Draws(np.random.default_rng([seed, stream]))
        caption_draws = Draws(np.random.default_rng([seed, stream, 1]))
        images = np.empty((num_images, image_size, image_size, 3), np.uint8)
        scenes, all_captions, all_qa = [], [], []
        for k in range(num_images):
            scene = Scene(place_objects(draws, image_size), image_size)
            known = Known.of(scene)
            images[k] = render(scene)
            scenes.append(scene)
            all_captions.append(captions(known, caption_draws))
            all_qa.append(questions(known, draws))
        return cls(images, scenes, all_captions, all_qa)


def splits(
    num_train: int = 10000, num_val: int = 500, num_test: int = 1000, seed: int = 0, image_size: int = IMAGE_SIZE
) -> tuple[ShapesSplit, ShapesSplit, ShapesSplit]:
    """Train, validation and test splits from streams 0, 1, 2 of `seed`: independent of each
    other, and a split does not change when another one's size does."""
    return tuple(
        ShapesSplit.generate(n, seed, image_size, stream) for stream, n in enumerate((num_train, num_val, num_test))
    )


def corpus(split: ShapesSplit) -> Iterator[str]:
    """Every caption, question and answer of a split (to train a tokenizer)."""
    for captions_, qas in zip(split.captions, split.qa):
        yield from captions_
        for qa in qas:
            yield qa.question
            yield qa.answer
