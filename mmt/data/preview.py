"""Contact sheets of built-in data, so a person can check scenes and answers by eye."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from mmt.data import sort_of_clevr


def preview_sort_of_clevr(out: str | Path, num_scenes: int = 6, seed: int = 0, questions_per_scene: int = 6) -> Path:
    """Draw `num_scenes` scenes (upscaled 3x) beside some of their questions and answers."""
    data = sort_of_clevr.SortOfClevr.generate(num_scenes, seed)
    scale, text_width, row_height = 3, 470, 75 * 3 + 10
    sheet = Image.new("RGB", (75 * scale + text_width, row_height * num_scenes), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(num_scenes):
        scene = Image.fromarray(data.images[i]).resize((75 * scale, 75 * scale), Image.NEAREST)
        top = i * row_height
        sheet.paste(scene, (0, top))
        draw.rectangle([0, top, 75 * scale - 1, top + 75 * scale - 1], outline="black")
        qs = [q for q in data.questions if q.image_index == i]
        picked = qs[: questions_per_scene // 2] + qs[10 : 10 + questions_per_scene - questions_per_scene // 2]
        y = top + 4
        for q in picked:
            for line in textwrap.wrap(f"{q.text} -> {q.answer}", 70):
                draw.text((75 * scale + 8, y), line, fill="black")
                y += 13
            y += 4
        draw.line([0, top + row_height - 5, sheet.width, top + row_height - 5], fill=(200, 200, 200))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
