import numpy as np
import pytest

from mmt.data.worlds import sort_of_clevr as soc
from mmt.data.worlds.sort_of_clevr import SceneObject, answer

COLOURS = list(soc.COLOURS)


def scene(*specs):
    """Objects from (shape, x, y), coloured in the dataset's colour order."""
    return [SceneObject(c, shape, float(x), float(y)) for c, (shape, x, y) in zip(COLOURS, specs)]


def test_generation_is_deterministic_and_seeded():
    a, b, c = soc.SortOfClevr.generate(5, 3), soc.SortOfClevr.generate(5, 3), soc.SortOfClevr.generate(5, 4)
    assert np.array_equal(a.images, b.images) and a.questions == b.questions
    assert not np.array_equal(a.images, c.images)


def test_scenes_follow_the_paper():
    data = soc.SortOfClevr.generate(30, 0)
    assert data.images.shape == (30, 75, 75, 3) and data.images.dtype == np.uint8
    for i, objects in enumerate(data.scenes):
        assert [o.colour for o in objects] == COLOURS  # one object per colour
        for j, o in enumerate(objects):
            assert 5 <= o.x <= 70 and 5 <= o.y <= 70
            for other in objects[j + 1 :]:  # 10x10 footprints never overlap
                assert abs(o.x - other.x) >= 10 or abs(o.y - other.y) >= 10
            assert tuple(data.images[i, int(o.y), int(o.x)]) == soc.COLOURS[o.colour]  # centre pixel has its colour
        assert tuple(data.images[i, 0, 0]) in [(255, 255, 255)] + list(soc.COLOURS.values())
        qs = [q for q in data.questions if q.image_index == i]
        assert len(qs) == 20
        assert [q.family for q in qs] == ["non-relational"] * 10 + ["relational"] * 10
        for q in qs:  # every stored answer is the answer to the question asked
            assert q.answer in soc.ANSWERS and q.answer == answer(objects, q.colour, q.subtype)
            assert q.text == soc.TEMPLATES[q.subtype].format(q.colour)
    shapes = [o.shape for s in data.scenes for o in s]
    assert 0.35 < shapes.count("square") / len(shapes) < 0.65


def test_squares_and_circles_are_drawn_differently():
    image = soc.draw(scene(("square", 20, 20), ("circle", 50, 50)))
    assert tuple(image[15, 15]) == soc.COLOURS["red"]  # square corner, 4.5 px from the centre on both axes
    assert tuple(image[45, 45]) == (255, 255, 255)  # circle's bounding-box corner is background
    assert tuple(image[50, 46]) == soc.COLOURS["green"]  # but its edge midpoint is inside


def test_non_relational_answers():
    objects = scene(("square", 37.4, 37.6), ("circle", 37.6, 37.4), ("circle", 10, 10), ("square", 60, 60), ("circle", 10, 60), ("square", 60, 10))
    assert answer(objects, "red", "shape") == "square"
    assert answer(objects, "red", "left") == "yes" and answer(objects, "red", "top") == "no"
    assert answer(objects, "green", "left") == "no" and answer(objects, "green", "top") == "yes"


def test_closest_never_picks_the_object_itself():
    # red is far from everyone; the widely copied bug would answer red's own shape (square)
    objects = scene(("square", 5, 5), ("circle", 70, 70), ("circle", 60, 70), ("circle", 70, 60), ("circle", 60, 60), ("circle", 50, 70))
    assert answer(objects, "red", "closest") == "circle"
    assert answer(objects, "red", "furthest") == "circle"


def test_closest_furthest_and_near_ties():
    # from red at (10, 10): green at distance 20.0, blue at 20.001 (near tie), others further
    objects = scene(("square", 10, 10), ("circle", 30, 10), ("square", 10, 30.001), ("square", 60, 60), ("square", 70, 40), ("square", 40, 70))
    assert answer(objects, "red", "closest") == "circle"
    assert answer(objects, "red", "furthest") == "square"  # orange at (60, 60) is the furthest


def test_exact_ties():
    # green and blue both exactly 20 px from red: different shapes -> ambiguous, same shape -> answerable
    base = [("square", 10, 10), ("circle", 30, 10), ("square", 10, 30), ("circle", 60, 60), ("circle", 70, 40), ("circle", 40, 70)]
    assert answer(scene(*base), "red", "closest") is None
    base[2] = ("circle", 10, 30)
    assert answer(scene(*base), "red", "closest") == "circle"


def test_count_includes_the_object_itself():
    objects = scene(("square", 10, 10), ("circle", 30, 10), ("square", 10, 30), ("circle", 60, 60), ("circle", 70, 40), ("circle", 40, 70))
    assert answer(objects, "red", "count") == "2"
    assert answer(objects, "green", "count") == "4"
    lone = scene(("square", 10, 10), *[("circle", 30 + 10 * i, 40) for i in range(5)])
    assert answer(lone, "red", "count") == "1"


def test_ambiguous_questions_are_not_asked():
    objects = scene(("square", 10, 10), ("circle", 30, 10), ("square", 10, 30), ("circle", 60, 60), ("circle", 70, 40), ("circle", 40, 70))
    questions = soc.ask(objects, 0, np.random.default_rng(0))
    assert all(q.answer is not None for q in questions)
    assert not any(q.colour == "red" and q.subtype == "closest" for q in questions)


@pytest.mark.parametrize("text", soc.question_corpus())
def test_corpus_covers_every_template(text):
    assert text.endswith("?") and any(c in text for c in COLOURS)
