"""Preprocessing for real photos (PIL, numpy, torch; no torchvision): RGB, resize + centre crop,
light training augmentation, normalisation, as one callable `PhotoTransform`.

Evaluation: the shorter side is resized to `size` and the centre `size` x `size` square kept
(bicubic, with PIL's antialiasing when shrinking), so nothing is stretched.

Training (train=True) adds, drawn from a numpy Generator the caller passes (so a batch is a
pure function of its seed, as the trainer wants):
- a random resized crop: a box of `scale` (default 0.5-1) of the image's area with aspect
  ratio in `ratio` (default 3/4-4/3, drawn log-uniformly), resized to the square. The lower
  bound is milder than classification's usual 0.08: a caption or question usually speaks of
  most of the picture, and a small crop would cut out what it names;
- horizontal flips, off by default (hflip=0): captions and questions say "left" and "right",
  and a flipped image makes them false. Turn it on only for text without directions;
- a small colour jitter: brightness, contrast and saturation each scaled by a factor drawn
  from [1 - jitter, 1 + jitter] (default 0.1). Hue is left alone: colour words ("a red car")
  must stay true.

Normalisation: (pixel / 255 - mean) / std per channel. The default mean/std are the ImageNet
statistics (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225), what most pretrained vision
towers (ViT, ResNet) expect; CLIP's towers use their own (CLIP_MEAN/CLIP_STD). mean = std = 0.5
gives [-1, 1], the range of the built-in worlds' `transforms.to_pixels`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmt.data.records import read_image
from mmt.data.transforms import MAX_PIXELS

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L" conversion
_CROP_TRIES = 10


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image; transparent images are composited on white (as `load_image` does)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_photo(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path` as a decoded RGB PIL image; DataError (naming the file) when it is
    missing, over `max_pixels` (not decoded) or corrupt/truncated."""
    return read_image(path, to_rgb, max_pixels=max_pixels)


def resize_shorter_side_and_center_crop(image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC) -> Image.Image:
    """The centre square of `image`, its side resized to `size`: the same picture as resizing the
    shorter side to `size` and cropping the centre, done in one resampling step."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((size, size), resample, box=(left, top, left + side, top + side))


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    resample: int = Image.Resampling.BICUBIC,
) -> Image.Image:
    """A random box of `scale` of the area and aspect ratio (width/height) in `ratio`, resized
    to size x size. After 10 draws that do not fit, the centre crop."""
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
    return resize_shorter_side_and_center_crop(image, size, resample)


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


def normalize(pixels: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """float (3, H, W) in [0, 1] -> (pixels - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


@dataclasses.dataclass
class PhotoTransform:
    """PIL image -> float tensor (3, size, size), normalised; see the module docstring.

    Evaluation (train=False) is deterministic. Training needs `rng`, a numpy Generator, on every
    call: the same generator state gives the same output, and no hidden global state is used
    (a transform copied into several workers would otherwise repeat its augmentations).
    """

    size: int = 224
    train: bool = False
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: fraction of the area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: width / height
    hflip: float = 0.0  # probability of a horizontal flip; 0 because texts say left/right
    jitter: float = 0.1  # colour jitter strength (0 = none)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip is a probability, got {self.hflip}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        if not self.train:
            image = resize_shorter_side_and_center_crop(image, self.size)
            pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        else:
            if rng is None:
                raise ValueError("PhotoTransform(train=True) needs rng, a numpy Generator (e.g. np.random.default_rng([seed, step, index]))")
            image = random_resized_crop(image, self.size, rng, self.scale, self.ratio)
            if self.hflip > 0 and rng.random() < self.hflip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
            if self.jitter > 0:
                pixels = color_jitter(pixels, rng, self.jitter)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
        return normalize(tensor, self.mean, self.std)
