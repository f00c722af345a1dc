"""Text-to-image judging and scores (mmt.metrics.t2i) on hand-made cases and ground-truth renders."""

import numpy as np

from mmt.data.worlds.shapes import Draws, Obj, render
from mmt.data.worlds.shapes_t2i import Want, make_prompt, prompt_suite, scene_for
from mmt.metrics.t2i import format_table, judge, layout, suite_scores

RED_CIRCLE = Obj("circle", "red", "small", 16, 32)
BLUE_SQUARE = Obj("square", "blue", "large", 46, 32)
GREEN_CROSS = Obj("cross", "green", "small", 30, 54)


def test_judge_single_and_two():
    single = make_prompt("single", (Want("circle", "red", "small"),))
    assert judge(single, [RED_CIRCLE])
    assert not judge(single, [Obj("circle", "red", "large", 16, 32)])  # wrong size
    assert not judge(single, [])
    assert not judge(single, [RED_CIRCLE, GREEN_CROSS])  # an extra object
    two = make_prompt("two", (Want("square", "blue", "large"), Want("circle", "red", "small")))
    assert judge(two, [RED_CIRCLE, BLUE_SQUARE])  # any order
    assert not judge(two, [RED_CIRCLE, Obj("square", "blue", "small", 46, 32)])


def test_judge_binding_fails_on_swapped_colours():
    binding = make_prompt("binding", (Want("circle", "red", None), Want("square", "blue", None)))
    assert judge(binding, [Obj("circle", "red", "large", 16, 32), BLUE_SQUARE])  # sizes free
    swapped = [Obj("circle", "blue", "small", 16, 32), Obj("square", "red", "large", 46, 32)]
    assert not judge(binding, swapped)


def test_judge_counting():
    three = make_prompt("counting", (Want("circle", None, None),) * 3)
    circles = [
        Obj("circle", c, s, x, 20) for c, s, x in (("red", "small", 10), ("blue", "large", 30), ("gray", "small", 52))
    ]
    assert three.text == "three circles" and judge(three, circles)
    assert not judge(three, circles[:2])  # too few
    assert not judge(three, circles + [Obj("circle", "green", "small", 30, 50)])  # too many
    assert not judge(three, circles[:2] + [GREEN_CROSS])  # a wrong shape


def test_judge_position():
    wants = (Want("circle", "red", "small"), Want("square", "blue", "large"))
    assert judge(make_prompt("position", wants, "left of"), [BLUE_SQUARE, RED_CIRCLE])
    assert not judge(make_prompt("position", wants, "right of"), [RED_CIRCLE, BLUE_SQUARE])
    assert not judge(make_prompt("position", wants, "above"), [RED_CIRCLE, BLUE_SQUARE])
    assert judge(make_prompt("position", wants[::-1], "right of"), [RED_CIRCLE, BLUE_SQUARE])
    near = Obj("square", "blue", "large", 36, 32)  # 20 px from the circle
    assert judge(make_prompt("position", wants, "next to"), [RED_CIRCLE, near])
    assert not judge(make_prompt("position", wants, "next to"), [RED_CIRCLE, BLUE_SQUARE])  # 30 px


def test_layouts_quantise_positions():
    assert layout([RED_CIRCLE]) == layout([Obj("circle", "red", "small", 17, 33)])
    assert layout([RED_CIRCLE]) != layout([Obj("circle", "red", "small", 25, 32)])


def test_suite_scores_ground_truth_is_one_and_blank_is_zero():
    seen, held = prompt_suite()
    draws = Draws(np.random.default_rng(0))
    truth = [[render(scene_for(p, draws, allow_held=True)) for _ in range(2)] for p in seen]
    result = suite_scores(seen, truth)
    assert result["overall"] == 1.0 and result["right"] == result["images"] == 2 * len(seen)
    assert set(result["categories"].values()) == {1.0}
    assert all(p["right"] == [True, True] for p in result["prompts"])
    assert 1.0 < result["diversity"] <= 2.0
    blank = np.full((64, 64, 3), 255, np.uint8)
    empty = suite_scores(held, [[blank, blank] for _ in held])
    assert empty["overall"] == 0.0 and empty["diversity"] == 1.0 and empty["right_diversity"] == 0.0
    table = format_table(result, empty)
    assert "counting" in table and table.splitlines()[0].split() == ["category", "seen", "held-out"]
    assert "overall    1.000" in table


def test_overall_is_the_mean_over_categories():
    single = make_prompt("single", (Want("circle", "red", "small"),))
    binding = make_prompt("binding", (Want("circle", "red", None), Want("square", "blue", None)))
    draws = Draws(np.random.default_rng(0))
    right = render(scene_for(single, draws))
    blank = np.full((64, 64, 3), 255, np.uint8)
    result = suite_scores([single, single, binding], [[right], [right], [blank]])
    assert result["categories"] == {"single": 1.0, "binding": 0.0}
    assert result["overall"] == 0.5  # not 2/3, the share of right images
