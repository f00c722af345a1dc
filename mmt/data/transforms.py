"""Image preprocessing on numpy/PIL (no torchvision): load, convert, resize, normalise."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs) instead of exhausting memory


class ImageError(ValueError):
    """An image file is missing, unreadable or too large; the message names the file."""


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read any image file as (size, size, 3) uint8 RGB.

    Transparent images are composited on white (the built-in worlds' background);
    grayscale and palette images are converted; any size is resized (bilinear).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image not found")
    return _read(path, size, str(path))


def decode_image(data: bytes, size: int, name: str, augment: np.random.Generator | None = None) -> np.ndarray:
    """`load_image` for an image file's bytes (e.g. a shard member); errors name `name`.
    With `augment`, training augmentation drawn from that generator (see `image_array`)."""
    return _read(io.BytesIO(data), size, name, augment)


def _read(file: Path | io.BytesIO, size: int, name: str, augment: np.random.Generator | None = None) -> np.ndarray:
    try:
        with Image.open(file) as image:
            return image_array(image, size, name, augment)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot read image ({e})") from None


def image_array(image: Image.Image, size: int, name: str, augment: np.random.Generator | None = None) -> np.ndarray:
    """An opened image as (size, size, 3) uint8 RGB (see `load_image`); `name` is what the
    pixel-limit error names. With `augment` (a numpy Generator), the light training
    augmentation of `mmt.data.photos` instead of the plain resize: a random resized crop
    (50-100% of the area, aspect 3/4-4/3) and a colour jitter of 0.1 (no flips, no hue)."""
    if image.width * image.height > MAX_PIXELS:
        raise ImageError(f"{name}: {image.width}x{image.height} exceeds the {MAX_PIXELS:,}-pixel limit")
    image.load()
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    if augment is not None:
        from mmt.data.photos import color_jitter, random_resized_crop

        pixels = np.asarray(random_resized_crop(image, size, augment), dtype=np.float32) / np.float32(255.0)
        return np.rint(color_jitter(pixels, augment) * 255.0).astype(np.uint8)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
