"""The text-to-image shapes world (mmt.data.worlds.shapes_t2i): prompts, scenes for them,
held-out pairs kept out of training, and the fixed suite."""

import re

import numpy as np
import pytest

from mmt.data.worlds import shapes
from mmt.data.worlds.shapes import Draws, render
from mmt.data.worlds.shapes_parse import parse
from mmt.data.worlds.shapes_t2i import (
    CATEGORIES,
    HELD_OUT,
    TRAIN_CATEGORIES,
    T2ISplit,
    Want,
    make_prompt,
    prompt_suite,
    sample_prompt,
    scene_for,
)
from mmt.metrics.t2i import judge

COLOUR_SHAPE = re.compile(rf"({'|'.join(shapes.COLOURS)}) ({'|'.join(shapes.SHAPES)})")


def named_pairs(text: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names, read from its words."""
    return {(colour, shape) for colour, shape in COLOUR_SHAPE.findall(text)}


@pytest.fixture(scope="module")
def train() -> T2ISplit:
    return T2ISplit.generate(2000, seed=0)


def test_generation_is_deterministic_from_the_seed(train):
    again = T2ISplit.generate(200, seed=0)
    assert np.array_equal(again.images, train.images[:200]) and again.captions == train.captions[:200]
    other = T2ISplit.generate(200, seed=1)
    assert other.captions != again.captions


def test_training_split_never_shows_a_held_out_pair(train):
    assert {p.category for p in train.prompts} == set(TRAIN_CATEGORIES)
    for caption, scene in zip(train.captions, train.scenes):
        assert not named_pairs(caption) & set(HELD_OUT), caption
        assert not {(o.colour, o.shape) for o in scene.objects} & set(HELD_OUT), caption


def test_training_images_satisfy_their_captions(train):
    for prompt, scene, image in zip(train.prompts[:300], train.scenes, train.images):
        assert judge(prompt, scene.objects), prompt.text
        assert judge(prompt, parse(image)), prompt.text


def test_prompt_texts():
    red, blue = Want("circle", "red", "small"), Want("square", "blue", "large")
    assert make_prompt("single", (red,)).text == "a small red circle"
    assert make_prompt("two", (red, blue)).text == "a small red circle and a large blue square"
    assert make_prompt("position", (red, blue), "left of").text == "a small red circle left of a large blue square"
    assert make_prompt("counting", (Want("cross", None, None),) * 3).text == "three crosses"
    assert make_prompt("binding", (Want("circle", "orange", None), Want("square", "blue", None))).text == (
        "an orange circle and a blue square"
    )


def test_sampled_prompts_follow_their_category():
    draws = Draws(np.random.default_rng(0))
    for category in TRAIN_CATEGORIES:
        for held in (False, True):
            if held and category == "counting":
                with pytest.raises(ValueError, match="counting"):
                    sample_prompt(draws, category, held=held)
                continue
            for _ in range(50):
                prompt = sample_prompt(draws, category, held=held)
                pairs = [(w.colour, w.shape) for w in prompt.wants]
                assert sum(pair in HELD_OUT for pair in pairs) == (1 if held else 0), prompt.text
                colours = [w.colour for w in prompt.wants if w.colour]
                assert len(set(colours)) == len(colours), prompt.text
                if category == "binding":
                    assert len({w.shape for w in prompt.wants}) == 2 and all(w.size is None for w in prompt.wants)
                if category == "position":
                    assert prompt.relation in shapes.RELATIONS
                    for _ in range(3):
                        scene = scene_for(prompt, draws, allow_held=True)
                        a, b = scene.objects
                        margin = shapes.relation_margins(a, b)[shapes.RELATIONS.index(prompt.relation)]
                        assert margin >= shapes.SLACK, prompt.text


def test_scene_for_refuses_held_out_pairs_unless_allowed():
    draws = Draws(np.random.default_rng(0))
    prompt = make_prompt("colours", (Want("triangle", "red", None),))
    with pytest.raises(ValueError, match="held-out"):
        scene_for(prompt, draws)
    assert scene_for(prompt, draws, allow_held=True).objects[0].colour == "red"
    counting = make_prompt("counting", (Want("triangle", None, None),) * 4)
    for _ in range(50):  # free colours never make a red triangle
        assert all(o.colour != "red" for o in scene_for(counting, draws).objects)


def test_suite_is_fixed_and_held_prompts_name_a_held_out_pair():
    seen, held = prompt_suite()
    assert (seen, held) == prompt_suite()
    assert len(seen) + len(held) <= 100
    assert [p.category for p in seen] == [c for c in CATEGORIES for _ in range(8)]
    assert "counting" not in {p.category for p in held}
    for prompt in seen:
        assert not named_pairs(prompt.text) & set(HELD_OUT), prompt.text
    for prompt in held:
        assert len(named_pairs(prompt.text) & set(HELD_OUT)) == 1, prompt.text
    for category in CATEGORIES:
        texts = [p.text for p in seen + held if p.category == category]
        assert len(texts) == len(set(texts)), category


def test_a_perfect_generator_scores_every_suite_prompt_right():
    seen, held = prompt_suite()
    draws = Draws(np.random.default_rng(1))
    for prompt in seen + held:
        for _ in range(3):
            scene = scene_for(prompt, draws, allow_held=True)
            assert judge(prompt, scene.objects), prompt.text
            assert judge(prompt, parse(render(scene))), prompt.text
