"""Batch prediction over a JSON Lines file: answer questions (VQA), caption images (captioning) or
classify images zero-shot among text labels (retrieval / pretraining), one output line per
input line.

Nothing is lost to one bad line: a line that is not a JSON object, a missing or unreadable
image, an empty question or a field of the wrong type gets `{"error": "line N: ..."}` in its
output line; every other line is answered, in input order. The output path is checked before
any work, and the output is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from mmt.api import Predictor, prompts
from mmt.data.formats.jsonl import iter_lines
from mmt.data.formats.records import DataError
from mmt.data.images import ImageError, load_image
from mmt.data.progress import bar
from mmt.errors import ConfigError
from mmt.files import atomic_write_text

BATCH = 64  # lines handled per forward pass
EMPTY = {"vqa": {"answer": None, "score": None}, "caption": {"caption": None, "score": None}, "retrieval": {"label": None, "score": None}}


@dataclasses.dataclass
class Summary:
    """What a batch prediction did: lines read, lines answered, and each failed line's message."""

    lines: int
    errors: list[str]

    @property
    def answered(self) -> int:
        return self.lines - len(self.errors)


def check_output(input_path: Path | None, output_path: Path) -> None:
    """Refuse an output that would replace the input or cannot be written, before any work."""
    if input_path is not None and output_path.resolve() == input_path.resolve():
        raise ConfigError(f"--out {output_path} is the input file; choose another file for the results")
    if output_path.is_dir():
        raise ConfigError(f"--out {output_path} is a folder; give a file name for the results")
    if not output_path.parent.is_dir():
        raise ConfigError(f"--out {output_path}: the folder {output_path.parent} does not exist")


def _field(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is empty")
    return value


def _parse(predictor: Predictor, record: dict, base: Path) -> tuple:
    """The inputs of one line: its image at the model's size (and the question, for VQA)."""
    image = load_image(base / _field(record, "image"), predictor.fit)
    if predictor.task == "vqa":
        return image, _field(record, "question")
    return (image,)


def _run(predictor: Predictor, items: list[tuple], labels: Sequence[str] | None, template: str, decoding: dict) -> list[dict]:
    images = [item[0] for item in items]
    if predictor.task == "vqa":
        return predictor.answer(images, [item[1] for item in items], **decoding)
    if predictor.task == "caption":
        return predictor.caption(images, **decoding)
    return predictor.classify(images, labels or [], template)


def predict_file(
    predictor: Predictor, input_path: str | Path, output_path: str | Path, labels: Sequence[str] | None = None,
    template: str = "{}", decoding: dict[str, Any] | None = None,
) -> Summary:
    """Answer every line of `input_path` into `output_path` (see the module docstring). Image paths
    are relative to the input file's folder; a line's other keys are copied to its output."""
    input_path, output_path = Path(input_path), Path(output_path)
    check_output(input_path, output_path)
    return _predict(predictor, iter_lines(input_path), "line", str(input_path), input_path.parent, output_path, labels, template, decoding)


def predict_images(
    predictor: Predictor, images: Sequence[str | Path], output_path: str | Path, question: str | None = None,
    labels: Sequence[str] | None = None, template: str = "{}", decoding: dict[str, Any] | None = None,
) -> Summary:
    """Answer each image of `images` (with `question`, for VQA) into `output_path`, one line per
    image in order, as `predict_file` answers lines: {"image": path, ...the result}, or
    {"error": "image N: ..."} for one that cannot be read."""
    output_path = Path(output_path)
    check_output(None, output_path)
    extra = {} if question is None else {"question": question}
    records = ((number, {"image": str(image), **extra}) for number, image in enumerate(images, 1))
    return _predict(predictor, records, "image", "images", Path("."), output_path, labels, template, decoding)


def _predict(
    predictor: Predictor, numbered, unit: str, source: str, base: Path, output_path: Path, labels: Sequence[str] | None,
    template: str, decoding: dict[str, Any] | None,
) -> Summary:
    """The one loop of batch prediction over (number, record | DataError | None) items."""
    decoding = decoding or {}
    predictor.decoding(decoding)  # options, labels and template are checked before any work
    if predictor.task == "retrieval":
        if not labels:
            raise ConfigError(f"{predictor.directory} is a retrieval model: give --labels \"a,b,c\" to classify images among them")
        labels = prompts(labels, template)
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    pending: list[tuple[int, dict, tuple]] = []  # (line number, record, inputs)

    def fail(number: int, record: dict, reason: str) -> None:
        errors.append(f"{source}:{number}: {reason}" if unit == "line" else f"{unit} {number}: {reason}")
        results[number - 1] = {**record, **EMPTY[predictor.task], "error": f"{unit} {number}: {reason}"}

    def flush() -> None:
        try:
            answered = _run(predictor, [inputs for _, _, inputs in pending], labels, template, decoding)
        except (ValueError, RuntimeError):  # a line the batch cannot take: answer each alone, so only it fails
            answered = []
            for number, record, inputs in pending:
                try:
                    answered += _run(predictor, [inputs], labels, template, decoding)
                except (ValueError, RuntimeError) as e:
                    fail(number, record, str(e))
                    answered.append(None)
        for (number, record, _), result in zip(pending, answered):
            if result is not None:
                results[number - 1] = {**record, **result}
        pending.clear()

    for number, value in bar(numbered, desc="predict", unit=unit):  # every line (image), numbered from 1
        results.append({})
        if value is None:
            fail(number, {}, "blank line")
            continue
        if isinstance(value, DataError):
            fail(number, {}, value.detail)
            continue
        try:
            pending.append((number, value, _parse(predictor, value, base)))
        except (ValueError, ImageError) as e:
            fail(number, value, str(e))
        if len(pending) == BATCH:
            flush()
    if pending:
        flush()
    atomic_write_text(output_path, "".join(json.dumps(r) + "\n" for r in results))
    return Summary(len(results), errors)
