"""Image captioning on the built-in shapes world or your own data: batches, evaluation, saving
(the `Task` protocol, `mmt.tasks.base`).

Training is teacher-forced on each image's 5 reference captions at once (the image is
encoded once, its captions attend to it together). Evaluation captions every image of a split
and scores the captions two ways: against the references with the COCO caption metrics (BLEU,
ROUGE-L, CIDEr-D, METEOR when Java is present), and against the scene itself, since the
world is synthetic: fact precision (share of stated facts that are true) and fact recall
(share of the scene's objects the caption mentions).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from mmt import checkpoint, registry
from mmt.config import Count, Settings
from mmt.data.images import Fit, to_pixels
from mmt.data.progress import bar
from mmt.data.worlds import shapes
from mmt.data.worlds.shapes_truth import fact_scores
from mmt.generation import GenerationConfig
from mmt.metrics.captions import format_scores, score_captions, write_coco_references, write_coco_results
from mmt.models.caption import CaptionConfig, CaptionModel
from mmt.tasks.base import Task
from mmt.tasks.common import (
    ImageTextFiles,
    ImageTexts,
    ShapesConfig,
    SourceConfig,
    StreamedShards,
    epoch_order,
    init_tokenizer,
    own_image_texts,
    shapes_splits,
    share,
    step_images,
    test_image_texts,
)
from mmt.text import Tokenizer
from mmt.train import TrainConfig


@dataclasses.dataclass
class CaptionRunConfig(Settings):
    """Everything a `mmt train caption` run needs."""

    model: CaptionConfig = dataclasses.field(default_factory=lambda: registry.preset("caption-small"))
    data: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=4000, batch_size=16, lr=1e-3, warmup_steps=200, eval_every=500, save_every=500)
    )
    captions_per_image: Count = 5  # training captions per image and step; the batch size counts images
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)  # your own data (source.train=...) instead of `data`
    # decoding for evaluation; max_new_tokens is capped by the model's max_len
    generation: GenerationConfig = dataclasses.field(default_factory=lambda: GenerationConfig(max_new_tokens=100))


@torch.no_grad()
def caption_images(
    model: CaptionModel, tokenizer: Tokenizer, pixels: torch.Tensor, generation: GenerationConfig, batch_size: int = 100
) -> list[str]:
    """The best caption for each image (N, 3, H, W), decoded as text."""
    model.eval()
    device = next(model.parameters()).device
    captions = []
    for start in bar(range(0, len(pixels), batch_size), desc="caption", unit="batch"):
        out = model.generate(pixels[start : start + batch_size].to(device), generation)
        captions += [tokenizer.decode(row) for row in out.ids[:, 0].cpu()]
    return captions


def evaluate_captions(
    captions: list[str], split: shapes.ShapesSplit, meteor: bool | None = False, tokenize: str | None = "simple"
) -> dict[str, float | str]:
    """COCO caption metrics against the references, and truth against the scenes."""
    results = {i: c for i, c in enumerate(captions)}
    references = {i: refs for i, refs in enumerate(split.captions[: len(captions)])}
    scores = score_captions(results, references, meteor=meteor, tokenize=tokenize)
    truth = fact_scores(captions, split.scenes[: len(captions)])
    # numbers as floats (the table prints floats), plus which tokenizer the metrics used
    return {k: v if isinstance(v, str) else float(v) for k, v in {**scores, **truth}.items()}


def score_references(
    captions: list[str], references: list[list[str]], meteor: bool | None = False, tokenize: str | None = "simple"
) -> dict[str, float | str]:
    """COCO caption metrics of `captions` against each image's references (no truth check)."""
    scores = score_captions(dict(enumerate(captions)), dict(enumerate(references[: len(captions)])), meteor=meteor, tokenize=tokenize)
    return {k: v if isinstance(v, str) else float(v) for k, v in scores.items()}


class CaptionTask(Task):
    name = "caption"
    run_config = CaptionRunConfig
    cfg: CaptionRunConfig

    def prepare(self, run_dir: Path) -> CaptionConfig:
        cfg, model = self.cfg, copy.deepcopy(self.cfg.model)
        if cfg.source.train:  # your own data: reference captions only (no scene graphs to check truth against)
            train, val = own_image_texts(cfg.source, Fit.of(model.vision), run_dir, cfg.train)
            self.val_split = None
        else:
            if model.vision.image_size != cfg.data.image_size:
                raise ValueError(
                    f"model.vision.image_size={model.vision.image_size} but data.image_size={cfg.data.image_size}: set them equal"
                )
            if cfg.captions_per_image > 5:
                raise ValueError(f"captions_per_image={cfg.captions_per_image}: the shapes world has 5 captions per image (use 1-5)")
            train_split, self.val_split, _ = shapes_splits(cfg.data, only=("train", "val"))
            train = ImageTexts(to_pixels(train_split.images), train_split.captions, {})
            val = ImageTexts(to_pixels(self.val_split.images), self.val_split.captions, {})
        flat = [c for caps in train.captions for c in caps]
        self.tokenizer = init_tokenizer(run_dir, cfg.train, lambda: flat)
        model.vocab_size = self.tokenizer.vocab_size
        self.stream = train if isinstance(train, StreamedShards) else None  # shards: images stream while training
        self.train_pixels = train.pixels if isinstance(train, ImageTexts) else None  # the built-in world, in memory
        # own files: decoded per batch by worker processes
        self.train_images = step_images(train.files, cfg.source, cfg.train, self._train_images) if isinstance(train, ImageTextFiles) else None
        self.val_pixels, self.val_captions = val.pixels, val.captions
        # every training caption, tokenised once, image by image: image i owns rows
        # start[i] .. start[i] + count[i] - 1. The model's positions must cover the longest
        # caption (a cut caption would teach the decoder to stop mid-phrase), so max_len
        # grows to fit the training captions.
        self.count = np.array([len(caps) for caps in train.captions])
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.train_ids, _ = self.tokenizer.batch(flat, 10_000, wrap="bos_eos")
        model.max_len = max(model.max_len, self.train_ids.shape[1])
        self.model_cfg = model
        return model

    def build_model(self, model_cfg: CaptionConfig) -> CaptionModel:
        return CaptionModel(model_cfg)

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict[str, torch.Tensor]:
        """B images of seeded epoch permutations, each with `captions_per_image` (g) of its captions;
        share `part` of `parts`. When every image has at most g captions and all have the same
        number (the shapes world: 5), each image brings all of them, in order: encoded once
        for five targets. Otherwise each image brings g captions in a seeded order, repeating
        its captions when it has fewer than g."""
        B, g = self.cfg.train.batch_size, self.cfg.captions_per_image
        if self.stream is not None:
            return self._streamed_batch(step, part, parts)
        images = epoch_order(self.cfg.train.seed, step, B, len(self.count))
        counts = self.count[images]
        if g >= counts.max() and (counts == counts[0]).all():
            images = share(images, part, parts)
            rows = (self.start[images][:, None] + np.arange(counts[0])).reshape(-1)  # (B * count, ), image by image
        else:
            rng = np.random.default_rng([self.cfg.train.seed, 1_000_003, step])
            which = np.stack([np.resize(rng.permutation(n), g) for n in counts])  # (B, g); resize repeats short lists
            mine = share(np.arange(B), part, parts)
            images = images[mine]
            rows = (self.start[images][:, None] + which[mine]).reshape(-1)
        ids = self.train_ids[torch.as_tensor(rows)]
        ids = ids[:, : int((ids != self.model_cfg.pad_id).sum(1).max())]  # drop all-padding columns
        if self.train_images is not None:
            return {"pixels": to_pixels(self.train_images.take(step, part, parts)), "caption_ids": ids}
        return {"pixels": self.train_pixels[torch.as_tensor(images)], "caption_ids": ids}

    def _train_images(self, step: int, part: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, their slots in the step's batch) of share `part` of `parts` of step
        `step`: the images `train_batch` takes (`StepImages` decodes them ahead)."""
        B = self.cfg.train.batch_size
        slots = share(np.arange(B), part, parts)
        return epoch_order(self.cfg.train.seed, step, B, len(self.count))[slots], slots

    def _streamed_batch(self, step: int, part: int, parts: int) -> dict[str, torch.Tensor]:
        """train_batch from shards: the share's streamed images, with captions chosen as above."""
        g = self.cfg.captions_per_image
        pixels, captions, _ = self.stream.samples(step, part, parts)
        counts = {len(caps) for caps in captions}
        if len(counts) == 1 and g >= counts.pop():  # all of each image's captions, in order
            which = [list(range(len(caps))) for caps in captions]
        else:
            rng = np.random.default_rng([self.cfg.train.seed, 1_000_003, step, part])
            which = [np.resize(rng.permutation(len(caps)), g) for caps in captions]
        texts = [caps[i] for caps, rows in zip(captions, which) for i in rows]
        ids, _ = self.tokenizer.batch(texts, self.model_cfg.max_len, wrap="bos_eos")
        return {"pixels": pixels, "caption_ids": ids}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens in a batch, what its loss is the mean of (the trainer weighs
        micro-steps by it)."""
        return int((batch["caption_ids"][:, 1:] != self.model_cfg.pad_id).sum())

    @staticmethod
    def batch_samples(batch: dict[str, torch.Tensor]) -> int:
        """Captions in a batch: what samples/s counts."""
        return len(batch["caption_ids"])

    @staticmethod
    def batch_accuracy(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Teacher-forced next-token accuracy over non-padding tokens."""
        return out["tokens_correct"].item(), int(out["tokens"].item())

    def evaluate(self, model: CaptionModel) -> dict[str, float]:
        """Greedy captions of the validation split, scored (simple tokenizer, no METEOR: fast);
        on the shapes world also checked for truth against the scenes."""
        captions = caption_images(model, self.tokenizer, self.val_pixels, self.cfg.generation)
        if self.val_split is None:
            return score_references(captions, self.val_captions)
        return evaluate_captions(captions, self.val_split)

    @staticmethod
    def headline(result: dict[str, float]) -> dict[str, float]:
        return {k: result[k] for k in ("BLEU-4", "CIDEr-D", "fact_precision", "fact_recall") if k in result}

    @staticmethod
    def score(result: dict[str, float]) -> float:
        return result.get("CIDEr-D", 0.0)

    def format_result(self, result: dict[str, float]) -> str:
        return format_scores(result)

    def save_model(self, model: CaptionModel, directory: Path) -> None:
        checkpoint.save_pretrained(model, directory, self.tokenizer)

    def test(self, model: CaptionModel, tokenizer: Tokenizer, directory: Path, out: Path) -> tuple[dict, str]:
        """Caption the test images and score them: the COCO caption metrics (METEOR and the PTB
        tokenizer where Java is present) and, on the shapes world, truth against the scenes.
        The captions and references go beside `out` in COCO's formats."""
        pixels, references, test = test_image_texts(self.cfg, Fit.of(model.config.vision))
        started = time.perf_counter()
        captions = caption_images(model, tokenizer, pixels, self.cfg.generation)
        seconds = time.perf_counter() - started
        if test is None:
            result = score_references(captions, references, meteor=None, tokenize=None)
        else:
            result = evaluate_captions(captions, test, meteor=None, tokenize=None)
        results_path = out.with_name(out.stem + "_captions.json")
        write_coco_results(results_path, dict(enumerate(captions)))
        write_coco_references(out.with_name(out.stem + "_references.json"), dict(enumerate(references)))
        report = [f"{len(captions)} test images captioned in {seconds:.1f}s ({describe(self.cfg.generation)})", format_scores(result)]
        return result, "\n".join(report + [f"captions (COCO results format) in {results_path}"])


def describe(generation: GenerationConfig) -> str:
    """How a decoding chooses its tokens, in words."""
    if generation.num_beams > 1:
        return f"beam search, width {generation.num_beams}"
    return "sampling" if generation.do_sample else "greedy"
