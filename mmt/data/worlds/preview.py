"""Contact sheets of the built-in worlds, so a person can check scenes, captions and answers by eye."""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from mmt.data.worlds import shapes, sort_of_clevr

LINE = 13  # pixels per line of PIL's default font


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


def preview_shapes(
    out: str | Path, num_scenes: int = 6, seed: int = 0, scale: int = 4, questions_per_scene: int = 10
) -> Path:
    """Draw `num_scenes` scenes (upscaled `scale`x, nearest neighbour) beside their 5 captions
    and their first `questions_per_scene` questions with answers; write a PNG to `out`."""
    data = shapes.ShapesSplit.generate(num_scenes, seed)
    side, text_width, chars = data.images.shape[1] * scale, 720, 115
    rows = []
    for i in range(num_scenes):
        lines = [f"scene {i}: {len(data.scenes[i].objects)} objects"]
        lines += [line for k, c in enumerate(data.captions[i]) for line in textwrap.wrap(f"c{k}: {c}", chars)]
        lines.append("")
        lines += [f"[{qa.qtype}] {qa.question} -> {qa.answer}" for qa in data.qa[i][:questions_per_scene]]
        rows.append(lines)
    heights = [max(side, len(lines) * LINE) + 12 for lines in rows]
    sheet = Image.new("RGB", (side + text_width, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for image, lines, height in zip(data.images, rows, heights):
        sheet.paste(Image.fromarray(image).resize((side, side), Image.NEAREST), (0, top))
        draw.rectangle([0, top, side - 1, top + side - 1], outline="black")
        for k, line in enumerate(lines):
            draw.text((side + 8, top + 2 + k * LINE), line, fill="black")
        draw.line([0, top + height - 5, sheet.width, top + height - 5], fill=(200, 200, 200))
        top += height
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
