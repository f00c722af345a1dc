"""Pack any data set `load_source` reads into webdataset tar shards, and read them back.

Layout written by `pack(source, out_dir)`:

    out_dir/shard-000000.tar   samples 0 .. shard_size-1 (fewer if max_shard_bytes is hit first)
    out_dir/shard-000001.tar   ...
    out_dir/index.json         {"format", "kind", "shards": [{"name", "count", "bytes"}], "num_samples",
                                "skipped": {"total", "counts", "examples"}, ...}

Each sample is two tar members sharing one key, `{index:08d}` where `index` is the record's
position in `Source.records` (so a skipped record leaves a gap in the keys):

    00000007.jpg    the original image file's bytes, unchanged, under its own extension
    00000007.json   the record's fields: "kind" ("caption" or "vqa"), "index", "image_member"
                    (the image's extension), "image_path" (the original path) and the rest of
                    CaptionRecord (captions, image_id, source, where) or VQARecord (question,
                    question_id, answers, answer_type, question_type, image_id,
                    multiple_choice_answer, source, where)

Every image is checked as a loader would meet it (`check_image`: exists, header readable,
within the pixel limit, fully decodable). A bad image raises DataError naming the data file,
the record and the image; with skip_bad it is left out and counted in index.json's "skipped"
(together with the records `load_source` itself skipped).

Atomicity: each shard is written to a temporary file in out_dir (".shard-000000.tar.XXXX.tmp")
and renamed over its final name (`atomic_write`), so an interrupted pack never leaves a half
shard under a shard name. index.json is written last, the same way, and is what readers use:
shards it does not list (e.g. stale ones from an earlier, larger pack) are deleted after it is
written.

Reading (`shard_dataset`): shards are split first across ranks, then across DataLoader workers,
both *strided*, which is what webdataset's `split_by_node` / `split_by_worker` do:

    rank r of world W (torch.distributed)     gets shards r, r+W, r+2W, ...   (= shards_for_rank)
    worker w of N (torch DataLoader workers)  gets every N-th of those, from its w-th

so with W ranks and N workers, each shard is read by exactly one (rank, worker) per epoch.
webdataset takes rank and world from the RANK and WORLD_SIZE environment variables when both are
set (torchrun sets them), else from an initialised torch.distributed; the worker from
`torch.utils.data.get_worker_info()` (or WORKER / NUM_WORKERS). Give
the data set at least W x N shards: a rank or worker without a shard yields nothing, and ranks
whose sample counts differ (shard counts not divisible by W, a short last shard) take different
numbers of steps, which distributed training must allow for (e.g. `.with_epoch(n)` or dropping
the remainder). With `split_by_node=False` every rank reads every shard (single process use,
evaluation on each rank).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from mmt.data.formats.records import CaptionRecord, DataError, DataRecord, check_image
from mmt.data.formats.source import load_source
from mmt.data.images import Fit, ImageError, load_image, to_rgb
from mmt.data.progress import bar
from mmt.extras import require
from mmt.files import atomic_write, atomic_write_text

__all__ = [
    "INDEX_NAME", "ShardStream", "is_shard_dir", "iter_packed", "pack", "read_index", "sample_image", "shard_dataset", "shard_name",
    "shards_for_rank",
]

INDEX_NAME = "index.json"
SHARD_PATTERN = re.compile(r"^shard-\d{6}\.tar$")
_TAR_OVERHEAD = 1024  # per member: a 512-byte header plus up to 511 bytes of padding (an estimate)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _image_ext(path: Path) -> str:
    """The extension the image file has (lower case, no dot); PIL's format name when it has none."""
    ext = path.suffix.lower().lstrip(".")
    if ext and ext not in ("json", "tmp"):
        return ext
    with Image.open(path) as image:
        return (image.format or "img").lower()


def _image_of(record: DataRecord, checked: dict[Path, DataError | None]) -> tuple[bytes, str]:
    """(the image file's bytes, its extension) of a record, checked as a loader would meet it
    (`checked` remembers each file's verdict: many VQA records share an image); DataError naming
    the data file, the record and the image when it cannot be used."""
    path = Path(record.image_path)
    if path not in checked:
        try:
            check_image(path)
            checked[path] = None
        except DataError as e:
            checked[path] = e
    error = checked[path]
    if error is None:
        try:
            return path.read_bytes(), _image_ext(path)
        except OSError as e:  # vanished or unreadable since the check
            error = DataError(path, "", f"cannot read image ({e})", kind="missing_image")
    raise DataError(record.source or error.path, record.where, f"image {error.path}: {error.detail}", kind=error.kind, key=error.key)


def _record_json(record: DataRecord, index: int, ext: str) -> dict[str, Any]:
    fields = dataclasses.asdict(record)
    fields["image_path"] = str(record.image_path)
    kind = "caption" if isinstance(record, CaptionRecord) else "vqa"
    return {"kind": kind, "index": index, "image_member": ext, **fields}


def _write_tar(tmp: str, samples: list[tuple[str, str, bytes, bytes]]) -> None:
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, image_bytes, meta in samples:
            for name, data in ((f"{key}.{ext}", image_bytes), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # same input, same bytes
                tar.addfile(info, io.BytesIO(data))


def pack(
    source_path: str | Path,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    kind: str | None = None,
    shard_size: int = 1000,
    skip_bad: bool = False,
    max_shard_bytes: int | None = None,
) -> dict[str, Any]:
    """Write the records of `source_path` (any format `load_source` reads) as tar shards in `out_dir`.

    A shard is closed after `shard_size` samples or, with `max_shard_bytes`, before a sample
    would take it past that many bytes (a single larger sample still gets a shard of its own).
    Returns the summary that is also written to out_dir/index.json.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = load_source(source_path, image_root, kind, skip_bad=skip_bad)
    bad = source.bad  # records load_source skipped; bad images are added to it
    skipped_reading = bad.total
    checked: dict[Path, DataError | None] = {}  # an image used by many records (VQA) is decoded once

    shards: list[dict[str, Any]] = []
    buffer: list[tuple[str, str, bytes, bytes]] = []
    buffer_bytes = 0

    def flush() -> None:
        nonlocal buffer, buffer_bytes
        if not buffer:
            return
        name = shard_name(len(shards))
        atomic_write(out_dir / name, lambda tmp: _write_tar(tmp, buffer))
        shards.append({"name": name, "count": len(buffer), "bytes": (out_dir / name).stat().st_size})
        buffer, buffer_bytes = [], 0

    for index, record in enumerate(bar(source.records, desc="pack", unit="rec")):
        try:
            image_bytes, ext = _image_of(record, checked)
        except DataError as error:
            if not skip_bad:
                raise
            bad.add(error)
            continue
        meta = json.dumps(_record_json(record, index, ext), ensure_ascii=False).encode("utf-8")
        size = len(image_bytes) + len(meta) + 2 * _TAR_OVERHEAD
        if max_shard_bytes is not None and buffer and buffer_bytes + size > max_shard_bytes:
            flush()
        buffer.append((f"{index:08d}", ext, image_bytes, meta))
        buffer_bytes += size
        if len(buffer) >= shard_size:
            flush()
    flush()

    summary = {
        "source": str(source_path),
        "format": source.format,
        "kind": None if not source.records else ("caption" if isinstance(source.records[0], CaptionRecord) else "vqa"),
        "num_records": len(source.records) + skipped_reading,  # good + bad, as read from the source
        "num_samples": sum(s["count"] for s in shards),
        "num_shards": len(shards),
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "shards": shards,
        "skipped": bad.as_dict(),
    }
    atomic_write_text(out_dir / INDEX_NAME, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    listed = {s["name"] for s in shards}
    for stale in out_dir.iterdir():
        if SHARD_PATTERN.match(stale.name) and stale.name not in listed:
            stale.unlink(missing_ok=True)
    return summary


def read_index(out_dir: str | Path) -> dict[str, Any]:
    """The index.json `pack` wrote in `out_dir`; DataError when missing or unreadable."""
    path = Path(out_dir) / INDEX_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "", "no shard index (run `mmt data pack` first)", kind="missing_file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(path, "", f"unreadable shard index ({e})", kind="invalid_json") from None


def shards_for_rank(shards: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The shards rank `rank` of `world` reads: strided (rank, rank+world, ...), as webdataset's
    `split_by_node` does. Deterministic; over all ranks a partition (no overlap, full coverage)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return list(shards)[rank::world]


def _decode(sample: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    meta = json.loads(sample["json"])
    data = sample.get(meta.get("image_member", ""))
    if data is None:  # fall back to whatever non-json member the sample has
        data = next(v for k, v in sample.items() if not k.startswith("__") and k != "json")
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # (the RGB image returned may be this one, read after the file closes)
        return to_rgb(image, f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}"), meta


def shard_dataset(out_dir: str | Path, shuffle: int = 0, seed: int = 0, split_by_node: bool = True):
    """A `webdataset.WebDataset` over the shards listed in out_dir/index.json, yielding
    (PIL RGB image, record dict) pairs.

    Shards are split strided across torch.distributed ranks (`webdataset.split_by_node`; skipped
    with split_by_node=False, so every rank reads everything) and then across DataLoader workers
    (`webdataset.split_by_worker`); see the module docstring. With `shuffle` > 0 the shard order
    (within each rank/worker) and the samples (through a buffer of `shuffle` samples) are
    shuffled deterministically from `seed`; with 0 samples come in shard order.
    """
    wds = require("webdataset", "writing and reading shards (mmt data pack)")

    out_dir = Path(out_dir)
    urls = [str(out_dir / s["name"]) for s in read_index(out_dir)["shards"]]
    dataset = wds.WebDataset(
        urls,
        shardshuffle=len(urls) if shuffle > 0 and urls else False,
        detshuffle=True,
        seed=seed,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker,
        empty_check=False,  # a rank or worker with no shard yields nothing instead of raising
    )
    if shuffle > 0:
        dataset = dataset.shuffle(shuffle, seed=seed)
    return dataset.map(_decode)


# ----------------------------------------------------------------------------- training streams


def is_shard_dir(path: str | Path) -> bool:
    """True when `path` is a folder `pack` wrote (it holds index.json)."""
    return bool(str(path)) and (Path(path) / INDEX_NAME).is_file()


def _listed_shards(out_dir: Path) -> list[tuple[str, int]]:
    """(path, sample count) of each shard index.json lists, in order."""
    index = read_index(out_dir)
    try:
        return [(str(out_dir / s["name"]), int(s["count"])) for s in index["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(out_dir / INDEX_NAME, "shards", f"malformed shard list ({e!r})") from None


def iter_packed(out_dir: str | Path, images: bool = True) -> Iterator[tuple[dict[str, Any], bytes | None]]:
    """(record dict, image bytes) of every packed sample in shard order; with images=False
    the image bytes are not read (None): what a trainer needs up front (e.g. every caption
    for the tokenizer) costs a pass over the tar headers only."""
    out_dir = Path(out_dir)
    for path, count in _listed_shards(out_dir):
        seen = 0
        try:
            with tarfile.open(path, "r:") as tar:
                pending: dict[str, tuple[dict[str, Any] | None, bytes | None]] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext != "json" and not images:
                        continue
                    data = tar.extractfile(member).read()
                    meta, image = pending.pop(key, (None, None))
                    if ext == "json":
                        meta = json.loads(data)
                    else:
                        image = data
                    if meta is not None and (image is not None or not images):
                        seen += 1
                        yield meta, image
                    else:
                        pending[key] = (meta, image)
        except FileNotFoundError:
            raise DataError(path, "", f"shard listed in {out_dir / INDEX_NAME} is missing", kind="missing_file") from None
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(path, "", f"unreadable shard ({e})", kind="invalid_json") from None
        if seen != count:
            raise DataError(path, "", f"holds {seen} complete samples, {INDEX_NAME} lists {count}; pack again")


def sample_image(sample: dict[str, Any], size: int | Fit, augment: np.random.Generator | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A webdataset sample of a packed shard -> ((size, size, 3) uint8 image, record dict);
    with `augment`, training augmentation drawn from it (`mmt.data.images`)."""
    meta = json.loads(sample["json"])
    name = f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')}.{meta.get('image_member', '?')}"
    data = sample.get(meta.get("image_member", ""))
    if data is None:
        raise DataError(sample.get("__url__", "?"), sample.get("__key__", "?"), "sample has no image member", kind="missing_image")
    try:
        return load_image(data, size, name, augment), meta
    except ImageError as e:
        raise DataError(sample.get("__url__", "?"), sample.get("__key__", "?"), str(e), kind="bad_image") from None


class _RankStream(torch.utils.data.IterableDataset):
    """The endless sample stream of one rank, read with webdataset by N stream workers.

    Stream worker w of N reads the rank's shards w, w+N, ... (strided, like
    `webdataset.split_by_worker`), pass after pass; each pass shuffles its shard order and
    its samples (a buffer of `shuffle`) from a seed of (seed, rank, w, pass). The rank's
    stream is the round-robin of its workers: sample j comes from worker j % N, which is the
    order a DataLoader returns them in. A stream restarted at position `skip` has DataLoader
    worker d play stream worker (skip + d) % N, each worker skips the samples it already
    gave (whole passes by arithmetic, the rest by reading without decoding), and the next
    sample is exactly sample `skip` of the uninterrupted stream.
    """

    def __init__(self, shards: list[tuple[str, int]], rank: int, workers: int, skip: int, shuffle: int, seed: int, size: int, augment: bool):
        super().__init__()
        self.shards, self.rank, self.workers, self.skip = shards, rank, workers, skip
        self.shuffle, self.seed, self.size, self.augment = shuffle, seed, size, augment

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
        import random

        wds = require("webdataset", "streaming from shards")

        info = torch.utils.data.get_worker_info()
        loader_worker = info.id if info is not None else 0
        N = self.workers
        w = (self.skip + loader_worker) % N
        mine = self.shards[w::N]
        length = sum(count for _, count in mine)
        given = -(-(self.skip - w) // N) if self.skip > w else 0  # samples j < skip with j % N == w
        epoch, skip = divmod(given, length)
        while True:
            rng = random.Random(f"{self.seed}/{self.rank}/{w}/{epoch}")
            urls = [url for url, _ in mine]
            rng.shuffle(urls)
            stages: list[Any] = [wds.SimpleShardList(urls), wds.tarfile_to_samples()]
            if self.shuffle > 0:
                stages.append(wds.shuffle(self.shuffle, initial=self.shuffle, rng=rng))
            seen = 0
            try:
                for sample in wds.DataPipeline(*stages):
                    seen += 1
                    if seen > skip:  # augmentation drawn from the sample's place in the stream: resumes repeat it
                        augment = np.random.default_rng([self.seed, self.rank, w, epoch, seen]) if self.augment else None
                        yield sample_image(sample, self.size, augment)
            except DataError as e:  # handed to the training process as a value: it raises it there, intact
                yield _Failure(e)
                return
            except (tarfile.TarError, OSError, ValueError) as e:
                # webdataset appends the shard's URL to the exception's arguments
                args = getattr(e, "args", ())
                named = len(args) > 1 and isinstance(args[-1], str) and args[-1].endswith(".tar")
                path, detail = (args[-1], args[0]) if named else (Path(mine[0][0]).parent, e)
                yield _Failure(DataError(path, "", f"unreadable shard ({detail}); pack again"))
                return
            if seen != length:
                where = Path(mine[0][0]).parent / INDEX_NAME
                yield _Failure(DataError(where, "shards", f"{len(mine)} shard(s) hold {seen} samples, the index lists {length}; pack again"))
                return
            epoch, skip = epoch + 1, 0


class _Failure:
    """A DataError met in a DataLoader worker (which can only pass values back)."""

    def __init__(self, error: DataError):
        self.error = error


class ShardStream:
    """Training samples from webdataset shards for one process: an endless, shuffled,
    resumable stream of (uint8 image at `size`, record dict).

    Rank `rank` of `world` reads shards rank, rank+world, ... (`shards_for_rank`, as
    `webdataset.split_by_node` splits them), and `workers` DataLoader processes decode them in
    parallel (0: in this process). With `augment`, each image gets the light training
    augmentation (`mmt.data.images`), drawn from its place in the stream.
    `take(position, n)` returns samples position .. position+n-1 of this rank's stream, a
    pure function of (shards, rank, world, workers, shuffle, seed, augment): a resumed run
    asks for the position its step implies and gets the samples the uninterrupted run saw.
    A shard that cannot be read raises DataError naming it, from whichever worker met it.
    """

    def __init__(
        self, out_dir: str | Path, size: int, rank: int = 0, world: int = 1, workers: int = 2, shuffle: int = 1000, seed: int = 0,
        augment: bool = False,
    ):
        out_dir = Path(out_dir)
        shards = _listed_shards(out_dir)
        self.mine = shards_for_rank(shards, rank, world)
        if not self.mine:
            raise DataError(
                out_dir / INDEX_NAME, "shards", f"{len(shards)} shard(s) leave process {rank} of {world} without data; pack with a smaller --shard-size"
            )
        self.rank, self.workers, self.shuffle, self.seed, self.size = rank, min(workers, len(self.mine)), shuffle, seed, size
        self.augment = augment
        self._samples: Iterator[tuple[np.ndarray, dict[str, Any]]] | None = None
        self._next = -1

    def close(self) -> None:
        """Stop the DataLoader processes now (see `mmt.data.loader.StepImages.close`)."""
        self._samples, self._next = None, -1

    def take(self, position: int, n: int) -> list[tuple[np.ndarray, dict[str, Any]]]:
        if position != self._next:
            self._start(position)
        samples = []
        for _ in range(n):
            sample = next(self._samples)
            if isinstance(sample, _Failure):
                self._samples, self._next = None, -1
                raise sample.error
            image, meta = sample
            samples.append((np.asarray(image), meta))
        self._next = position + n
        return samples

    def _start(self, skip: int) -> None:
        dataset = _RankStream(self.mine, self.rank, max(1, self.workers), skip, self.shuffle, self.seed, self.size, self.augment)
        if self.workers == 0:
            self._samples = iter(dataset)
        else:
            # its own generator: starting workers draws a seed, which must not move the training's global torch RNG
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.workers, collate_fn=_keep,
                                                 generator=torch.Generator().manual_seed(0))
            self._samples = iter(loader)


def _keep(sample: Any) -> Any:
    return sample
