"""Read a shapes-world image back into its objects: the scene parser that judges generated images.

Every pixel constant is given for 64x64 and scales with image_size / 64, as in shapes.py.

1. Pixels. Each pixel is compared with the segment from white to each of the 8 COLOURS, i.e. with
   every mixture a * colour + (1 - a) * white, 0 <= a <= 1: its colour is the one whose segment
   passes nearest, and a (its "ink") is read off that nearest point. A pixel is ink of that colour
   when a >= 0.5; a pixel farther than NOISE_DISTANCE from every segment (black, say) is noise
   and never ink. Mixtures with white are what blurred and anti-aliased edges are made of, so a
   pale red fringe stays red (the nearest plain colour of (237, 137, 137) would be gray), and the
   0.5 cut keeps blurred edges where an unblurred render had them.
2. Components. Ink pixels are grouped into 8-connected components, whatever their colours, so
   fragments that touch only diagonally stay together. A component smaller than MIN_AREA = 20 px
   is dropped as stray pixels: the smallest object, a small triangle, covers about 60 px, and a
   third of that is well above what a blur or a decoder's speckle leaves behind. A component's
   colour is the colour most of its ink pixels have, so a few off-colour pixels inside an object
   do not split it. Only when two or more colours each hold at least SPLIT_AREA = 40 px of the
   component, and every one of them alone fits a template (step 3) better than the whole
   component does, is it read as objects of different colours touching (which a valid scene
   never has, a generated image may): each such colour becomes an object of its own pixels.
3. Shape, size and centre. The centre is the centre of the component's bounding box. The shape
   and size are those of the template, drawn by shapes.render at that centre, that overlaps the
   component best (intersection over union, over the 4 shapes x 2 sizes). Templates stand in for
   hand-set geometry rules (fill ratio, empty corners, a narrow top row): they use the drawing
   code itself, so they cannot drift from it, and they degrade gracefully on blurred shapes.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator

import numpy as np

from mmt.data.worlds.shapes import COLOURS, IMAGE_SIZE, SHAPES, SIZES, Obj, Scene, render

MIN_AREA = 20.0  # px at 64x64: smaller components are stray pixels (a small triangle is ~60 px)
SPLIT_AREA = 40.0  # px at 64x64: a second colour this large in one component is an object of its own
NOISE_DISTANCE = 80.0  # RGB distance from every white-to-colour segment beyond which a pixel is noise
INK = 0.5  # least share of colour (vs white) for a pixel to be ink

_PALETTE = np.array(list(COLOURS.values()), np.float32)  # (C, 3)
_WHITE = np.float32(255.0)


@dataclasses.dataclass
class Parse:
    """What `parse_result` found: the objects, how well each fits its template, and what was left."""

    objects: list[Obj]
    fits: list[float]  # per object, the intersection over union with its best template
    stray: int  # ink pixels in no object: dropped small components and minor colours
    noise: int  # pixels far from every colour and from white


def classify(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: colour index into COLOURS (H, W) int, ink share a in [0, 1] (H, W), and the
    distance to the nearest white-to-colour segment (H, W)."""
    pixels = image.astype(np.float32)[:, :, None, :]  # (H, W, 1, 3)
    direction = _PALETTE - _WHITE  # (C, 3), from white towards each colour
    share = ((pixels - _WHITE) * direction).sum(-1) / (direction**2).sum(-1)  # (H, W, C)
    share = share.clip(0.0, 1.0)
    nearest = _WHITE + share[..., None] * direction  # (H, W, C, 3)
    distance = np.sqrt(((pixels - nearest) ** 2).sum(-1))  # (H, W, C)
    colour = distance.argmin(-1)  # (H, W)
    pick = colour[..., None]
    return colour, np.take_along_axis(share, pick, -1)[..., 0], np.take_along_axis(distance, pick, -1)[..., 0]


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean (H, W) mask: (H, W) int labels, -1 off the mask, each
    component labelled by the smallest flat index of its pixels. Min-label propagation with
    pointer jumping (label = label[label]), so it converges in a few numpy passes."""
    H, W = mask.shape
    outside = H * W  # the label of everything off the mask; also the sentinel index
    labels = np.where(mask, np.arange(H * W).reshape(H, W), outside)
    while True:
        padded = np.pad(labels, 1, constant_values=outside)  # (H + 2, W + 2)
        neighbourhood = np.stack([padded[dy : dy + H, dx : dx + W] for dy in range(3) for dx in range(3)])
        lowest = np.where(mask, neighbourhood.min(0), outside)  # (H, W)
        flat = np.append(lowest.ravel(), outside)  # a label is a pixel index of the same component
        for _ in range(4):
            flat = flat[flat]
        new = flat[:-1].reshape(H, W)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def _template_fit(pixels: np.ndarray, x: float, y: float, image_size: int) -> tuple[float, str, str]:
    """(IoU, shape, size) of the template that best matches the (H, W) boolean mask `pixels`."""
    best = (-1.0, SHAPES[0], SIZES[0])
    for shape, size in itertools.product(SHAPES, SIZES):
        drawn = render(Scene([Obj(shape, "red", size, x, y)], image_size))[:, :, 1] != 255
        union = np.count_nonzero(drawn | pixels)
        iou = np.count_nonzero(drawn & pixels) / union if union else 0.0
        best = max(best, (iou, shape, size), key=lambda fit: fit[0])
    return best


def _object(pixels: np.ndarray, colour: str, image_size: int) -> tuple[Obj, float]:
    rows, cols = np.nonzero(pixels)
    x, y = (cols.min() + cols.max()) / 2, (rows.min() + rows.max()) / 2
    iou, shape, size = _template_fit(pixels, x, y, image_size)
    return Obj(shape, colour, size, float(x), float(y)), iou


def parse_result(image: np.ndarray) -> Parse:
    """Parse an (H, W, 3) uint8 image (H == W) of the shapes world; see the module docstring."""
    H, W, _ = image.shape
    if H != W:
        raise ValueError(f"shapes images are square; got {H}x{W}")
    area = (H / IMAGE_SIZE) ** 2
    colour, share, distance = classify(image)
    noisy = distance > NOISE_DISTANCE
    ink = (share >= INK) & ~noisy
    labels = components(ink)
    names = list(COLOURS)
    found: list[tuple[Obj, float]] = []
    stray = 0
    for label in np.unique(labels[labels >= 0]):
        member = labels == label
        size = int(np.count_nonzero(member))
        if size < MIN_AREA * area:
            stray += size
            continue
        counts = np.bincount(colour[member], minlength=len(names))
        whole = _object(member, names[int(counts.argmax())], H)  # the majority's colour, every pixel
        major = [c for c in np.argsort(-counts, kind="stable") if counts[c] >= SPLIT_AREA * area]
        parts = [_object(member & (colour == c), names[c], H) for c in major] if len(major) > 1 else []
        if parts and min(iou for _, iou in parts) > whole[1]:  # two objects touching
            found.extend(parts)
            stray += size - int(counts[major].sum())
        else:  # one object; off-colour pixels (speckle, colour drift) are part of it
            found.append(whole)
    found.sort(key=lambda fit: (fit[0].x, fit[0].y))
    return Parse([o for o, _ in found], [iou for _, iou in found], stray, int(np.count_nonzero(noisy)))


def parse(image: np.ndarray) -> list[Obj]:
    """The objects in an (H, W, 3) uint8 shapes image, sorted by x, then y."""
    return parse_result(image).objects


def assignments(num_slots: int, items: list, fits: Callable[[int, object], bool]) -> Iterator[tuple[int, ...]]:
    """Every one-to-one assignment of `num_slots` slots to distinct indices into `items` where
    fits(slot, item) holds for each slot: yields (index for slot 0, index for slot 1, ...)."""

    def extend(chosen: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        slot = len(chosen)
        if slot == num_slots:
            yield chosen
            return
        for k, item in enumerate(items):
            if k not in chosen and fits(slot, item):
                yield from extend(chosen + (k,))

    return extend(())


def same_scene(parsed: list[Obj], scene: Scene, tolerance: float = 2.0) -> bool:
    """Whether `parsed` recovers `scene` exactly: as many objects, matched one-to-one with equal
    shape, colour and size and centres within `tolerance` px on each axis."""
    if len(parsed) != len(scene.objects):
        return False

    def fits(slot: int, o: Obj) -> bool:
        want = scene.objects[slot]
        return (
            (o.shape, o.colour, o.size) == (want.shape, want.colour, want.size)
            and abs(o.x - want.x) <= tolerance
            and abs(o.y - want.y) <= tolerance
        )

    return next(assignments(len(scene.objects), parsed, fits), None) is not None
