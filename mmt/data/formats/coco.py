"""COCO captions in the two layouts people have on disk, read into `CaptionRecord`s (one per image).

Official captions (`annotations/captions_train2014.json` and the like):

    {"images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 480, "width": 640}, ...],
     "annotations": [{"id": 7, "image_id": 42, "caption": "A dog on a couch."}, ...], ...}

Records follow the order of "images"; an image's captions follow the order of its annotations.
Images without any caption are left out (they are no training or evaluation data) unless
`keep_uncaptioned=True`. "height"/"width" are not needed: the image file is the truth.

Karpathy splits (`dataset_coco.json`, also dataset_flickr8k/30k.json):

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
                 "sentences": [{"raw": "A man riding a bike.", "tokens": ["a", "man", ...]}, ...],
                 "cocoid": 391895, "imgid": 0}, ...], "dataset": "coco"}

The image is image_root/filepath/filename (image_root/filename where there is no "filepath", as
in the Flickr files); the id is "cocoid", or "imgid" where there is no "cocoid". Splits are
train, val, test and restval; "restval" (the 30k val2014 images outside Karpathy's 5k val and 5k
test) is folded into train by default, as is customary (`restval_into_train`). Captions are the
"raw" sentences; `use_tokens=True` takes the lower-cased "tokens" joined by spaces instead.

File names ("file_name", "filepath", "filename") must be relative paths inside the image root
(no "..", not absolute): a data file cannot point the reader elsewhere on the disk.

Errors name the file, the record ("images[3] (id 42)", "annotations[5] (id 7)") and the key;
with a `BadRecords` as `bad`, bad records are skipped and counted there instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmt.data.formats.records import (
    DUPLICATE_ID,
    MISSING_FIELD,
    UNKNOWN_IMAGE,
    BadRecords,
    CaptionRecord,
    DataError,
    handle,
    id_field,
    is_id,
    read_json,
    record_list,
    require,
    text_field,
)

__all__ = ["CaptionRecord", "KARPATHY_SPLITS", "load_coco_captions", "load_karpathy"]

KARPATHY_SPLITS = ("train", "val", "test", "restval")

_IMAGE = '{"id", "file_name"}'
_ANNOTATION = '{"image_id", "caption"}'
_KARPATHY_IMAGE = '{"filepath", "filename", "split", "sentences", "cocoid"}'


def _is_key_id(value: Any) -> bool:
    """An id usable as a dict key: a non-empty string or an integer."""
    return is_id(value) or (isinstance(value, str) and bool(value))


def _image_path(path: Path, where: str, root: Path, name: Any, key: str) -> Path:
    """root/name, with `name` checked to be a relative path inside root."""
    name = text_field(path, where, name, key)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DataError(path, where, f"{key!r} must be a path relative to the image folder, got {name!r:.60}", key=key)
    return root / relative


def load_coco_captions(
    path: str | Path,
    image_root: str | Path,
    *,
    keep_uncaptioned: bool = False,
    bad: BadRecords | None = None,
    data: Any = None,
) -> list[CaptionRecord]:
    """One record per image of an official COCO captions file, images found in `image_root`.

    An annotation whose image_id is not among the images raises DataError (kind unknown_image)
    naming the annotation's index; so do missing keys, wrong types, empty captions and duplicate
    image ids. With `bad`, such records are skipped and counted there; the annotations of a
    skipped image are dropped with it (not counted twice). `data` is the parsed file, when the
    caller has it already.
    """
    path, root = Path(path), Path(image_root)
    if data is None:
        data = read_json(path, "COCO captions")
    images = record_list(path, data, "images", _IMAGE)
    annotations = record_list(path, data, "annotations", _ANNOTATION)

    files: dict[int | str, Path] = {}
    where_of: dict[int | str, str] = {}
    skipped_ids: set = set()
    for index, image in enumerate(images):
        where = f"images[{index}]"
        try:
            require(path, where, image, ("id",))
            image_id = id_field(path, where, image["id"], "id", allow_str=True)
            where = f"images[{index}] (id {image_id})"
            if image_id in files:
                raise DataError(path, where, f"duplicate image id {image_id!r} (first at {where_of[image_id]})", kind=DUPLICATE_ID, key="id")
            require(path, where, image, ("file_name",))
            files[image_id] = _image_path(path, where, root, image["file_name"], "file_name")
            where_of[image_id] = where
        except DataError as e:
            if isinstance(image, dict) and _is_key_id(image.get("id")) and e.kind != DUPLICATE_ID:
                skipped_ids.add(image["id"])
            handle(e, bad)

    captions: dict[int | str, list[str]] = {image_id: [] for image_id in files}
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        try:
            if isinstance(annotation, dict) and _is_key_id(annotation.get("id")):
                where = f"annotations[{index}] (id {annotation['id']})"
            require(path, where, annotation, ("image_id", "caption"))
            image_id = id_field(path, where, annotation["image_id"], "image_id", allow_str=True)
            if image_id in skipped_ids:
                continue  # its image was bad and has been counted already
            if image_id not in files:
                raise DataError(path, where, f"image_id {image_id!r:.40} is not in 'images'", kind=UNKNOWN_IMAGE, key="image_id")
            captions[image_id].append(text_field(path, where, annotation["caption"], "caption"))
        except DataError as e:
            handle(e, bad)

    return [
        CaptionRecord(image_path=files[image_id], captions=texts, image_id=image_id, source=str(path), where=where_of[image_id])
        for image_id, texts in captions.items()
        if texts or keep_uncaptioned
    ]


def _karpathy_split(split: str | None, restval_into_train: bool) -> set[str] | None:
    if split is None:
        return None
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r} (known: {', '.join(KARPATHY_SPLITS)})")
    if split == "train" and restval_into_train:
        return {"train", "restval"}
    return {split}


def load_karpathy(
    path: str | Path,
    image_root: str | Path,
    split: str | None = "train",
    *,
    restval_into_train: bool = True,
    use_tokens: bool = False,
    bad: BadRecords | None = None,
    data: Any = None,
) -> list[CaptionRecord]:
    """The images of one Karpathy split (all splits when `split` is None), in file order.

    split="train" includes "restval" unless restval_into_train=False; split="restval" gives
    restval alone. Records of other splits are still validated, so a broken file is found
    whatever split is asked for.
    """
    path, root = Path(path), Path(image_root)
    wanted = _karpathy_split(split, restval_into_train)
    if data is None:
        data = read_json(path, "Karpathy splits")
    images = record_list(path, data, "images", _KARPATHY_IMAGE)
    records: list[CaptionRecord] = []
    first_where: dict[int | str, str] = {}
    for index, image in enumerate(images):
        where = f"images[{index}]"
        try:
            require(path, where, image, ())
            id_key = "cocoid" if "cocoid" in image else "imgid"
            if id_key not in image:
                raise DataError(path, where, "missing key 'cocoid' (or 'imgid')", kind=MISSING_FIELD, key="cocoid")
            image_id = id_field(path, where, image[id_key], id_key, allow_str=True)
            where = f"images[{index}] ({id_key} {image_id})"
            if image_id in first_where:
                raise DataError(path, where, f"duplicate {id_key} {image_id!r} (first at {first_where[image_id]})", kind=DUPLICATE_ID, key=id_key)
            require(path, where, image, ("filename", "split", "sentences"))
            image_split = image["split"]
            if image_split not in KARPATHY_SPLITS:
                raise DataError(path, where, f"'split' must be one of {', '.join(KARPATHY_SPLITS)}, got {image_split!r:.40}", key="split")
            folder = root
            if "filepath" in image:
                folder = _image_path(path, where, root, image["filepath"], "filepath")
            image_path = _image_path(path, where, folder, image["filename"], "filename")
            captions = _sentences(path, where, image["sentences"], use_tokens)
            first_where[image_id] = where
        except DataError as e:
            handle(e, bad)
            continue
        if wanted is None or image_split in wanted:
            records.append(CaptionRecord(image_path=image_path, captions=captions, image_id=image_id, source=str(path), where=where))
    return records


def _sentences(path: Path, where: str, sentences: Any, use_tokens: bool) -> list[str]:
    if not isinstance(sentences, list) or not sentences:
        raise DataError(path, where, "'sentences' must be a non-empty list of {\"raw\", \"tokens\"} objects", key="sentences")
    key = "tokens" if use_tokens else "raw"
    captions = []
    for n, sentence in enumerate(sentences):
        field = f"sentences[{n}].{key}"
        if not isinstance(sentence, dict) or key not in sentence:
            raise DataError(path, where, f"missing key {field!r}", kind=MISSING_FIELD, key=field)
        value = sentence[key]
        if use_tokens:
            if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
                raise DataError(path, where, f"{field!r} must be a non-empty list of strings", key=field)
            value = " ".join(value)
        captions.append(text_field(path, where, value, field))
    return captions
