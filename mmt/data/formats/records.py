"""What the real-data readers share: records, errors that name the file and record, counting of
skipped bad records, reading JSON, and checking images without trusting them.

Errors. Every problem with a data set is a `DataError` whose message names the file, the record
("annotations[5] (id 17)", "line 12") and, where one key is at fault, that key:

    captions_val2014.json: annotations[5] (id 17): missing key 'caption'

Each error also carries a `kind` (the constants below), so that with `skip_bad` a reader or the
checker can skip the record and count it by kind (`BadRecords`) instead of stopping at the first.
A problem with the file as a whole (missing, not JSON, no "annotations" list) always raises:
there is nothing to skip to.

Images are checked the way the image pipeline (`mmt.data.images`) will meet them
(`check_image`): the file must exist, its header must be readable, width x height must be
within `max_pixels` (checked from the header, before anything is decoded, so a decompression
bomb costs nothing), and with `load=True` the whole image is decoded, which is what finds a
truncated file. PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (its default) for that:
when it is True, PIL pads truncated images with grey instead of failing. Nothing here sets it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Union

from mmt.data.images import CORRUPT_IMAGE, MAX_PIXELS, MISSING_IMAGE, TOO_LARGE, ImageError, white_level, with_image

# Kinds of bad data, as `DataError.kind` and as the keys of `BadRecords.counts`.
MISSING_FILE = "missing_file"  # a data file (not an image) does not exist
INVALID_JSON = "invalid_json"  # a JSON file or JSON line that does not parse (or is not UTF-8)
NOT_AN_OBJECT = "not_an_object"  # a record that is not a JSON object
MISSING_FIELD = "missing_field"  # a record without a required key
INVALID_VALUE = "invalid_value"  # a key with a value of the wrong type, empty text, unknown split, ...
DUPLICATE_ID = "duplicate_id"  # a second image / question with an id already seen
UNKNOWN_IMAGE = "unknown_image"  # a COCO caption annotation whose image_id is not in "images"
UNKNOWN_QUESTION = "unknown_question"  # a VQA annotation whose question_id is not in the questions file
MISSING_ANNOTATION = "missing_annotation"  # a VQA question without an annotation (when annotations are given)
# MISSING_IMAGE, CORRUPT_IMAGE, TOO_LARGE (mmt.data.images): the image file does not exist; cannot be
# identified or decoded (truncated, damaged); is larger than the pixel limit (not decoded)

IMAGE_KINDS = (MISSING_IMAGE, CORRUPT_IMAGE, TOO_LARGE)



class DataError(ValueError):
    """A data file or one of its records cannot be used.

    The message is "<path>: <where>: <detail>"; `where` names the record (index or line),
    `key` the offending key when there is one, `kind` the category used when skipping.
    """

    def __init__(self, path: str | Path, where: str, detail: str, *, kind: str = INVALID_VALUE, key: str | None = None):
        self.path = str(path)
        self.where = where
        self.detail = detail
        self.kind = kind
        self.key = key
        super().__init__(f"{path}: {where}: {detail}" if where else f"{path}: {detail}")

    def __reduce__(self):  # keep the keyword-only fields when pickled (e.g. across processes)
        return (DataError, (self.path, self.where, self.detail), {"kind": self.kind, "key": self.key})


class BadRecords:
    """Counts of skipped bad records by kind, and the first few messages of each kind as examples."""

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, error: DataError) -> None:
        self.counts[error.kind] = self.counts.get(error.kind, 0) + 1
        shown = self.examples.setdefault(error.kind, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    def merge(self, other: "BadRecords") -> None:
        for kind, count in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
            shown = self.examples.setdefault(kind, [])
            shown.extend(other.examples.get(kind, [])[: max(0, self.max_examples - len(shown))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}


def handle(error: DataError, bad: BadRecords | None) -> None:
    """Raise `error` when not skipping (bad is None); otherwise count it in `bad` and return."""
    if bad is None:
        raise error
    bad.add(error)


# ----------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    """One image and its captions (COCO, Karpathy or JSONL); `source`/`where` name where it was read."""

    image_path: Path
    captions: list[str]
    image_id: int | str
    source: str = ""  # the file it was read from
    where: str = ""  # the record in that file: "images[3] (id 42)", "line 7"


@dataclasses.dataclass(frozen=True)
class VQARecord:
    """One question about one image, with its human answers (empty when unannotated, e.g. test splits)."""

    image_path: Path
    question: str
    question_id: int
    answers: list[str]
    answer_type: str = ""
    question_type: str = ""
    image_id: int | str | None = None
    multiple_choice_answer: str | None = None  # the official consensus answer (VQA v2), or the most frequent
    source: str = ""
    where: str = ""


DataRecord = Union[CaptionRecord, VQARecord]


# ----------------------------------------------------------------------------- JSON helpers


def read_json(path: str | Path, what: str = "JSON") -> Any:
    """The parsed JSON file; a missing file, bad UTF-8 or invalid JSON raises DataError naming the file
    (and line/column for invalid JSON). `what` says in the message which file was expected."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "", f"no such file ({what})", kind=MISSING_FILE)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, "", f"not UTF-8 text ({what}): {e}", kind=INVALID_JSON) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}, column {e.colno}", f"invalid JSON ({what}): {e.msg}", kind=INVALID_JSON) from None


def record_list(path: Path, data: Any, key: str, example: str) -> list:
    """data[key], checked to be a list; errors name the file and show the expected layout."""
    if not isinstance(data, dict) or key not in data:
        raise DataError(path, "", f"missing key {key!r} (expected {{\"{key}\": [{example}, ...], ...}})", kind=MISSING_FIELD, key=key)
    if not isinstance(data[key], list):
        raise DataError(path, "", f"{key!r} must be a list of {example} records, got {type(data[key]).__name__}", kind=INVALID_VALUE, key=key)
    return data[key]


def require(path: Path, where: str, record: Any, keys: Iterable[str]) -> dict:
    """The record, checked to be an object holding every key of `keys`."""
    keys = tuple(keys)
    if not isinstance(record, dict):
        raise DataError(path, where, f"expected an object with {', '.join(map(repr, keys))}, got {type(record).__name__}", kind=NOT_AN_OBJECT)
    for key in keys:
        if key not in record:
            raise DataError(path, where, f"missing key {key!r}", kind=MISSING_FIELD, key=key)
    return record


def text_field(path: Path, where: str, value: Any, key: str) -> str:
    """`value` checked to be a non-blank string (the text of `key`)."""
    if not isinstance(value, str):
        raise DataError(path, where, f"{key!r} must be a string, got {type(value).__name__}", key=key)
    if not value.strip():
        raise DataError(path, where, f"{key!r} is empty", key=key)
    return value


def is_id(value: Any) -> bool:
    """An integer id (bool excluded: JSON true is no id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def id_field(path: Path, where: str, value: Any, key: str, allow_str: bool = False) -> int | str:
    if is_id(value) or (allow_str and isinstance(value, str) and value):
        return value
    wanted = "an integer or a string" if allow_str else "an integer"
    raise DataError(path, where, f"{key!r} must be {wanted}, got {value!r:.40}", key=key)


# ----------------------------------------------------------------------------------- images


def check_image(path: str | Path, *, max_pixels: int = MAX_PIXELS, load: bool = True) -> tuple[int, int]:
    """(width, height) of the image at `path`, after checking it can be used.

    Raises DataError (path = the image) of kind missing_image, too_large (width x height above
    `max_pixels`, read from the header: the pixels are never decoded) or corrupt_image (not an
    image, or with load=True, any failure to decode all of it, e.g. a truncated file, or values
    whose brightness cannot be known: `mmt.data.images.white_level`).
    """

    def size(image):
        if load:
            white_level(image, str(path))
        return image.size

    try:
        return with_image(Path(path), size, max_pixels=max_pixels, load=load)
    except ImageError as e:
        raise DataError(path, "", e.detail, kind=e.kind) from None
