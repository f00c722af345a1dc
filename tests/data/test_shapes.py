import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmt.data.worlds import shapes
from mmt.data.worlds.preview import preview_shapes
from mmt.data.worlds.shapes import NUMBERS, Obj, Scene, relation_holds
from mmt.data.worlds.shapes_truth import caption_facts, caption_objects, check_caption, fact_scores

# A hand-built 64x64 scene. Red is left of blue (dx 32) and above green (dy 20), 20 px from
# green (next to); blue is 32 px from red and 37.7 from green (neither next to).
RED = Obj("circle", "red", "large", 16, 16)
BLUE = Obj("square", "blue", "small", 48, 16)
GREEN = Obj("circle", "green", "small", 16, 36)
HAND = Scene([RED, BLUE, GREEN])


@pytest.fixture(scope="module")
def thousand() -> shapes.ShapesSplit:
    return shapes.ShapesSplit.generate(1000, seed=0, stream=2)


def fitting(scene: Scene, noun_phrase: str) -> list[int]:
    """Objects that the one noun phrase in `noun_phrase` fits, read with the truth checker's parser."""
    facts = [f for f in caption_facts(noun_phrase) if f.kind in ("object", "count")]
    assert len(facts) == 1, f"{noun_phrase!r} is not one noun phrase"
    return [i for i, o in enumerate(scene.objects) if facts[0].mentions[0].fits(o)]


def the(scene: Scene, noun_phrase: str, never_names: str | None = None) -> Obj:
    """The one object `noun_phrase` refers to; fails when the reference is ambiguous."""
    fit = fitting(scene, noun_phrase)
    assert len(fit) == 1, f"{noun_phrase!r} refers to {len(fit)} objects"
    if never_names:  # the question must not give its answer away
        values = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "size": shapes.SIZES}[never_names]
        assert not set(noun_phrase.split()) & set(values), noun_phrase
    return scene.objects[fit[0]]


def oracle(scene: Scene, question: str) -> str:
    """Answer a generated question independently of the generator, from the scene graph."""
    yes_no = {True: "yes", False: "no"}
    if m := re.fullmatch(r"what (colour|shape|size) is (the .+)\?", question):
        return getattr(the(scene, m[2], never_names=m[1]), m[1])
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        return NUMBERS[len(fitting(scene, m[1]))]
    if m := re.fullmatch(r"is there (an? .+)\?", question):
        return yes_no[len(fitting(scene, m[1])) > 0]
    if m := re.fullmatch(r"is (the .+) (larger|smaller) than (the .+)\?", question):
        return yes_no[relation_holds(the(scene, m[1], "size"), the(scene, m[3], "size"), m[2])]
    if m := re.fullmatch(r"do (the .+) and (the .+) have the same (shape|size)\?", question):
        return yes_no[getattr(the(scene, m[1], m[3]), m[3]) == getattr(the(scene, m[2], m[3]), m[3])]
    if m := re.fullmatch(r"is (the .+) (left of|right of|above|below|next to) (the .+)\?", question):
        return yes_no[relation_holds(the(scene, m[1]), the(scene, m[3]), m[2], scene.image_size)]
    if m := re.fullmatch(r"what is (left of|right of|above|below|next to) (the .+)\?", question):
        target = the(scene, m[2])
        found = [o for o in scene.objects if o != target and relation_holds(o, target, m[1], scene.image_size)]
        assert len(found) == 1, f"{question!r} has {len(found)} answers"
        return f"the {found[0].size} {found[0].colour} {found[0].shape}"
    raise AssertionError(f"no question template matches {question!r}")


def test_generation_is_deterministic_and_seeded():
    a, b = shapes.ShapesSplit.generate(20, seed=3), shapes.ShapesSplit.generate(20, seed=3)
    assert np.array_equal(a.images, b.images)
    assert a.scenes == b.scenes and a.captions == b.captions and a.qa == b.qa
    for other in (shapes.ShapesSplit.generate(20, seed=4), shapes.ShapesSplit.generate(20, seed=3, stream=1)):
        assert not np.array_equal(a.images, other.images) and a.captions != other.captions
    train, val, test = shapes.splits(30, 10, 20, seed=3)
    assert (len(train), len(val), len(test)) == (30, 10, 20)
    assert train.scenes[:20] == a.scenes and test.scenes == shapes.ShapesSplit.generate(20, 3, stream=2).scenes


@pytest.mark.parametrize("image_size", [64, 96])
def test_objects_are_inside_and_never_overlap(image_size):
    data = shapes.ShapesSplit.generate(200, seed=1, image_size=image_size)
    assert data.images.shape == (200, image_size, image_size, 3) and data.images.dtype == np.uint8
    scale = image_size / shapes.IMAGE_SIZE
    counts = Counter()
    for image, scene in zip(data.images, data.scenes):
        counts[len(scene.objects)] += 1
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # each colour at most once
        for k, o in enumerate(scene.objects):
            half = shapes.HALF_EXTENT[o.size] * scale
            assert half + 1 <= o.x <= image_size - 1 - half and half + 1 <= o.y <= image_size - 1 - half
            for p in scene.objects[k + 1 :]:
                reach = half + shapes.HALF_EXTENT[p.size] * scale + shapes.GAP * scale
                assert max(abs(o.x - p.x), abs(o.y - p.y)) >= reach
            assert tuple(image[int(o.y), int(o.x)]) == shapes.COLOURS[o.colour]  # the centre pixel is the object's
        packed = np.unique(image.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1]))  # each RGB as one int
        drawn = {(int(c) >> 16, int(c) >> 8 & 255, int(c) & 255) for c in packed}
        assert drawn == {(255, 255, 255)} | {shapes.COLOURS[o.colour] for o in scene.objects}  # no anti-aliasing
    assert set(counts) == {2, 3, 4, 5, 6}


def test_shapes_are_drawn_differently_and_colours_are_far_apart():
    corners, centres = {}, {}
    for shape in shapes.SHAPES:
        image = shapes.render(Scene([Obj(shape, "red", "large", 32, 32)]))
        corners[shape] = tuple(image[24, 24])  # 8 px from the centre on both axes: inside the box only
        centres[shape] = tuple(image[32, 32])
        assert (image[32, 32] != 255).any() and tuple(image[20, 32]) == (255, 255, 255)  # nothing past the half-extent
    assert set(centres.values()) == {shapes.COLOURS["red"]}
    assert corners["square"] == shapes.COLOURS["red"]
    assert corners["circle"] == corners["triangle"] == corners["cross"] == (255, 255, 255)
    triangle = shapes.render(Scene([Obj("triangle", "red", "large", 32, 32)]))
    assert (triangle[40] != 255).any(axis=1).sum() > (triangle[26] != 255).any(axis=1).sum()  # wide base, narrow apex
    rgb = np.array(list(shapes.COLOURS.values()), float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert distances.min() > 90 and np.linalg.norm(rgb - 255, axis=-1).min() > 150


def test_relations_at_their_thresholds():
    def rels(a, b, image_size=64):
        return {r for r in shapes.RELATIONS if relation_holds(a, b, r, image_size)}

    a = Obj("circle", "red", "small", 20, 20)
    assert rels(a, Obj("square", "blue", "small", 25.01, 20)) == {"left of", "next to"}
    assert rels(a, Obj("square", "blue", "small", 24.99, 20)) == {"next to"}  # within the 5 px margin
    assert rels(Obj("square", "blue", "small", 25.01, 20), a) == {"right of", "next to"}
    assert rels(a, Obj("square", "blue", "small", 20, 25.01)) == {"above", "next to"}  # y grows downwards
    assert rels(a, Obj("square", "blue", "small", 20, 14.99)) == {"below", "next to"}
    assert rels(a, Obj("square", "blue", "small", 20 + 23.99, 20)) == {"left of", "next to"}
    assert rels(a, Obj("square", "blue", "small", 20 + 24.01, 20)) == {"left of"}
    diagonal = Obj("square", "blue", "small", 20 + 16.96, 20 + 16.96)  # 23.985 px away
    assert rels(a, diagonal) == {"left of", "above", "next to"}
    assert rels(a, Obj("square", "blue", "small", 29.9, 20), image_size=128) == {"next to"}  # thresholds scale
    assert rels(a, Obj("square", "blue", "small", 30.1, 20), image_size=128) == {"left of", "next to"}
    assert set(HAND.relations()) == {
        (0, "left of", 1), (1, "right of", 0), (0, "above", 2), (2, "below", 0), (0, "next to", 2), (2, "next to", 0),
        (1, "right of", 2), (2, "left of", 1), (1, "above", 2), (2, "below", 1),
    }  # fmt: skip
    assert HAND.superlative("largest") == 0 and HAND.superlative("smallest") is None  # two small objects
    assert HAND.superlative("rightmost") == 1 and HAND.superlative("leftmost") is None  # red and green share x
    assert shapes.Known.of(HAND).relations == HAND.relations()


def test_scene_graph_round_trips_through_json():
    for scene in shapes.ShapesSplit.generate(5, seed=2).scenes + [HAND]:
        d = json.loads(json.dumps(scene.to_dict()))
        assert Scene.from_dict(d) == scene
        assert [tuple(r) for r in d["relations"]] == scene.relations()


def test_every_question_type_on_a_hand_built_scene():
    known, draws = shapes.Known.of(HAND), shapes.Draws(np.random.default_rng(0))
    asked = {qa.question: qa for _ in range(30) for qa in shapes.questions(known, draws)}
    for qa in asked.values():
        assert qa.answer == oracle(HAND, qa.question), qa
    expected = {  # worked out by hand from the picture described above HAND
        "what colour is the square?": "blue",
        "what shape is the blue object?": "square",
        "what size is the red object?": "large",
        "how many circles are there?": "two",
        "how many triangles are there?": "zero",
        "how many objects are there?": "three",
        "is there a red circle?": "yes",
        "is there a red square?": "no",
        "is the red object larger than the green object?": "yes",
        "do the red object and the green object have the same shape?": "yes",
        "is the red object left of the blue object?": "yes",
        "is the red object next to the blue object?": "no",
        "is the green object below the blue object?": "yes",
        "what is below the blue object?": "the small green circle",
        "is the red circle left of the blue square?": "yes",
        "is the red circle above the green circle?": "yes",
        "is the square next to the large red object?": "no",
        "what is below the red circle?": "the small green circle",
        "what is right of the green circle?": "the small blue square",
    }
    hits = [asked[q] for q in expected if q in asked]
    assert all(qa.answer == expected[qa.question] for qa in hits)
    assert {qa.qtype for qa in hits} == set(shapes.QTYPES)


def test_generated_answers_match_an_independent_oracle(thousand):
    for scene, qas in zip(thousand.scenes[:300], thousand.qa[:300]):
        assert len(qas) == 10 and Counter(qa.qtype for qa in qas) == {t: 2 for t in shapes.QTYPES}
        assert len({qa.question for qa in qas}) == 10
        for qa in qas:
            assert qa.answer == oracle(scene, qa.question), (scene, qa)


def test_yes_no_answers_are_balanced(thousand):
    answers = [qa.answer for qas in thousand.qa for qa in qas if qa.answer in ("yes", "no")]
    share = answers.count("yes") / len(answers)
    print(f"\nyes share over {len(answers)} yes/no answers: {share:.3f}")
    assert 0.35 < share < 0.65
    for qtype in ("exist", "compare", "spatial"):
        typed = [qa.answer for qas in thousand.qa for qa in qas if qa.qtype == qtype and qa.answer in ("yes", "no")]
        assert 0.35 < typed.count("yes") / len(typed) < 0.65, qtype


def test_reference_captions_are_true_and_list_every_object(thousand):
    for k, (scene, captions) in enumerate(zip(thousand.scenes[:300], thousand.captions[:300])):
        assert len(captions) == 5 and len(set(captions)) == 5
        for position, caption in enumerate(captions):
            check = check_caption(caption, scene)
            assert check.stated > 0 and check.true == check.stated, (caption, check, scene)
            assert caption == caption.lower() and not caption.endswith(".") and len(caption.split()) <= 36
            assert check.mentioned == set(range(len(scene.objects))), caption  # every caption names every object
            if position < 3:  # a plain listing: no relation, superlative or counts
                assert " is " not in caption and (":" not in caption or caption.startswith("there are ")), caption
            for fact in caption_facts(caption):  # "the" only where one object fits
                if fact.kind == "object" and fact.text.startswith("the "):
                    assert len(fitting(scene, fact.text)) == 1, caption
    every = [c for cs in thousand.captions[:300] for c in cs]
    scores = fact_scores(every, [s for s in thousand.scenes[:300] for _ in range(5)])
    assert scores == {"fact_precision": 1.0, "fact_recall": 1.0, "captions_without_facts": 0}
    framings = Counter(
        "relation" if " is " in c and not c.startswith("the ") else "superlative" if c.startswith("the ") else "counts"
        for cs in thousand.captions[:300]
        for c in cs[3:]
    )
    assert set(framings) == {"relation", "counts", "superlative"} and min(framings.values()) > 100, framings


def test_false_captions_are_caught_and_true_ones_accepted():
    true = [
        "a large red circle, a small blue square and a small green circle",
        "there are three objects: a small green circle, a large red circle and a small blue square",
        "a large red circle is left of a small blue square",
        "the blue square is above a green circle",
        "a small green circle is next to a large red circle",
        "two circles and one square",
        "one large object and two small objects",
        "the largest object is a red circle",
        "the rightmost object is a blue square",
        "a circle is left of a square",  # any circle left of any square will do
        "a circle is above a circle",
    ]
    for caption in true:
        check = check_caption(caption, HAND)
        assert check.stated > 0 and check.true == check.stated, (caption, check)
    false = {
        "a large blue circle": ["a large blue circle"],  # wrong colour
        "the red circle is right of the blue square": ["the red circle is right of the blue square"],
        "a red circle is next to a blue square": ["a red circle is next to a blue square"],
        "a red circle is next to a red circle": ["a red circle is next to a red circle"],  # not to itself
        "there are four objects: a red circle": ["four objects"],
        "three circles and one square": ["three circles"],
        "a large red circle and a yellow triangle": ["a yellow triangle"],  # not in the scene
        "a yellow triangle is left of a blue square": ["a yellow triangle", "a yellow triangle is left of a blue square"],
        "the smallest object is a green circle": ["the smallest object is a green circle"],  # two small objects
        "the largest object is a blue square": ["the largest object is a blue square"],
        "a red blue circle": ["a red blue circle"],
    }
    for caption, wrong in false.items():
        assert check_caption(caption, HAND).false_facts == wrong, caption
    assert check_caption("a circle", HAND).mentioned == set()  # two circles: which one is meant is unknown
    assert check_caption("two circles", HAND).mentioned == {0, 2}
    assert check_caption("three objects", HAND).mentioned == set()


def test_malformed_captions_never_raise():
    junk = ["red red the is", "", "[UNK] circle", "is is left of of", "the the two", "six", "left of", "a red",
            "circles circles 7 objects", "the largest is is", "là-bas 🙂 circle!!", "[PAD] [EOS]"]  # fmt: skip
    for caption in junk:
        check_caption(caption, HAND)
    assert caption_facts("red red the is") == [] and caption_facts("") == []
    assert [f.text for f in caption_facts("[UNK] circle")] == ["circle"]
    assert [f.text for f in caption_facts("a red and blue circle")] == ["blue circle"]  # other words end a phrase
    scores = fact_scores(junk, [HAND] * len(junk))
    assert scores["captions_without_facts"] == sum(not caption_facts(c) for c in junk) >= 6
    assert fact_scores([], []) == {"fact_precision": 0.0, "fact_recall": 0.0, "captions_without_facts": 0}


def test_listing_captions_identify_their_scene(thousand):
    def key(objects):
        return tuple(sorted(objects, key=str))

    scene_keys = [key((o.size, o.colour, o.shape) for o in s.objects) for s in thousand.scenes]
    owners = Counter(scene_keys)
    own = [
        key(caption_objects(c).elements()) == scene_keys[k] and owners[scene_keys[k]] == 1
        for k, captions in enumerate(thousand.captions)
        for c in captions[:3]
    ]
    share = sum(own) / len(own)
    print(f"\nlisting captions naming exactly their own scene's objects, and no other scene's: {share:.3f}")
    assert share > 0.9


def test_corpus_and_preview(tmp_path):
    data = shapes.ShapesSplit.generate(3, seed=0)
    texts = list(shapes.corpus(data))
    assert len(texts) == 3 * 5 + 2 * sum(len(q) for q in data.qa)
    assert texts[:5] == data.captions[0]
    path = preview_shapes(tmp_path / "sheet.png", num_scenes=2)
    assert Image.open(path).size[0] > 64 * 4


def test_scenes_described_finds_every_scene_a_caption_is_true_of():
    from mmt.data.worlds.shapes_truth import scenes_described

    scenes = [
        Scene([Obj("circle", "red", "large", 20, 20), Obj("square", "blue", "small", 45, 45)]),
        Scene([Obj("circle", "red", "small", 20, 20), Obj("square", "blue", "small", 45, 45)]),
        Scene([Obj("circle", "red", "large", 45, 20), Obj("square", "blue", "small", 20, 45)]),
    ]
    assert scenes_described("a large red circle and a small blue square", scenes) == [0, 2]
    assert scenes_described("the red circle is left of the blue square", scenes) == [0, 1]
    assert scenes_described("two small objects", scenes) == [1]
    assert scenes_described("a green triangle", scenes) == []
    # complete: the caption must also mention every object of the scene
    assert scenes_described("a large red circle", scenes) == [0, 2]
    assert scenes_described("a large red circle", scenes, complete=True) == []
    assert scenes_described("a small blue square is right of a large red circle", scenes, complete=True) == [0]
    two = "two small objects: a small red circle and a small blue square"
    assert scenes_described(two, scenes, complete=True) == [1]
