"""The one image pipeline (mmt.data.images): any image read as what it shows, fitted to the model's
square without stretching, augmented reproducibly, refused with its name when it cannot be used."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmt.data.images import Fit, ImageError, center_square, color_jitter, fit, load_image, open_image, to_pixels


def test_center_square_keeps_the_centre_and_leaves_a_square_of_the_size_alone():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # a blue square in the middle third
    out = center_square(image, 10)
    assert out.size == (10, 10)
    assert np.asarray(out)[..., 2].min() > 200 and np.asarray(out)[..., 0].max() < 50  # only the centre is kept
    assert center_square(Image.new("RGB", (8, 30)), 16).size == (16, 16)
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    assert np.array_equal(fit(square, 12), np.asarray(square))  # the built-in worlds: exactly as drawn


def test_pixels_are_in_minus_one_to_one():
    images = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
    pixels = to_pixels(images)
    assert pixels.shape == (2, 3, 4, 4) and pixels.dtype == torch.float32
    assert pixels[0].eq(-1).all() and pixels[1].eq(1).all()


def test_training_augmentation_is_a_function_of_its_generator():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    a = fit(image, 24, np.random.default_rng([3, 7]))
    b = fit(image, 24, np.random.default_rng([3, 7]))
    c = fit(image, 24, np.random.default_rng([3, 8]))
    assert a.shape == (24, 24, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_color_jitter_stays_in_range_and_is_small():
    pixels = np.random.default_rng(2).random((8, 8, 3), dtype=np.float32)
    out = color_jitter(pixels.copy(), np.random.default_rng(0), 0.1)
    assert out.min() >= 0 and out.max() <= 1 and np.abs(out - pixels).max() < 0.35


def test_any_source_opens_as_rgb(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGBA", (5, 4), (0, 0, 0, 0)).save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        image = open_image(source)
        assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (255, 255, 255)  # on white
    array = np.zeros((3, 5, 3), np.uint8)
    assert open_image(array).size == (5, 3)
    assert load_image(Image.new("L", (9, 9), 40), 4).shape == (4, 4, 3)


def test_unusable_images_are_refused_with_their_name(tmp_path):
    with pytest.raises(ImageError, match="none.png: image not found") as missing:
        open_image(tmp_path / "none.png")
    assert missing.value.kind == "missing_image"
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png: not an image") as bad:
        open_image(tmp_path / "bad.png")
    assert bad.value.kind == "corrupt_image"
    with pytest.raises(ImageError, match="exceeds the 100-pixel limit") as large:
        open_image(Image.new("RGB", (20, 20)), max_pixels=100)
    assert large.value.kind == "too_large"
    with pytest.raises(ImageError, match="uint8"):
        open_image(np.zeros((3, 3), np.float32))
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        open_image(3)


def gradient(height=8, width=32):
    """An 8-bit gray picture with every level 0..255 (the twin the other modes are compared with)."""
    return np.arange(height * width, dtype=np.uint8).reshape(height, width)


def saved(tmp_path, image, name):
    """`image` written to a file and opened again as a user's file would be."""
    path = tmp_path / name
    image.save(path)
    return path


def test_every_mode_pillow_opens_reads_as_its_8_bit_twin(tmp_path):
    gray = gradient()
    twin = np.repeat(gray[..., None], 3, axis=2)  # the RGB picture of the 8-bit gray one
    colour = np.stack([gray, gray[::-1], np.roll(gray, 7, axis=1)], axis=2)  # an RGB picture
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # 0..255 -> 0..65535: the same picture
    cases = {
        "16-bit PNG": (saved(tmp_path, sixteen, "g16.png"), twin),
        "16-bit TIFF": (saved(tmp_path, sixteen, "g16.tif"), twin),
        "16-bit PGM (opened as I)": (saved(tmp_path, sixteen, "g16.pgm"), twin),
        "32-bit integer I": (Image.fromarray(gray.astype(np.int32) * 257), twin),
        "float TIFF": (saved(tmp_path, Image.fromarray(gray.astype(np.float32) / 255), "f.tif"), twin),
        "1-bit": (saved(tmp_path, Image.fromarray(gray >= 128).convert("1"), "b.png"), np.repeat(np.where(gray >= 128, 255, 0).astype(np.uint8)[..., None], 3, 2)),
        "L": (saved(tmp_path, Image.fromarray(gray), "l.png"), twin),
        "LA, opaque": (saved(tmp_path, Image.fromarray(gray).convert("LA"), "la.png"), twin),
        "La, opaque": (Image.fromarray(gray).convert("LA").convert("La"), twin),
        "RGB": (saved(tmp_path, Image.fromarray(colour), "rgb.png"), colour),
        "RGBA, opaque": (saved(tmp_path, Image.fromarray(colour).convert("RGBA"), "rgba.png"), colour),
        "RGBa, opaque": (Image.fromarray(colour).convert("RGBa"), colour),
        "RGBX": (Image.fromarray(colour).convert("RGBX"), colour),
        "P": (saved(tmp_path, Image.fromarray(gray).convert("P"), "p.png"), twin),  # (gray levels fit a palette exactly)
        "PA, opaque": (Image.fromarray(gray).convert("PA"), twin),
        "CMYK": (saved(tmp_path, Image.fromarray(colour).convert("CMYK"), "cmyk.tif"), colour),
    }
    for what, (source, expected) in cases.items():
        got = np.asarray(open_image(source))
        assert got.shape == expected.shape, what
        assert np.abs(got.astype(int) - expected).max() == 0, what
    # converted through other colour spaces, within their rounding
    for mode in ("YCbCr", "HSV", "LAB"):
        got = np.asarray(open_image(Image.fromarray(colour).convert(mode))).astype(int)
        assert np.abs(got - colour).mean() < 3, mode


def test_transparency_in_any_mode_is_composited_on_white():
    clear = {"RGBA": (0, 0, 0, 0), "LA": (0, 0), "RGBa": (0, 0, 0, 0), "PA": (0, 0)}
    for mode, value in clear.items():
        assert open_image(Image.new(mode, (2, 2), value)).getpixel((0, 0)) == (255, 255, 255), mode
    assert open_image(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_images_whose_brightness_cannot_be_known_are_refused_with_their_name(tmp_path):
    from mmt.data.formats.records import DataError, check_image

    refused = {
        "too_bright.tif": Image.fromarray(np.full((4, 4), 2.0, np.float32)),  # float above 1
        "negative.tif": Image.fromarray(np.full((4, 4), -1, np.int32)),
        "wide.tif": Image.fromarray(np.full((4, 4), 70_000, np.int32)),  # more than 16 bits
        "nan.tif": Image.fromarray(np.full((4, 4), np.nan, np.float32)),
    }
    for name, image in refused.items():
        path = saved(tmp_path, image, name)
        with pytest.raises(ImageError, match=rf"{name}: .*image with values from"):
            open_image(path)
        with pytest.raises(DataError, match=name):  # and `mmt data check` counts it as bad
            check_image(path)
    assert check_image(saved(tmp_path, Image.fromarray(gradient().astype(np.uint16) * 257), "ok16.png")) == (32, 8)


def test_stretching_fits_both_sides_for_models_trained_that_way():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # a blue quarter on the left
    stretched = fit(image, Fit(20, "stretch"))
    cropped = fit(image, Fit(20, "crop"))
    assert stretched.shape == cropped.shape == (20, 20, 3)
    assert stretched[10, 2, 2] > 200 and cropped[10, 2, 2] < 50  # stretching keeps the left quarter, cropping cuts it
    square = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    assert np.array_equal(fit(Image.fromarray(square), Fit(20, "stretch")), square)  # a square of the size: as it is
    with pytest.raises(ValueError, match="not one of crop, stretch"):
        fit(image, Fit(20, "squash"))


def test_from_pixels_gives_back_the_pictures_to_pixels_took():
    from mmt.data.images import from_pixels, to_pixels

    pictures = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    assert np.array_equal(from_pixels(to_pixels(pictures)), pictures)
