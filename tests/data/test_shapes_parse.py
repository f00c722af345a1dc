"""The scene parser (mmt.data.worlds.shapes_parse): exact recovery of ground-truth renders of the
shapes world and of the text-to-image world, and robustness to blur, colour drift and noise."""

import numpy as np
import pytest

from mmt.data.worlds import shapes
from mmt.data.worlds.shapes import Obj, Scene, render
from mmt.data.worlds.shapes_parse import components, parse, parse_result, same_scene
from mmt.data.worlds.shapes_t2i import T2ISplit


def recovered(images, scenes) -> float:
    return float(np.mean([same_scene(parse(image), scene) for image, scene in zip(images, scenes)]))


def corrupt(image: np.ndarray, rng: np.random.Generator, drift: float = 20, noise: float = 8, strays: int = 6):
    """What a small decoder might give back: each colour drifted by up to `drift` per channel, a
    3x3 binomial blur, gaussian pixel noise and `strays` pixels of random colour."""
    H, W, _ = image.shape
    blurred = image.astype(np.float32)
    for rgb in shapes.COLOURS.values():
        blurred[(image == rgb).all(-1)] += rng.uniform(-drift, drift, 3)
    kernel = (0.25, 0.5, 0.25)
    padded = np.pad(blurred, ((1, 1), (0, 0), (0, 0)), mode="edge")
    blurred = sum(k * padded[i : i + H] for i, k in enumerate(kernel))
    padded = np.pad(blurred, ((0, 0), (1, 1), (0, 0)), mode="edge")
    blurred = sum(k * padded[:, i : i + W] for i, k in enumerate(kernel))
    blurred += rng.normal(0, noise, blurred.shape)
    blurred[rng.integers(0, H, strays), rng.integers(0, W, strays)] = rng.integers(0, 256, (strays, 3))
    return blurred.clip(0, 255).astype(np.uint8)


def test_components_join_diagonal_neighbours_and_keep_apart_the_rest():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one diagonal line
    mask[0, 4:6] = True  # another component
    mask[5, 0] = True  # a third
    labels = components(mask)
    assert labels[0, 0] == labels[1, 1] == labels[2, 2]
    assert len(np.unique(labels[mask])) == 3 and (labels[~mask] == -1).all()


def test_blank_image_has_no_objects():
    assert parse(np.full((64, 64, 3), 255, np.uint8)) == []
    assert parse_result(np.full((64, 64, 3), 255, np.uint8)).stray == 0


def test_stray_pixels_are_not_objects():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[10:13, 10:13] = shapes.COLOURS["red"]  # 9 px, far below the smallest object
    image[40, 40] = (0, 0, 0)  # noise: near no colour
    result = parse_result(image)
    assert result.objects == [] and result.stray == 9 and result.noise == 1


def test_every_shape_and_size_is_read_back():
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            scene = Scene([Obj(shape, "purple", size, 30.3, 33.6)])
            (found,) = parse(render(scene))
            assert (found.shape, found.size, found.colour) == (shape, size, "purple")
            assert abs(found.x - 30.3) <= 1 and abs(found.y - 33.6) <= 1


def test_same_scene_needs_every_attribute_and_the_centre():
    scene = Scene([Obj("circle", "red", "small", 20, 20), Obj("cross", "blue", "large", 44, 40)])
    assert same_scene(list(reversed(scene.objects)), scene)
    assert not same_scene(scene.objects[:1], scene)
    assert not same_scene([Obj("circle", "red", "large", 20, 20), scene.objects[1]], scene)
    assert not same_scene([Obj("circle", "red", "small", 23, 20), scene.objects[1]], scene)
    assert same_scene([Obj("circle", "red", "small", 21.5, 18.5), scene.objects[1]], scene)


def test_shapes_world_renders_parse_exactly():
    split = shapes.ShapesSplit.generate(500, seed=0, stream=3)
    rate = recovered(split.images, split.scenes)
    assert rate >= 0.99, f"parsed {rate:.1%} of 500 shapes-world scenes exactly (measured 100.0%)"


def test_t2i_world_renders_parse_exactly():
    split = T2ISplit.generate(500, seed=0, stream=3)
    rate = recovered(split.images, split.scenes)
    assert rate >= 0.99, f"parsed {rate:.1%} of 500 text-to-image scenes exactly (measured 100.0%)"


@pytest.mark.parametrize("image_size", [96, 128])
def test_other_image_sizes_parse_exactly(image_size):
    split = shapes.ShapesSplit.generate(100, seed=0, stream=3, image_size=image_size)
    ok = [same_scene(parse(image), scene, 2.0 * image_size / 64) for image, scene in zip(split.images, split.scenes)]
    assert np.mean(ok) >= 0.99, f"parsed {np.mean(ok):.1%} of 100 scenes at {image_size}x{image_size}"


def test_blurred_drifted_noisy_renders_mostly_parse():
    split = shapes.ShapesSplit.generate(300, seed=0, stream=4)
    rng = np.random.default_rng(0)
    rate = recovered([corrupt(image, rng) for image in split.images], split.scenes)
    # measured 98.7% on these 300 (the misses: objects 1 px apart that the blur joins)
    assert rate >= 0.95, f"parsed {rate:.1%} of 300 corrupted scenes exactly (measured 98.7%)"
