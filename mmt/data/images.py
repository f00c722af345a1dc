"""The one image pipeline, for training and inference alike (PIL, numpy, torch; no torchvision).

    file, bytes, PIL image or array --open_image--> RGB PIL image --fit--> (size, size, 3) uint8
        --to_pixels--> float (N, 3, size, size) in [-1, 1], what every mmt model reads

- **Opening**: every mode Pillow opens becomes the 8-bit RGB picture it shows (`to_rgb`):
  16-bit integer images (modes "I;16*", and "I", as which Pillow opens 16-bit PGM files) are
  scaled from 0-65535, float images ("F") from 0-1, transparent images are composited on
  white (the built-in worlds' background); an integer image with values outside 0-65535 or a
  float image outside 0-1 is refused, as its brightness cannot be known. An image over
  `MAX_PIXELS` is refused from its header, before anything is decoded (a decompression bomb
  costs nothing); a missing, truncated or corrupt file is refused with its name.
- **Fitting to the model's square** (`Fit`, from the model's `vision.image_size` and
  `vision.image_fit`): "crop", the default, resizes the shorter side to `size` and keeps the
  centre square (bicubic, antialiased when shrinking), so nothing is stretched; "stretch"
  resizes both sides (bilinear), as mmt 0.1 did, for models trained that way. An image already
  `size` x `size` (the built-in worlds) is left exactly as it is either way.
- **Training augmentation** (with a numpy Generator, so a batch is a pure function of its seed):
  a random resized crop of 50-100% of the area with aspect ratio 3/4-4/3 (milder than
  classification's 8%: a caption or question speaks of most of the picture), then a colour
  jitter of 0.1 in brightness, contrast and saturation. No flips and no hue: texts say "left"
  and "red", and a flipped or re-hued image makes them false.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")  # what counts as an image in a folder
MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs) instead of exhausting memory
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L" conversion
_CROP_TRIES = 10
T = TypeVar("T")

# why an image could not be used, as `ImageError.kind` (the data checker counts them by kind)
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_LARGE = "too_large"


class Fit(NamedTuple):
    """How images are fitted to a model's square input: its side, and "crop" or "stretch"."""

    size: int
    mode: str = "crop"

    @classmethod
    def of(cls, vision) -> "Fit":
        """The fit a model's vision config (`mmt.config.VisionConfig`) asks for."""
        return cls(vision.image_size, vision.image_fit)


def _as_fit(fit: "int | Fit") -> "Fit":
    return fit if isinstance(fit, Fit) else Fit(fit)


class ImageError(ValueError):
    """An image is missing, unreadable or too large; the message names it."""

    def __init__(self, name: str, detail: str, kind: str = CORRUPT_IMAGE):
        self.name, self.detail, self.kind = name, detail, kind
        super().__init__(f"{name}: {detail}")


def is_image_set(spec: str | Path) -> bool:
    """Whether `spec` names several images: a folder, or a glob pattern (*, ?, [...]) that is not
    the name of a file."""
    return Path(spec).is_dir() or (not Path(spec).exists() and any(c in str(spec) for c in "*?["))


def image_files(spec: str | Path) -> list[Path]:
    """The image files a folder holds (searched recursively) or a glob pattern matches, by
    extension (`IMAGE_EXTENSIONS`, any case), sorted by path; a ValueError naming `spec` if
    there are none."""
    if Path(spec).is_dir():
        folder = Path(spec)
        found = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                       key=lambda p: p.relative_to(folder).as_posix())
    else:
        import glob

        found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).suffix.lower() in IMAGE_EXTENSIONS and Path(p).is_file())
    if not found:
        raise ValueError(f"{spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) {'under this folder' if Path(spec).is_dir() else 'match'}")
    return found


def _name_of(source: str | Path | bytes, name: str | None) -> str:
    return name or (f"image of {len(source):,} bytes" if isinstance(source, bytes) else str(source))


def with_image(source: str | Path | bytes, use: Callable[[Image.Image], T], *, name: str | None = None,
               max_pixels: int = MAX_PIXELS, load: bool = True) -> T:
    """`use(image)` of the image in `source` (a path or the file's bytes), opened only after its
    header was read and its size checked against `max_pixels`, and (with `load`) decoded
    fully, which is what finds a truncated file. Any failure is an ImageError naming `name`
    (default: the path). `use` runs while the file is open and returns what outlives it."""
    name = _name_of(source, name)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise ImageError(name, "image not found", MISSING_IMAGE)
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice its own limit refuses) on large headers; our limit decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(name, f"{image.width}x{image.height} image exceeds the {max_pixels:,}-pixel limit (not decoded)", TOO_LARGE)
                if load:
                    image.load()
                return use(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"image exceeds PIL's pixel limit (not decoded): {e}", TOO_LARGE) from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image PIL can identify") from None
    except MemoryError:
        raise
    except Exception as e:  # decoders fail in many ways (OSError, SyntaxError, struct.error, ...)
        raise ImageError(name, f"cannot decode image ({type(e).__name__}: {e})") from None


def white_level(image: Image.Image, name: str = "image") -> float | None:
    """For a 16-bit integer ("I;16*", "I") or float ("F") image, the value that shows as white
    (65535 or 1), after checking that every value lies between 0 and it (an ImageError naming
    `name` if not: its brightness cannot be known); None for an image of 8-bit channels."""
    if image.mode == "F":
        top, kind = 1.0, "float"
    elif image.mode == "I" or image.mode.startswith("I;16"):
        top, kind = 65535.0, f"integer (mode {image.mode})"
    else:
        return None
    low, high = image.getextrema()
    if not (0 <= low and high <= top):  # (NaN fails both)
        raise ImageError(name, f"{kind} image with values from {low:g} to {high:g}: mmt reads such images on a scale of 0 to {top:g}")
    return top


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """The 8-bit RGB picture any PIL image shows (see the module docstring); an ImageError
    naming `name` for one whose brightness cannot be known or whose mode Pillow cannot convert."""
    top = white_level(image, name)
    if top is not None:  # one gray channel of more than 8 bits
        image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) * (255.0 / top)).astype(np.uint8))
    if image.mode == "La":  # (premultiplied gray + alpha: Pillow converts it to "LA" only)
        image = image.convert("LA")
    if "A" in image.getbands() or "a" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as e:  # a mode Pillow opens but cannot convert
        raise ImageError(name, f"cannot convert a {image.mode} image to RGB ({e})") from None


def open_image(source: Any, name: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image as a decoded RGB PIL image: `source` is a path, the file's bytes, a PIL image, or
    an (H, W, 3) uint8 array."""
    if isinstance(source, Image.Image):
        if source.width * source.height > max_pixels:
            raise ImageError(name or "image", f"{source.width}x{source.height} image exceeds the {max_pixels:,}-pixel limit", TOO_LARGE)
        return to_rgb(source, name or "image")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3:
            raise ImageError(name or "image", f"an array image must be (H, W, 3) uint8, got {source.shape} {source.dtype}")
        return Image.fromarray(source)
    if isinstance(source, (str, Path, bytes)):
        name = _name_of(source, name)
        return with_image(source, lambda image: to_rgb(image, name), name=name, max_pixels=max_pixels)
    raise ImageError(name or "image", f"cannot read an image from a {type(source).__name__}")


def center_square(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """The centre square of `image`, its side resized to `size`: the same picture as resizing the
    shorter side to `size` and cropping the centre, in one resampling step."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    if (width, height) == (size, size):
        return image
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), resample, box=(left, top, left + side, top + side))


def random_resized_crop(
    image: Image.Image, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3), resample: int = Image.Resampling.BICUBIC,
) -> Image.Image:
    """A random box of `scale` of the area and aspect ratio (width/height) in `ratio`, resized
    to size x size. After 10 draws that do not fit, the centre square."""
    width, height = image.size
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w, crop_h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if crop_w <= width and crop_h <= height:
            left = rng.uniform(0.0, width - crop_w)
            top = rng.uniform(0.0, height - crop_h)
            return image.resize((size, size), resample, box=(left, top, left + crop_w, top + crop_h))
    return center_square(image, size, resample)


def color_jitter(pixels: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """float (H, W, 3) in [0, 1] with brightness, contrast and saturation each scaled by a factor
    from [1 - strength, 1 + strength], in that order; clipped back to [0, 1]."""
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    pixels = pixels * np.float32(brightness)
    mean = np.float32((pixels @ _LUMA).mean())
    pixels = (pixels - mean) * np.float32(contrast) + mean
    gray = (pixels @ _LUMA)[..., None]
    pixels = (pixels - gray) * np.float32(saturation) + gray
    return np.clip(pixels, 0.0, 1.0, out=pixels)


def fit(image: Image.Image, size: int | Fit, augment: np.random.Generator | None = None) -> np.ndarray:
    """An RGB PIL image as the model's (size, size, 3) uint8 square (see the module docstring);
    with `augment`, the training augmentation drawn from that generator."""
    size, mode = _as_fit(size)
    if mode not in ("crop", "stretch"):
        raise ValueError(f"image fit {mode!r} is not one of crop, stretch")
    if augment is not None:
        pixels = np.asarray(random_resized_crop(image, size, augment), dtype=np.float32) / np.float32(255.0)
        return np.rint(color_jitter(pixels, augment) * 255.0).astype(np.uint8)
    if mode == "stretch":
        return np.array(image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return np.array(center_square(image, size), dtype=np.uint8)


def load_image(source: Any, size: int | Fit, name: str | None = None, augment: np.random.Generator | None = None) -> np.ndarray:
    """`source` (a path, the file's bytes, a PIL image, an array) as the model's (size, size, 3)
    uint8 square; `size` an int (cropped to fit) or a `Fit`."""
    return fit(open_image(source, name), size, augment)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """Model pixels float (N, 3, H, W) in [-1, 1] -> the uint8 (N, H, W, 3) pictures they show
    (the inverse of `to_pixels`, to draw what a model saw)."""
    return np.rint((pixels.detach().float().cpu().permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
