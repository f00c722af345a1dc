"""Own data (image files on disk) for training and evaluation without holding it as floats.

    ImageFiles   the image of each record (its path, and the data file and record it came
                 from), decoded one at a time by the one image pipeline (`load_image`): the
                 same decode, fit and augmentation as streamed shards
    StepImages   training: the uint8 images of one share of one step, decoded by DataLoader
                 worker processes a few steps ahead. Which images is the task's plan (a pure
                 function of (seed, step, part)); augmentation is drawn from (seed, step, slot),
                 slot being the image's place in the whole step's batch, so a batch is a pure
                 function of (seed, step), however the step is split, and a resumed run
                 sees exactly the images an uninterrupted one would.
    decode_all   evaluation: every image once, in parallel, into uint8 (N, S, S, 3)
    Pixels       such uint8 images, indexed as the float (N, 3, S, S) pixels models read

Memory: the training set costs its records only (paths and texts); an evaluation set costs
3·S² bytes per image (150 KB at 224), a quarter of float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from mmt.data.formats.records import BadRecords, DataError
from mmt.data.images import Fit, ImageError, load_image, to_pixels
from mmt.data.progress import bar

AUGMENT_STREAM = 3_000_017  # the augmentation's own stream of the training seed
DECODE_CHUNK = 32  # images per DataLoader item when decoding a whole set

# why a corrupt image was not found before training, and what to do
_LATE_HINT = ("; the start-up check reads image headers only: find every such image with `mmt data check` (it decodes them all), "
              "or train with source.skip_bad=true, which decodes the training images once before training and skips bad ones")


class ImageFiles:
    """The images of a data set's records: image i is `paths[i]`, read for record `where[i]`
    of data file `sources[i]`. `decode(i)` is the model's (S, S, 3) uint8 square; a missing
    or corrupt image is a DataError naming the data file, the record and the image."""

    def __init__(self, paths: Sequence[str | Path], fit: Fit, sources: Sequence[str], where: Sequence[str]):
        if not len(paths) == len(sources) == len(where):
            raise ValueError(f"{len(paths)} paths, {len(sources)} sources and {len(where)} record names: one of each per image")
        self.paths, self.sources, self.where = [str(p) for p in paths], list(sources), list(where)
        self.fit = fit

    @classmethod
    def of_records(cls, records: Sequence, fit: Fit) -> "ImageFiles":
        """The images of `CaptionRecord`s or `VQARecord`s (`mmt.data.formats.records`), in order."""
        return cls([r.image_path for r in records], fit, [r.source for r in records], [r.where for r in records])

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | slice) -> "ImageFiles":
        chosen = range(len(self))[indices] if isinstance(indices, slice) else indices
        return ImageFiles([self.paths[i] for i in chosen], self.fit, [self.sources[i] for i in chosen], [self.where[i] for i in chosen])

    def decode(self, i: int, augment: np.random.Generator | None = None) -> np.ndarray:
        try:
            return load_image(self.paths[i], self.fit, augment=augment)
        except ImageError as e:
            raise DataError(self.sources[i] or self.paths[i], self.where[i], f"image {self.paths[i]}: {e.detail}", kind=e.kind) from None


class _Decode(torch.utils.data.Dataset):
    """DataLoader items: (image indices, augmentation seeds or None) -> a list of uint8 images,
    a DataError in place of each that failed (handed back as a value, intact, from a worker)."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __getitem__(self, key: tuple[Sequence[int], Sequence[tuple] | None]) -> list[np.ndarray | DataError]:
        indices, seeds = key
        out: list[np.ndarray | DataError] = []
        for k, i in enumerate(indices):
            try:
                out.append(self.files.decode(int(i), np.random.default_rng(seeds[k]) if seeds is not None else None))
            except DataError as e:
                out.append(e)
        return out

    def __len__(self) -> int:  # (DataLoader asks; items are keys, not positions)
        return len(self.files)


class _Keys(torch.utils.data.Sampler):
    """The endless sequence of DataLoader items from `first` on, made in the training process."""

    def __init__(self, keys: Callable[[], Iterator]):
        self.keys = keys

    def __iter__(self) -> Iterator:
        return self.keys()


def _loader(files: ImageFiles, keys: Callable[[], Iterator], workers: int) -> Iterator[list[np.ndarray | DataError]]:
    """Items of `keys()` decoded by `workers` DataLoader processes (in order), or here with 0."""
    dataset = _Decode(files)
    if workers == 0:
        return (dataset[key] for key in keys())
    # its own generator: starting workers draws a seed, which must not move the training's global torch RNG
    # (a resumed run starts them at another step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_Keys(keys), num_workers=workers, collate_fn=_keep,
                                         generator=torch.Generator().manual_seed(0))
    return iter(loader)


def _keep(item):
    return item


class StepImages:
    """The training images of one process, step after step.

    `plan(step, part, parts)` is the task's choice of images for share `part` of `parts` of
    step `step`: (image indices, their slots in the whole step's batch). `take` returns them
    as uint8 (n, S, S, 3), augmented (with `augment`) from (seed, step, slot). With workers
    > 0, DataLoader processes decode the shares this process will ask for next (its own
    parts of each step, in order: accumulation micro-steps, then the next step); a request
    out of that order (a resumed run, an evaluation in between does not count) restarts them
    there. A corrupt image stops training with a DataError naming the data file, the record
    and the image.
    """

    def __init__(self, files: ImageFiles, plan: Callable[[int, int, int], tuple[np.ndarray, np.ndarray]], *, seed: int,
                 augment: bool, workers: int, accumulate: int = 1):
        self.files, self.plan, self.seed, self.augment, self.workers, self.accumulate = files, plan, seed, augment, workers, accumulate
        self._batches: Iterator | None = None
        self._next: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def _following(self, key: tuple[int, int, int]) -> tuple[int, int, int]:
        """The share this process asks for after `key`: its next micro-step, else the next step."""
        step, part, parts = key
        if (part + 1) % self.accumulate:
            return step, part + 1, parts
        return step + 1, part + 1 - self.accumulate, parts

    def _item(self, key: tuple[int, int, int]) -> tuple[list[int], list[tuple] | None]:
        step, _, _ = key
        indices, slots = self.plan(*key)
        seeds = [(self.seed, AUGMENT_STREAM, step, int(s)) for s in slots] if self.augment else None
        return [int(i) for i in indices], seeds

    def _keys(self, first: tuple[int, int, int]) -> Callable[[], Iterator]:
        def keys():
            key = first
            while True:
                yield self._item(key)
                key = self._following(key)
        return keys

    def close(self) -> None:
        """Stop the DataLoader processes now (dropping the only reference to their iterator
        shuts them down), not when a garbage collection finds this object; a later `take`
        starts them again."""
        self._batches, self._next = None, None

    def take(self, step: int, part: int = 0, parts: int = 1) -> np.ndarray:
        key = (step, part, parts)
        if key != self._next or self._batches is None:
            self._batches = _loader(self.files, self._keys(key), self.workers)
        images = next(self._batches)
        self._next = self._following(key)
        for image in images:
            if isinstance(image, DataError):
                self._batches, self._next = None, None
                raise DataError(image.path, image.where, image.detail + _LATE_HINT, kind=image.kind)
        return np.stack(images)


def decode_all(files: ImageFiles, workers: int = 0, skip_bad: bool = False, desc: str = "decode",
               keep: bool = True) -> tuple[np.ndarray | None, list[int], BadRecords]:
    """Every image of `files` decoded once (no augmentation), by `workers` DataLoader processes:
    (uint8 (M, S, S, 3), or None unless `keep`; the indices of the M good images; what was
    skipped). A bad image raises a DataError naming it, or with `skip_bad` is left out and
    counted by kind."""
    S = files.fit.size
    out = np.empty((len(files) if keep else 0, S, S, 3), dtype=np.uint8)
    chunks = [list(range(start, min(len(files), start + DECODE_CHUNK))) for start in range(0, len(files), DECODE_CHUNK)]
    kept, bad = [], BadRecords()
    with bar(total=len(files), desc=desc) as progress:
        for chunk, images in zip(chunks, _loader(files, lambda: ((c, None) for c in chunks), min(workers, len(chunks)))):
            for i, image in zip(chunk, images):
                if isinstance(image, DataError):
                    if not skip_bad:
                        raise image
                    bad.add(image)
                    continue
                if keep:
                    out[len(kept)] = image
                kept.append(i)
            progress.update(len(chunk))
    return (out[: len(kept)] if keep else None), kept, bad


class Pixels:
    """uint8 images (N, H, W, 3) that index (an int array, a tensor, a slice) as the float
    (n, 3, H, W) pixels in [-1, 1] the models read, converted per batch (`to_pixels`)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        chosen = self.images[index]
        return to_pixels(chosen[None] if chosen.ndim == 3 else np.ascontiguousarray(chosen))
