"""JSON Lines for custom data: one JSON object per line, two kinds.

Captions / retrieval pairs:

    {"image": "photos/0001.jpg", "text": "a red bicycle against a wall"}
    {"image": "photos/0001.jpg", "text": ["a bicycle", "a parked red bike"]}   (several at once)

VQA:

    {"image": "photos/0001.jpg", "question": "what colour is the bike?", "answer": "red"}
    {"image": "photos/0002.jpg", "question": "how many?", "answer": ["2", "2", "two", "3"], "question_id": 7}

"answer" is one string or the list of human answers (for soft scores, as in VQA v2);
"question_id" (an integer, unique in the file) is optional and defaults to the line number. "answer_type" and
"question_type" strings are read when present. Any other key is ignored.

The kind is `kind=` ("captions" or "vqa"), or else the first object line decides: with a
"question" key it is "vqa", otherwise "captions". Blank lines are skipped. Relative image paths
are resolved against the folder of the JSONL file. Caption lines are grouped per image (by the
resolved path), so one record holds all the texts of an image, in file order, and an image that
appears on several lines is one image (e.g. not its own negative in retrieval); its `image_id`
is the path as written on its first line and `where` lists its lines.

A line that is not JSON (or not UTF-8), not an object, or lacks a key raises DataError naming
"file: line N" and the key; with a `BadRecords` as `bad` the line is skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal

from mmt.data.formats.records import (
    DUPLICATE_ID,
    INVALID_JSON,
    MISSING_FILE,
    NOT_AN_OBJECT,
    BadRecords,
    CaptionRecord,
    DataError,
    DataRecord,
    VQARecord,
    handle,
    id_field,
    require,
    text_field,
)
from mmt.data.formats.vqa_v2 import most_frequent

__all__ = ["JSONL_KINDS", "iter_lines", "load_jsonl", "read_lines"]

JSONL_KINDS = ("captions", "vqa")


def iter_lines(path: str | Path) -> Iterator[tuple[int, dict | DataError | None]]:
    """(line number, value) for every line of a JSON Lines file: the object, a DataError saying
    why the line is not one (not UTF-8, not JSON, not an object), or None for a blank line.
    Lines end at "\\n" only (JSON strings may hold other line separators); a byte-order mark
    before the first line is allowed. The one reader of JSON Lines in mmt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "", "no such file (JSON Lines)", kind=MISSING_FILE)
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):  # (a binary file splits at newlines alone)
            where = f"line {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield number, DataError(path, where, f"not UTF-8 text ({e})", kind=INVALID_JSON)
                continue
            if not line.strip():
                yield number, None
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield number, DataError(path, where, f"invalid JSON at column {e.pos + 1}: {e.msg}", kind=INVALID_JSON)
                continue
            if not isinstance(value, dict):
                yield number, DataError(path, where, f"expected a JSON object, got {type(value).__name__}", kind=NOT_AN_OBJECT)
                continue
            yield number, value


def read_lines(path: str | Path, bad: BadRecords | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; bad lines raise or are counted in `bad`."""
    objects: list[tuple[int, dict]] = []
    for number, value in iter_lines(path):
        if isinstance(value, DataError):
            handle(value, bad)
        elif value is not None:
            objects.append((number, value))
    return objects


def _image(path: Path, where: str, value: Any) -> tuple[str, Path]:
    """(the path as written, the path resolved against the JSONL's folder)."""
    written = text_field(path, where, value, "image")
    image = Path(written).expanduser()
    return written, image if image.is_absolute() else path.parent / image


def _texts(path: Path, where: str, value: Any, key: str) -> list[str]:
    """A string or a non-empty list of strings, as a list."""
    if isinstance(value, list):
        if not value:
            raise DataError(path, where, f"{key!r} is an empty list", key=key)
        return [text_field(path, where, item, f"{key}[{n}]") for n, item in enumerate(value)]
    return [text_field(path, where, value, key)]


def _detect(objects: list[tuple[int, dict]]) -> str:
    for _, value in objects:
        return "vqa" if "question" in value else "captions"
    return "captions"


def load_jsonl(
    path: str | Path,
    kind: Literal["captions", "vqa"] | None = None,
    *,
    bad: BadRecords | None = None,
) -> list[DataRecord]:
    """CaptionRecords (grouped per image) or VQARecords (one per line) of a JSONL file, in file order."""
    path = Path(path)
    if kind is not None and kind not in JSONL_KINDS:
        raise ValueError(f"unknown JSONL kind {kind!r} (known: {', '.join(JSONL_KINDS)})")
    objects = read_lines(path, bad)
    kind = kind or _detect(objects)
    if kind == "vqa":
        return _vqa(path, objects, bad)
    return _captions(path, objects, bad)


def _captions(path: Path, objects: list[tuple[int, dict]], bad: BadRecords | None) -> list[DataRecord]:
    groups: dict[Path, tuple[str, list[int], list[str]]] = {}  # image -> (id, line numbers, texts)
    for number, value in objects:
        where = f"line {number}"
        try:
            require(path, where, value, ("image", "text"))
            written, image = _image(path, where, value["image"])
            texts = _texts(path, where, value["text"], "text")
        except DataError as e:
            handle(e, bad)
            continue
        image_id, lines, captions = groups.setdefault(image, (written, [], []))
        lines.append(number)
        captions.extend(texts)
    records: list[DataRecord] = []
    for image, (image_id, lines, captions) in groups.items():
        where = f"line {lines[0]}" if len(lines) == 1 else f"lines {', '.join(map(str, lines))}"
        records.append(CaptionRecord(image_path=image, captions=captions, image_id=image_id, source=str(path), where=where))
    return records


def _vqa(path: Path, objects: list[tuple[int, dict]], bad: BadRecords | None) -> list[DataRecord]:
    records: list[DataRecord] = []
    seen: dict[int, str] = {}  # question id -> the line that had it first
    for number, value in objects:
        where = f"line {number}"
        try:
            require(path, where, value, ("image", "question", "answer"))
            written, image = _image(path, where, value["image"])
            question = text_field(path, where, value["question"], "question")
            answer = value["answer"]
            if isinstance(answer, list):
                if not answer:
                    raise DataError(path, where, "'answer' is an empty list", key="answer")
                for n, item in enumerate(answer):
                    if not isinstance(item, str):
                        raise DataError(path, where, f"'answer[{n}]' must be a string, got {type(item).__name__}", key=f"answer[{n}]")
                answers = list(answer)
            elif isinstance(answer, str):
                answers = [answer]
            else:
                raise DataError(path, where, f"'answer' must be a string or a list of strings, got {type(answer).__name__}", key="answer")
            question_id = id_field(path, where, value["question_id"], "question_id") if "question_id" in value else number
            if question_id in seen:
                raise DataError(path, where, f"duplicate question_id {question_id} (first at {seen[question_id]})", kind=DUPLICATE_ID, key="question_id")
            types = {}
            for key in ("answer_type", "question_type"):
                if key in value:
                    types[key] = text_field(path, where, value[key], key)
        except DataError as e:
            handle(e, bad)
            continue
        seen[question_id] = where
        records.append(
            VQARecord(
                image_path=image,
                question=question,
                question_id=question_id,
                answers=answers,
                image_id=written,
                multiple_choice_answer=most_frequent(answers),
                source=str(path),
                where=where,
                **types,
            )
        )
    return records
