"""Pieces every built-in task shares: the shapes world's settings, the seeded data order, and
your own data (files read lazily, shards streamed)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, Collection, Iterable, Sequence

import numpy as np
import torch

from mmt import checkpoint
from mmt.config import Amount, Count, Settings
from mmt.data.images import Fit
from mmt.data.loader import ImageFiles, Pixels, StepImages, decode_all
from mmt.data.progress import bar
from mmt.data.worlds import shapes
from mmt.files import atomic_write_text
from mmt.text import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ShapesConfig(Settings):
    """Which shapes world to generate (captions, questions)."""

    num_train: Count = 10000  # training images (5 captions, ~10 questions each)
    num_val: Count = 500  # validation images: evaluated during training, picks the best checkpoint
    num_test: Count = 1000  # test images: `mmt eval`
    seed: Amount = 0  # generation seed; each split uses its own stream of it
    image_size: Count = shapes.IMAGE_SIZE  # rendered image side in pixels


def shapes_splits(data: ShapesConfig, only: Collection[str] = ("train", "val", "test")) -> tuple[shapes.ShapesSplit, shapes.ShapesSplit, shapes.ShapesSplit]:
    """The (train, val, test) splits `data` asks for; those not in `only` come out empty (each
    split draws from its own stream, so the others are the same either way)."""
    sizes = {k: getattr(data, f"num_{k}") if k in only else 0 for k in ("train", "val", "test")}
    return shapes.splits(sizes["train"], sizes["val"], sizes["test"], data.seed, data.image_size)


def epoch_order(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Items step*B .. step*B+B-1 of an endless sequence of seeded permutations of range(n).

    A pure function of (seed, step): a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    items = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(n)
        items[epochs == epoch] = order[positions[epochs == epoch] % n]
    return items


def share(items: np.ndarray, part: int, parts: int) -> np.ndarray:
    """Part `part` of `parts` equal, contiguous shares of a step's items: what one process
    (and one micro-step of gradient accumulation) trains on. Equal shares keep the mean of
    the shares' mean losses equal to the whole batch's mean loss."""
    if len(items) % parts:
        raise ValueError(
            f"train.batch_size={len(items)} does not split evenly into {parts} shares "
            "(processes x train.accumulate); choose a batch size divisible by it"
        )
    size = len(items) // parts
    return items[part * size : (part + 1) * size]


def unknown_words(tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, int]:
    """The words of `texts` that `tokenizer` reads as [UNK], as it normalises them, with how
    often each occurs, most frequent first."""
    texts = list(texts)
    counts: dict[str, int] = {}
    normalizer = tokenizer.backend.normalizer
    for text, encoding in zip(texts, tokenizer.backend.encode_batch(texts, add_special_tokens=False)):
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id == tokenizer.unk_id:
                word = text[start:end]
                word = normalizer.normalize_str(word) if normalizer is not None else word
                counts[word] = counts.get(word, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def with_words(tokenizer: Tokenizer, words: Iterable[str]) -> Tokenizer:
    """A word-level `tokenizer` with `words` added after its own (its ids keep their meaning)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = tokenizer.backend
    if not isinstance(backend.model, models.WordLevel):
        raise ValueError("only a word-level tokenizer can be extended with new words")
    vocab = dict(sorted(backend.get_vocab().items(), key=lambda item: item[1]))
    for word in words:
        vocab.setdefault(word, len(vocab))
    grown = Backend(models.WordLevel(vocab, unk_token=tokenizer.backend.id_to_token(tokenizer.unk_id)))
    grown.normalizer, grown.pre_tokenizer, grown.decoder = backend.normalizer, backend.pre_tokenizer, backend.decoder
    grown.add_special_tokens([token for _, token in sorted(backend.get_added_tokens_decoder().items())])  # (same ids: in vocab)
    return Tokenizer(grown)


def init_tokenizer(run_dir: Path, train_cfg, corpus: Callable[[], Iterable[str]]) -> Tokenizer:
    """The run's tokenizer, saved in run_dir: its own when resuming; the --init run's when
    starting from one (its weights mean nothing under other token ids), where words of this
    run's data it does not know stop the run, extend it or become [UNK] (`train.new_words`);
    else a word tokenizer trained on `corpus()`."""
    path = run_dir / checkpoint.TOKENIZER_NAME
    if path.is_file():
        return Tokenizer.load(path)
    init = train_cfg.init
    if init:
        tokenizer = checkpoint.load_tokenizer(checkpoint.model_directory(init))
        if tokenizer is None:
            raise checkpoint.CheckpointError(f"{init}: no tokenizer.json beside the model; --init needs a run or model directory made by mmt")
        unknown = unknown_words(tokenizer, corpus())
        if unknown:
            listing = ", ".join(f"{word!r} ({n})" for word, n in list(unknown.items())[:10]) + (", ..." if len(unknown) > 10 else "")
            if train_cfg.new_words == "stop":
                raise ValueError(
                    f"{len(unknown)} words of this run's texts ({sum(unknown.values())} occurrences) are not in the vocabulary of "
                    f"{init}: {listing}. Add them to it (--set train.new_words=extend; their embeddings start new) or read "
                    "them as [UNK] (--set train.new_words=unk)"
                )
            if train_cfg.new_words == "extend":
                try:
                    tokenizer = with_words(tokenizer, unknown)
                except ValueError as e:
                    raise ValueError(f"{init}: {e}; {len(unknown)} words are unknown to it ({listing}): use --set train.new_words=unk") from None
                log.info(f"added {len(unknown)} words to the vocabulary of {init}: {listing}")
            else:
                log.warning(f"{len(unknown)} words ({sum(unknown.values())} occurrences) read as [UNK] (train.new_words=unk): {listing}")
    else:
        tokenizer = Tokenizer.train(corpus(), kind="word")
    tokenizer.save(path)
    return tokenizer


@dataclasses.dataclass
class SourceConfig(Settings):
    """Your own image-text data instead of the built-in world (COCO captions, Karpathy, JSON Lines)."""

    train: str = ""  # captions_*.json, dataset_coco.json or pairs.jsonl; empty: the built-in shapes world
    val: str = ""  # evaluated during training; empty: the last 10% of the training images (at most 1,000) are held out
    test: str = ""  # `mmt eval`; empty: the validation data
    image_root: str = ""  # folder of the images (COCO, Karpathy; JSON Lines paths are relative to their file)
    kind: str = ""  # coco | karpathy | jsonl; empty: detected from the file
    train_split: str = "train"  # Karpathy: split of `train` (restval folded in)
    val_split: str = "val"  # Karpathy: split of `val`
    test_split: str = "test"  # Karpathy: split of `test`
    skip_bad: bool = False  # skip and count bad records and images instead of stopping at the first (then training images are decoded once before training)
    workers: Amount = 2  # DataLoader processes decoding images (training batches, validation and test sets), per training process
    shuffle_buffer: Amount = 1000  # shards: samples in the shuffle buffer (0: shard order, only the shard order is shuffled)
    augment: bool = False  # random resized crop (50-100% of the area) + mild colour jitter on training images (files and shards)


@dataclasses.dataclass
class ImageTexts:
    """Images in memory, (N, 3, H, W) in [-1, 1] (float, or uint8 `Pixels` that index as
    float), and each one's captions (any number per image)."""

    pixels: torch.Tensor | Pixels
    captions: list[list[str]]
    skipped: dict  # bad records skipped, by kind (empty unless skip_bad)

    def __len__(self) -> int:
        return len(self.captions)


@dataclasses.dataclass
class ImageTextFiles:
    """Images on disk (decoded when a batch needs them) and each one's captions: own
    training data."""

    files: ImageFiles
    captions: list[list[str]]
    skipped: dict  # bad records skipped, by kind (empty unless skip_bad)

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: Sequence[int] | slice) -> "ImageTextFiles":
        chosen = range(len(self))[indices] if isinstance(indices, slice) else indices
        return ImageTextFiles(self.files.subset(chosen), [self.captions[i] for i in chosen], self.skipped)


def checked_records(path: str, cfg: SourceConfig, split: str | None = None) -> tuple[list, dict]:
    """(the good records of a data file, what was skipped by kind), checked the fast way: every
    record, and every image's header and size (missing, unreadable or too large images);
    nothing is decoded. Corrupt pixels are found by the one decode that follows
    (`decode_all`, or training's `StepImages`)."""
    from mmt.data.formats import check_dataset, load_source

    source = load_source(path, image_root=cfg.image_root or None, kind=cfg.kind or None, skip_bad=cfg.skip_bad, split=split)
    report = check_dataset(source, load=False, skip_bad=cfg.skip_bad)
    return report.records, dict(report.bad.counts)


def _merged(*counts: dict) -> dict:
    total: dict = {}
    for c in counts:
        for kind, n in c.items():
            total[kind] = total.get(kind, 0) + n
    return total


def read_image_texts(path: str, cfg: SourceConfig, size: "int | Fit", split: str) -> ImageTextFiles:
    """A captions source's records, checked (`checked_records`), with their images left on disk."""
    from mmt.data.formats.records import CaptionRecord, DataError

    records, skipped = checked_records(path, cfg, split)
    usable = [r for r in records if isinstance(r, CaptionRecord) and r.captions]
    if len(usable) < len(records):
        raise DataError(path, "records", "holds VQA records or images without captions; retrieval trains on image-text pairs")
    if not usable:
        raise DataError(path, "records", "no usable image-text records")
    fit = size if isinstance(size, Fit) else Fit(size)
    return ImageTextFiles(ImageFiles.of_records(usable, fit), [list(r.captions) for r in usable], skipped)


def decoded(texts: ImageTextFiles, cfg: SourceConfig, desc: str) -> ImageTexts:
    """`texts` with every image decoded once into memory as uint8 (for evaluation); with
    source.skip_bad a corrupt image is left out and counted, else it stops with its name."""
    images, kept, bad = decode_all(texts.files, cfg.workers, cfg.skip_bad, desc)
    return ImageTexts(Pixels(images), [texts.captions[i] for i in kept], _merged(texts.skipped, bad.counts))


def fully_checked(texts: ImageTextFiles, cfg: SourceConfig) -> ImageTextFiles:
    """With source.skip_bad, `texts` less the images that do not decode, each decoded once
    (by source.workers processes) and counted; without it, `texts` as it is (a corrupt image
    then stops training when met, naming it)."""
    if not cfg.skip_bad:
        return texts
    _, kept, bad = decode_all(texts.files, cfg.workers, skip_bad=True, desc="check images", keep=False)
    if not kept:
        from mmt.data.formats.records import DataError

        raise DataError(cfg.train, "records", "no image decodes")
    result = texts.subset(kept)
    result.skipped = _merged(texts.skipped, bad.counts)
    return result


def load_image_texts(path: str, cfg: SourceConfig, size: "int | Fit", split: str) -> ImageTexts:
    """Read a captions source, check its records and image headers, and decode every image once
    into memory (uint8 at the model's size, `Pixels`), by source.workers processes: evaluation
    data. A shard folder (`mmt data pack`) is read whole, in shard order; its images were
    checked when packed."""
    from mmt.data.formats.records import DataError
    from mmt.data.formats.shards import INDEX_NAME, is_shard_dir, iter_packed, read_index
    from mmt.data.images import load_image

    if is_shard_dir(path):
        images, captions = [], []
        for meta, data in bar(iter_packed(path), total=read_index(path).get("num_samples"), desc="load shards"):
            check_packed(path, meta, "caption")
            images.append(load_image(data, size, f"{path}: sample {meta.get('index')}"))
            captions.append(list(meta["captions"]))
        if not images:
            raise DataError(Path(path) / INDEX_NAME, "shards", "no samples")
        return ImageTexts(Pixels(np.stack(images)), captions, dict(read_index(path)["skipped"].get("counts", {})))
    return decoded(read_image_texts(path, cfg, size, split), cfg, f"load {Path(path).name}")


def check_packed(path: str, meta: dict, kind: str) -> None:
    """A packed record (`iter_packed`) is of `kind`: "caption" with captions, or "vqa" with answers."""
    from mmt.data.formats.records import DataError

    if kind == "caption" and (meta.get("kind") != "caption" or not meta.get("captions")):
        raise DataError(path, f"sample {meta.get('index')}", "is not an image with captions; image-text training needs a captions pack")
    if kind == "vqa" and (meta.get("kind") != "vqa" or not meta.get("answers")):
        raise DataError(path, f"sample {meta.get('index')}", "is not a question with answers; VQA training needs a pack of annotated questions")


class StreamedShards:
    """source.train as a shard folder (`mmt data pack`): every record is read up front
    (tokenizer, vocabularies and longest texts need them; a pass over the tar headers only),
    and images stream from the shards while training, each process from its own shards
    (`ShardStream`)."""

    def __init__(self, src: SourceConfig, size: "int | Fit", train_cfg, kind: str):
        from mmt.data.formats.shards import iter_packed, read_index

        self.src, self.size, self.train_cfg = src, size, train_cfg
        self.records = []
        for meta, _ in iter_packed(src.train, images=False):
            check_packed(src.train, meta, kind)
            self.records.append(meta)
        self.skipped = dict(read_index(src.train)["skipped"].get("counts", {}))
        self._stream = None

    @property
    def captions(self) -> list[list[str]]:
        return [list(meta["captions"]) for meta in self.records]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def __len__(self) -> int:
        return len(self.records)

    def take(self, step: int, part: int, parts: int) -> list[tuple[np.ndarray, dict]]:
        """Share `part` of `parts` (processes x accumulation micro-steps, as `share` splits a
        step) of step `step`: (uint8 image, record) pairs. Process r reads its own shards;
        micro-steps take consecutive samples of its stream, so a step's position in the
        stream follows from its number."""
        from mmt.data.formats.shards import ShardStream

        cfg = self.train_cfg
        n = len(share(np.arange(cfg.batch_size), part, parts))  # (which also checks that the batch splits evenly)
        rank, world, micro = part // cfg.accumulate, parts // cfg.accumulate, part % cfg.accumulate
        if self._stream is None or self._stream.rank != rank:
            src = self.src
            self._stream = ShardStream(src.train, self.size, rank, world, src.workers, src.shuffle_buffer, cfg.seed, src.augment)
        return self._stream.take((step * cfg.accumulate + micro) * n, n)

    def samples(self, step: int, part: int, parts: int) -> tuple[torch.Tensor, list[list[str]], torch.Tensor]:
        """`take` for image-text training: images (n, 3, H, W), their captions, and their
        record indices (unique across processes)."""
        from mmt.data.images import to_pixels

        taken = self.take(step, part, parts)
        pixels = to_pixels(np.stack([image for image, _ in taken]))
        return pixels, [list(meta["captions"]) for _, meta in taken], torch.tensor([meta["index"] for _, meta in taken])


def own_image_texts(
    src: SourceConfig, size: "int | Fit", run_dir: Path, train_cfg=None
) -> tuple[ImageTextFiles | StreamedShards, ImageTexts]:
    """source.train and source.val (or a held-out tail of train: the last 10%, at most 1,000
    images), checked; the training images stay on disk (decoded per batch, `StepImages`),
    the validation images are decoded once into memory. What was skipped goes to
    run_dir/data_report.json. A shard folder as source.train streams (`StreamedShards`, with
    train_cfg's seed, batch size and accumulation) and needs source.val."""
    from mmt.data.formats.shards import is_shard_dir

    if is_shard_dir(src.train):
        if not src.val:
            raise ValueError(f"{src.train}: training from shards streams the data; give validation data as source.val (a file or a shard folder)")
        train = StreamedShards(src, size, train_cfg, "caption")
        return _report(run_dir, train, load_image_texts(src.val, src, size, src.val_split))
    train = read_image_texts(src.train, src, size, src.train_split)
    if src.val:
        val = load_image_texts(src.val, src, size, src.val_split)
    else:
        if len(train) < 2:
            raise ValueError(f"{src.train}: {len(train)} usable image(s); give source.val or more training images")
        n = min(1000, max(1, len(train) // 10))
        tail = train.subset(slice(len(train) - n, len(train)))
        tail.skipped = {}
        val = decoded(tail, src, "load validation images")
        train = train.subset(slice(0, len(train) - n))
    return _report(run_dir, fully_checked(train, src), val)


def step_images(files: ImageFiles, src: SourceConfig, train_cfg, plan) -> StepImages:
    """The training images of own data, decoded per batch as the task's `plan(step, part,
    parts)` -> (image indices, slots in the step's batch) chooses them (`StepImages`), with
    source.augment and source.workers."""
    return StepImages(files, plan, seed=train_cfg.seed, augment=src.augment, workers=src.workers, accumulate=train_cfg.accumulate)


def _report(run_dir: Path, train: ImageTextFiles | StreamedShards, val: ImageTexts) -> tuple[ImageTextFiles | StreamedShards, ImageTexts]:
    report = {"train_images": len(train), "val_images": len(val), "skipped_train": train.skipped, "skipped_val": val.skipped}
    if train.skipped or val.skipped:
        log.warning(f"skipped bad records (source.skip_bad): train {train.skipped or 0}, val {val.skipped or 0}")
    atomic_write_text(run_dir / "data_report.json", json.dumps(report, indent=2) + "\n")
    return train, val


def test_image_texts(cfg, size: "int | Fit") -> tuple[torch.Tensor | Pixels, list[list[str]], shapes.ShapesSplit | None]:
    """(pixels, captions per image, the shapes split or None) a caption or retrieval run is tested
    on: source.test (else source.val) for a run on its own data, else the shapes world's test split."""
    from mmt.data.images import to_pixels
    from mmt.errors import ConfigError

    source = cfg.source
    if not source.train:
        _, _, test = shapes_splits(cfg.data, only=("test",))
        return to_pixels(test.images), test.captions, test
    path = source.test or source.val
    if not path:
        raise ConfigError("this run trained on source.train with a held-out validation tail; give --set source.test=FILE")
    own = load_image_texts(path, source, size, source.test_split if source.test else source.val_split)
    return own.pixels, own.captions, None
