"""Your-own-data fixtures the tests write: shapes-world scenes saved as image files, and
JSON Lines captions pointing at them."""

import json
from pathlib import Path

from PIL import Image

from mmt.data.worlds import shapes


def shapes_images(folder: Path, n: int, seed: int) -> shapes.ShapesSplit:
    """n shapes-world scenes at 32x32, image i saved as folder/img/{i}.png."""
    split = shapes.ShapesSplit.generate(n, seed=seed, image_size=32)
    (folder / "img").mkdir(parents=True)
    for i, image in enumerate(split.images):
        Image.fromarray(image).save(folder / "img" / f"{i}.png")
    return split


def caption_lines(split: shapes.ShapesSplit) -> list[list[str]]:
    """Per image, JSON Lines {"image": "img/{i}.png", "text": ...} for its first 1-3 captions (1 + i % 3)."""
    return [[json.dumps({"image": f"img/{i}.png", "text": c}) for c in captions[: 1 + i % 3]] for i, captions in enumerate(split.captions)]
