"""Reading any supported data set, and checking one: `load_source` and `check_dataset`, which
`mmt data check SOURCE` runs. The readers (COCO, Karpathy, VQA v2, JSON Lines) each turn a file
into records (`mmt.data.formats.records`); this module picks the reader and checks the images."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import ImageFile

from mmt.data.formats import coco, jsonl, vqa_v2
from mmt.data.formats.records import (
    MAX_PIXELS,
    BadRecords,
    DataError,
    DataRecord,
    check_image,
    handle,
    read_json,
)
from mmt.data.progress import bar

FORMATS = ("coco", "karpathy", "vqa", "jsonl")  # what `load_source` reads (its `kind` argument)


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
    for record in bar(items, desc="check images" if load else "check image headers", unit="rec"):
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
