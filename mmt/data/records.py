"""What the real-data readers share: records, errors that name the file and record, counting of
skipped bad records, reading JSON, checking images without trusting them, and `load_source` /
`check_dataset`, which `mmt data check SOURCE` runs.

Errors. Every problem with a data set is a `DataError` whose message names the file, the record
("annotations[5] (id 17)", "line 12") and, where one key is at fault, that key:

    captions_val2014.json: annotations[5] (id 17): missing key 'caption'

Each error also carries a `kind` (the constants below), so that with `skip_bad` a reader or the
checker can skip the record and count it by kind (`BadRecords`) instead of stopping at the first.
A problem with the file as a whole (missing, not JSON, no "annotations" list) always raises:
there is nothing to skip to.

Images are checked the way a loader will meet them (`check_image`): the file must exist, its
header must be readable, width x height must be within `max_pixels` (checked from the header,
before anything is decoded, so a decompression bomb costs nothing), and with `load=True` the
whole image is decoded, which is what finds a truncated file. PIL's
`ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (its default) for that: when it is True, PIL
pads truncated images with grey instead of failing. Nothing here sets it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar, Union

from PIL import Image, ImageFile, UnidentifiedImageError

from mmt.data.transforms import MAX_PIXELS

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
MISSING_IMAGE = "missing_image"  # the image file does not exist
CORRUPT_IMAGE = "corrupt_image"  # the image file cannot be identified or decoded (truncated, damaged)
TOO_LARGE = "too_large"  # width x height above the pixel limit (not decoded)

IMAGE_KINDS = (MISSING_IMAGE, CORRUPT_IMAGE, TOO_LARGE)

FORMATS = ("coco", "karpathy", "vqa", "jsonl")  # what `load_source` reads (its `kind` argument)

T = TypeVar("T")


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
    image, or with load=True, any failure to decode all of it, e.g. a truncated file).
    """
    return _open_checked(Path(path), max_pixels, load, lambda image: image.size)


def read_image(path: str | Path, use: Callable[[Image.Image], T], *, max_pixels: int = MAX_PIXELS) -> T:
    """`use(image)` of the fully decoded image at `path`, after the checks of `check_image`
    (same DataErrors); `use` runs while the file is open and must return what outlives it."""
    return _open_checked(Path(path), max_pixels, True, use)


def _open_checked(path: Path, max_pixels: int, load: bool, use: Callable[[Image.Image], T]) -> T:
    if not path.is_file():
        raise DataError(path, "", "image not found", kind=MISSING_IMAGE)
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice its own limit refuses) on large headers; our limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(path, "", f"{width}x{height} image exceeds the {max_pixels:,}-pixel limit (not decoded)", kind=TOO_LARGE)
                if load:
                    image.load()
                return use(image)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(path, "", f"image exceeds PIL's pixel limit (not decoded): {e}", kind=TOO_LARGE) from None
    except UnidentifiedImageError:
        raise DataError(path, "", "not an image PIL can identify", kind=CORRUPT_IMAGE) from None
    except MemoryError:
        raise
    except Exception as e:  # decoders fail in many ways (OSError, SyntaxError, struct.error, ...)
        raise DataError(path, "", f"cannot decode image ({type(e).__name__}: {e})", kind=CORRUPT_IMAGE) from None


# ---------------------------------------------------------------------------- load and check


@dataclasses.dataclass
class Source:
    """A data set read by `load_source`: its records in file order and the bad records skipped."""

    path: Path
    format: str  # one of FORMATS
    records: list[DataRecord]
    bad: BadRecords
    detail: str = ""  # e.g. which annotations file went with VQA questions


@dataclasses.dataclass
class DataReport:
    """What `check_dataset` found. `records` are the good records, in their original order."""

    source: str
    format: str
    num_records: int  # records considered: good + skipped (including those skipped while reading)
    num_images: int  # distinct image files checked
    records: list[DataRecord]
    bad: BadRecords

    @property
    def ok(self) -> bool:
        return self.bad.total == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "num_records": self.num_records,
            "num_good": len(self.records),
            "num_images": self.num_images,
            "bad": self.bad.as_dict(),
        }


def _record_error(record: DataRecord, error: DataError) -> DataError:
    """An image error restated for the record that uses the image (file, record, then the image's problem)."""
    detail = f"image {error.path}: {error.detail}"
    return DataError(record.source or error.path, record.where, detail, kind=error.kind, key=error.key)


def check_dataset(
    records: Source | Sequence[DataRecord],
    load: bool = True,
    skip_bad: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> DataReport:
    """Check every record's image (each distinct file once) and, for a `Source`, carry over what
    reading it skipped.

    load=True decodes every image fully (finds truncated files; slow on a large set); load=False
    checks existence, header and size only. Without skip_bad the first problem raises DataError
    naming the data file, the record and the image; with skip_bad every record whose image is bad
    is left out and counted by kind. The records passed in are never modified: the report holds
    the good ones, in order. Warns when something has set PIL's LOAD_TRUNCATED_IMAGES, which
    makes truncated images pass.
    """
    if load and ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set elsewhere): truncated images will pass the check",
            RuntimeWarning,
            stacklevel=2,
        )
    if isinstance(records, Source):
        source_name, fmt, items, bad = str(records.path), records.format, list(records.records), BadRecords()
        bad.merge(records.bad)
    else:
        items = list(records)
        source_name = items[0].source if items else ""
        fmt = "records"
        bad = BadRecords()
    skipped_while_reading = bad.total
    problems: dict[Path, DataError | None] = {}
    good: list[DataRecord] = []
    for record in items:
        image = Path(record.image_path)
        if image not in problems:
            try:
                check_image(image, max_pixels=max_pixels, load=load)
                problems[image] = None
            except DataError as e:
                problems[image] = e
        problem = problems[image]
        if problem is None:
            good.append(record)
        else:
            handle(_record_error(record, problem), bad if skip_bad else None)
    return DataReport(
        source=source_name,
        format=fmt,
        num_records=len(items) + skipped_while_reading,
        num_images=len(problems),
        records=good,
        bad=bad,
    )


def format_report(report: DataReport) -> str:
    """A short text summary of a `DataReport`: counts, then each kind of bad record with examples."""
    lines = [
        f"{report.source or '(records)'}: {report.format}, {report.num_records} record(s), {report.num_images} image(s) checked",
        f"  good: {len(report.records)}",
    ]
    if report.ok:
        lines.append("  no bad records")
    else:
        lines.append(f"  skipped: {report.bad.total}")
        for kind, count in sorted(report.bad.counts.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"    {kind}: {count}")
            lines += [f"      e.g. {example}" for example in report.bad.examples.get(kind, [])]
    return "\n".join(lines)


def detect_format(path: str | Path, data: Any = None) -> str:
    """Which of FORMATS the file at `path` is, by these rules, in order:

    1. a name ending in .jsonl or .ndjson -> "jsonl" (the file is not parsed here);
    2. otherwise the file must be one JSON object (passed as `data` when already parsed), and
       - it has a "questions" list -> "vqa" (VQA v2 questions);
       - it has an "annotations" list whose first entry has "question_id" -> "vqa" (VQA v2
         annotations; `load_source` then looks for the questions file beside it);
       - it has an "images" list whose first entry has "sentences" -> "karpathy";
       - it has "images" and "annotations" lists and no "categories" -> "coco" (captions; COCO
         instance/keypoint files have "categories" and are refused).
    Anything else raises DataError saying what was found.
    """
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    if data is None:
        data = read_json(path, "data set")
    if not isinstance(data, dict):
        raise DataError(path, "", f"cannot tell the format: top level is a {type(data).__name__}, not an object (JSON Lines files need a .jsonl name)")

    def first(key: str) -> Any:
        items = data.get(key)
        return items[0] if isinstance(items, list) and items else None

    if isinstance(data.get("questions"), list):
        return "vqa"
    if isinstance(data.get("annotations"), list) and isinstance(first("annotations"), dict) and "question_id" in first("annotations"):
        return "vqa"
    if isinstance(data.get("images"), list) and isinstance(first("images"), dict) and "sentences" in first("images"):
        return "karpathy"
    if isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        if "categories" in data:
            raise DataError(path, "", "a COCO file with 'categories' (instances or keypoints), not captions; pass a captions_*.json file", key="categories")
        return "coco"
    raise DataError(
        path,
        "",
        f"cannot tell the format from its keys {sorted(data)[:8]}: expected VQA v2 questions ('questions'), "
        "VQA v2 annotations ('annotations' with 'question_id'), Karpathy splits ('images' with 'sentences') "
        "or COCO captions ('images' and 'annotations')",
    )


def load_source(
    path: str | Path,
    image_root: str | Path | None = None,
    kind: str | None = None,
    *,
    skip_bad: bool = False,
    annotations: str | Path | None = None,
    split: str | None = None,
) -> Source:
    """Read any supported data set: COCO captions, Karpathy splits, VQA v2 or JSON Lines.

    `kind` (one of FORMATS) skips detection; otherwise `detect_format` decides. COCO, Karpathy
    and VQA v2 need `image_root` (the folder holding the images; for Karpathy the folder that
    holds its "filepath" folders); JSON Lines resolve relative image paths against the file's
    folder (`image_root` is not used). For VQA v2, `path` may be the questions or the
    annotations file; the other one is taken from `annotations` or else looked for beside it by
    the official names (v2_OpenEnded_mscoco_<subtype>_questions.json,
    v2_mscoco_<subtype>_annotations.json); questions without annotations are read unanswered.
    `split` selects a Karpathy split (default: all). With skip_bad, bad records are skipped and
    counted in `Source.bad`; otherwise the first raises DataError.
    """
    from mmt.data import coco, jsonl, vqa_v2

    path = Path(path)
    bad = BadRecords() if skip_bad else None
    data = None
    if kind is None:
        if path.suffix.lower() not in (".jsonl", ".ndjson"):
            data = read_json(path, "data set")
        kind = detect_format(path, data)
    if kind not in FORMATS:
        raise ValueError(f"unknown data format {kind!r} (known: {', '.join(FORMATS)})")
    if kind == "jsonl":
        records = jsonl.load_jsonl(path, bad=bad)
        return Source(path, kind, records, bad or BadRecords())
    if image_root is None:
        raise ValueError(f"{path}: a {kind} data set needs the folder of its images (image_root)")
    if kind == "coco":
        records = coco.load_coco_captions(path, image_root, bad=bad, data=data)
        return Source(path, kind, records, bad or BadRecords())
    if kind == "karpathy":
        records = coco.load_karpathy(path, image_root, split, bad=bad, data=data)
        return Source(path, kind, records, bad or BadRecords(), detail=f"split {split or 'all'}")
    questions, annotations = vqa_v2.find_pair(path, annotations, data)
    records = vqa_v2.load_vqa_v2(questions, image_root, annotations, bad=bad)
    detail = f"questions {questions}" + (f", annotations {annotations}" if annotations else ", no annotations")
    return Source(path, kind, records, bad or BadRecords(), detail=detail)
