"""Image-text retrieval and multimodal pretraining on the built-in shapes world.

`mmt train retrieval` trains the dual encoder (ITC) and the matching head (ITM);
`mmt train pretrain` is the same task with the masked-LM and captioning terms on as well
(preset pretrain-small). A batch is B images of a seeded epoch order, each with one of its
5 captions drawn by a seeded generator.

Evaluation embeds every image and caption of a split and reports Recall@1/5/10 both ways:
image -> text (an image is right at K when any of its 5 captions is among the top K) and
text -> image (a caption is right at K when its own image is among the top K), first by
contrastive similarity alone, then with the top `rerank_k` candidates re-ordered by the
matching head: by its log-odds plus the contrastive logit (`rerank_adds_contrastive`, the
default), or by its log-odds alone.

Batches, evaluation and saving follow the `Task` protocol (`mmt.tasks.base`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from mmt import checkpoint, registry
from mmt.config import Settings
from mmt.data.images import Fit, to_pixels
from mmt.data.progress import bar
from mmt.data.worlds import shapes
from mmt.models.retrieval import RetrievalConfig, RetrievalModel
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

KS = (1, 5, 10)
# the shapes world's captions 1-3 list every object; 4-5 list them framed by a relation, counts
# or a superlative
SHAPES_CAPTION_GROUPS = {"listing": [0, 1, 2], "framed": [3, 4]}


@dataclasses.dataclass
class RetrievalRunConfig(Settings):
    """Everything a `mmt train retrieval` (or `pretrain`) run needs."""

    model: RetrievalConfig = dataclasses.field(default_factory=lambda: registry.preset("retrieval-small"))
    data: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)  # your own data (source.train=...) instead of `data`
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=2000, batch_size=64, lr=1e-3, warmup_steps=200, eval_every=500, save_every=500)
    )


@dataclasses.dataclass
class PretrainRunConfig(RetrievalRunConfig):
    """`mmt train pretrain`: ITC + ITM + MLM + captioning on the shapes captions."""

    model: RetrievalConfig = dataclasses.field(default_factory=lambda: registry.preset("pretrain-small"))
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=1500, batch_size=48, lr=1e-3, warmup_steps=200, eval_every=500, save_every=500)
    )


# ----------------------------------------------------------------------------- inference helpers


@torch.no_grad()
def encode_images(model: RetrievalModel, pixels: torch.Tensor, batch_size: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, E), image tokens (N, S, D)) of (N, 3, H, W) pixels, in batches."""
    model.eval()
    device = next(model.parameters()).device
    embs, tokens = [], []
    for start in bar(range(0, len(pixels), batch_size), desc="embed images", unit="batch"):
        t, pad = model.vision(pixels[start : start + batch_size].to(device))
        embs.append(model.image_embedding(t, pad).cpu())
        tokens.append(t.cpu())
    return torch.cat(embs), torch.cat(tokens)


@torch.no_grad()
def encode_texts(
    model: RetrievalModel, tokenizer: Tokenizer, texts: list[str], batch_size: int = 500
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(embeddings (N, E), per-text token states, per-text padding masks) of `texts`."""
    model.eval()
    device = next(model.parameters()).device
    embs, tokens, pads = [], [], []
    for start in bar(range(0, len(texts), batch_size), desc="embed texts", unit="batch"):
        ids, _ = tokenizer.batch(texts[start : start + batch_size], model.config.text.max_len)
        t, pad = model.text(ids.to(device))
        embs.append(model.text_embedding(t, pad).cpu())
        tokens += list(t.cpu())
        pads += list(pad.cpu())
    return torch.cat(embs), tokens, pads


def embed_texts(model: RetrievalModel, tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Unit-length embeddings (N, E) of texts."""
    return encode_texts(model, tokenizer, texts)[0]


@torch.no_grad()
def match_scores(
    model: RetrievalModel,
    text_tokens: list[torch.Tensor],
    text_padding: list[torch.Tensor],
    image_tokens: torch.Tensor,
    pairs: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """ITM log-odds for each (text index, image index) row of `pairs` (P, 2). Each image's
    cross-attention keys/values are projected once and shared by all its pairs."""
    model.eval()
    device = next(model.parameters()).device
    image_kv = model.fusion.project_context(image_tokens.to(device))
    scores = torch.empty(len(pairs))
    for start in bar(range(0, len(pairs), batch_size), desc="re-rank", unit="batch"):
        chunk = pairs[start : start + batch_size]
        texts = [text_tokens[i] for i in chunk[:, 0].tolist()]
        pads = [text_padding[i] for i in chunk[:, 0].tolist()]
        T = max(len(t) for t in texts)
        D = texts[0].shape[-1]
        tok = torch.zeros(len(chunk), T, D)
        pad = torch.ones(len(chunk), T, dtype=torch.bool)
        for r, (t, p) in enumerate(zip(texts, pads)):
            tok[r, : len(t)], pad[r, : len(p)] = t, p
        which = chunk[:, 1].to(device)
        fused = model.fusion(tok.to(device), [kv.select(which) for kv in image_kv], key_padding_mask=pad.to(device))
        logits = model.itm_head(fused[:, 0]).float()
        scores[start : start + len(chunk)] = (logits[:, 1] - logits[:, 0]).cpu()
    return scores


def recall_at(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """ranks: 0-based rank of the first right answer per query."""
    return {f"R@{k}": float((ranks < k).float().mean()) for k in ks}


def ranks_of(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best-ranked positive column of each row (ties count against it)."""
    best = similarity.masked_fill(~positive, -float("inf")).max(1).values
    return ((similarity >= best[:, None]) & ~positive).sum(1)  # a negative scoring the same ranks first


def rerank(similarity: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Similarity whose top-k columns per row (`candidates` (R, k)) are re-ordered by the
    matching scores (R, k) and stay above every other column."""
    out = similarity.clone()
    lifted = similarity.max() - similarity.min() + 1.0  # puts the re-ranked k above the rest
    rank_in_k = scores.argsort(1, descending=True).argsort(1).float()  # 0 = best match
    k = candidates.shape[1]
    out.scatter_(1, candidates, similarity.max() + lifted + (k - rank_in_k))
    return out


def retrieval_scores(
    model: RetrievalModel, tokenizer: Tokenizer, pixels: torch.Tensor, captions: list[list[str]], rerank_k: int | None = None,
    caption_groups: dict[str, list[int]] | None = None,
) -> dict[str, float]:
    """Recall@1/5/10, image->text and text->image, contrastive and (when the model has a
    matching head) with the top rerank_k re-ranked by it. `caption_groups` names sets of
    caption positions (e.g. {"listing": [0, 1, 2]}) for which text->image R@1 is also reported
    on its own."""
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])  # image of each text
    image_emb, image_tokens = encode_images(model, pixels)
    text_emb, text_tokens, text_padding = encode_texts(model, tokenizer, texts)
    t2i = text_emb @ image_emb.T  # (texts, images)
    positive = owner[:, None] == torch.arange(len(captions))[None]
    result = {}
    for name, sim, pos in (("t2i", t2i, positive), ("i2t", t2i.T, positive.T)):
        result |= {f"{name}_{k}": v for k, v in recall_at(ranks_of(sim, pos)).items()}
    if hasattr(model, "itm_head"):
        k = min(rerank_k or model.config.rerank_k, len(captions))
        for name, sim, pos in (("t2i", t2i, positive), ("i2t", t2i.T, positive.T)):
            candidates = sim.topk(k, dim=1).indices  # (R, k)
            rows = torch.arange(len(sim))[:, None].expand_as(candidates)
            if name == "t2i":
                pairs = torch.stack([rows.flatten(), candidates.flatten()], 1)
            else:
                pairs = torch.stack([candidates.flatten(), rows.flatten()], 1)
            scores = match_scores(model, text_tokens, text_padding, image_tokens, pairs).view(-1, k)
            if model.config.rerank_adds_contrastive:
                scores = scores + sim.gather(1, candidates) * model.scale().item()
            reranked = ranks_of(rerank(sim, candidates, scores), pos)
            result |= {f"{name}_{r}_rerank": v for r, v in recall_at(reranked).items()}
            if name == "t2i":
                t2i_reranked = reranked
    result["mean_recall"] = float(np.mean(list(result.values())))  # what picks the best checkpoint
    position = torch.tensor([j for caps in captions for j in range(len(caps))])
    for group, positions in (caption_groups or {}).items():
        chosen = torch.isin(position, torch.tensor(positions))
        result[f"t2i_R@1_{group}"] = recall_at(ranks_of(t2i[chosen], positive[chosen]), (1,))["R@1"]
        if hasattr(model, "itm_head"):
            result[f"t2i_R@1_rerank_{group}"] = recall_at(t2i_reranked[chosen], (1,))["R@1"]
    return result


@torch.no_grad()
def zero_shot(
    model: RetrievalModel, tokenizer: Tokenizer, pixels: torch.Tensor, labels: list[str], template: str = "{}"
) -> torch.Tensor:
    """Zero-shot classification: (N, L) probabilities that each image shows each label,
    a softmax over scale * cosine(image, template.format(label))."""
    if not labels:
        raise ValueError("zero-shot classification needs at least one label")
    if "{}" not in template:
        raise ValueError(f"template {template!r} needs a {{}} where the label goes")
    image_emb, _ = encode_images(model, pixels)
    label_emb = embed_texts(model, tokenizer, [template.format(label) for label in labels])
    return torch.softmax(model.scale().cpu() * image_emb @ label_emb.T, dim=1)


def format_recall(result: dict[str, float]) -> str:
    """Recall table: rows t2i / i2t (contrastive, re-ranked), columns R@1/5/10."""
    lines = [f"{'':28s}" + "".join(f"{f'R@{k}':>8s}" for k in KS)]
    for name, label in (("t2i", "text -> image"), ("i2t", "image -> text")):
        for suffix, how in (("", "contrastive"), ("_rerank", "+ ITM re-rank")):
            if f"{name}_R@1{suffix}" not in result:
                continue
            lines.append(f"{label + ' ' + how:28s}" + "".join(f"{100 * result[f'{name}_R@{k}{suffix}']:8.2f}" for k in KS))
    for group in SHAPES_CAPTION_GROUPS:
        if f"t2i_R@1_{group}" in result:
            rerank_part = f", re-ranked {100 * result[f't2i_R@1_rerank_{group}']:.2f}" if f"t2i_R@1_rerank_{group}" in result else ""
            lines.append(f"text -> image R@1, {group} captions: contrastive {100 * result[f't2i_R@1_{group}']:.2f}{rerank_part}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the task


class RetrievalTask(Task):
    name = "retrieval"
    run_config = RetrievalRunConfig
    cfg: RetrievalRunConfig

    def prepare(self, run_dir: Path) -> RetrievalConfig:
        cfg, model = self.cfg, copy.deepcopy(self.cfg.model)
        if cfg.source.train:
            train, val = own_image_texts(cfg.source, Fit.of(model.vision), run_dir, cfg.train)
            self.groups = None
            corpus = lambda: [c for caps in train.captions for c in caps]  # noqa: E731
        else:
            if model.vision.image_size != cfg.data.image_size:
                raise ValueError(
                    f"model.vision.image_size={model.vision.image_size} but data.image_size={cfg.data.image_size}: set them equal"
                )
            train_split, val_split, _ = shapes_splits(cfg.data, only=("train", "val"))
            train = ImageTexts(to_pixels(train_split.images), train_split.captions, {})
            val = ImageTexts(to_pixels(val_split.images), val_split.captions, {})
            self.groups = SHAPES_CAPTION_GROUPS
            # the vocabulary of the world's language (captions, questions, answers of the
            # training images), so a VQA or caption run can start from this one's weights
            corpus = lambda: shapes.corpus(train_split)  # noqa: E731
        self.tokenizer = init_tokenizer(run_dir, cfg.train, corpus)
        model.text.vocab_size = self.tokenizer.vocab_size
        self.stream = train if isinstance(train, StreamedShards) else None  # shards: images stream while training
        self.train_pixels = train.pixels if isinstance(train, ImageTexts) else None  # the built-in world, in memory
        # own files: decoded per batch by worker processes
        self.train_images = step_images(train.files, cfg.source, cfg.train, self._train_images) if isinstance(train, ImageTextFiles) else None
        self.val_pixels, self.val_captions = val.pixels, val.captions
        # every training caption once, image by image; image i owns rows start[i] .. start[i] + count[i] - 1
        flat = [c for caps in train.captions for c in caps]
        self.count = np.array([len(caps) for caps in train.captions])
        self.start = np.concatenate([[0], np.cumsum(self.count)[:-1]])
        self.text_ids, _ = self.tokenizer.batch(flat, 10_000)  # [CLS] caption [SEP]
        model.text.max_len = max(model.text.max_len, self.text_ids.shape[1])
        if model.losses.lm:
            self.caption_ids, _ = self.tokenizer.batch(flat, 10_000, wrap="bos_eos")
            model.caption_max_len = max(model.caption_max_len, self.caption_ids.shape[1])
        self.model_cfg = model
        return model

    def build_model(self, model_cfg: RetrievalConfig) -> RetrievalModel:
        return RetrievalModel(model_cfg)

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict[str, torch.Tensor]:
        """B images of seeded epoch permutations, one of each image's captions (seeded); share
        `part` of `parts`. Under DDP the contrastive loss still contrasts the whole batch."""
        B = self.cfg.train.batch_size
        if self.stream is not None:
            return self._streamed_batch(step, part, parts)
        images = epoch_order(self.cfg.train.seed, step, B, len(self.count))
        rng = np.random.default_rng([self.cfg.train.seed, 2_000_003, step])
        rows = torch.as_tensor(self.start[images] + rng.integers(0, self.count[images]))  # one caption per image
        share_of = share(np.arange(B), part, parts)
        images, rows = torch.as_tensor(images[share_of]), rows[share_of]
        ids = self.text_ids[rows]
        pixels = to_pixels(self.train_images.take(step, part, parts)) if self.train_images is not None else self.train_pixels[images]
        batch = {"pixels": pixels, "text_ids": ids[:, : int((ids != 0).sum(1).max())], "image_ids": images}
        if self.model_cfg.losses.lm:
            caps = self.caption_ids[rows]
            batch["caption_ids"] = caps[:, : int((caps != 0).sum(1).max())]
        return batch

    def _train_images(self, step: int, part: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, their slots in the step's batch) of share `part` of `parts` of step
        `step`: the images `train_batch` takes (`StepImages` decodes them ahead)."""
        B = self.cfg.train.batch_size
        slots = share(np.arange(B), part, parts)
        return epoch_order(self.cfg.train.seed, step, B, len(self.count))[slots], slots

    def _streamed_batch(self, step: int, part: int, parts: int) -> dict[str, torch.Tensor]:
        """train_batch from shards: the share's streamed images, one caption each (seeded);
        record indices identify images across processes."""
        pixels, captions, records = self.stream.samples(step, part, parts)
        rng = np.random.default_rng([self.cfg.train.seed, 2_000_003, step, part])
        texts = [caps[int(rng.integers(len(caps)))] for caps in captions]
        ids, _ = self.tokenizer.batch(texts, self.model_cfg.text.max_len)
        batch = {"pixels": pixels, "text_ids": ids, "image_ids": records}
        if self.model_cfg.losses.lm:
            batch["caption_ids"], _ = self.tokenizer.batch(texts, self.model_cfg.caption_max_len, wrap="bos_eos")
        return batch

    @staticmethod
    def batch_accuracy(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """In-batch text -> image accuracy of the contrastive embeddings."""
        return (out["pairs_correct"].item() if "pairs_correct" in out else 0.0), len(batch["image_ids"])

    def evaluate(self, model: RetrievalModel) -> dict[str, float]:
        return retrieval_scores(model, self.tokenizer, self.val_pixels, self.val_captions, caption_groups=self.groups)

    @staticmethod
    def headline(result: dict[str, float]) -> dict[str, float]:
        return {k: result[k] for k in ("t2i_R@1", "i2t_R@1", "t2i_R@1_rerank", "i2t_R@1_rerank") if k in result}

    @staticmethod
    def score(result: dict[str, float]) -> float:
        return result.get("mean_recall", 0.0)

    def format_result(self, result: dict[str, float]) -> str:
        return format_recall(result)

    def save_model(self, model: RetrievalModel, directory: Path) -> None:
        checkpoint.save_pretrained(model, directory, self.tokenizer)


    def test(self, model: RetrievalModel, tokenizer: Tokenizer, directory: Path, out: Path) -> tuple[dict, str]:
        """Recall@1/5/10 both ways on the test images and their captions, contrastive and, with a
        matching head, re-ranked (the model's rerank_k candidates)."""
        pixels, captions, shapes_test = test_image_texts(self.cfg, Fit.of(model.config.vision))
        groups = SHAPES_CAPTION_GROUPS if shapes_test is not None else None
        started = time.perf_counter()
        result = retrieval_scores(model, tokenizer, pixels, captions, caption_groups=groups)
        seconds = time.perf_counter() - started
        texts = sum(len(c) for c in captions)
        return result, f"{len(captions)} test images, {texts} captions, scored in {seconds:.1f}s\n{format_recall(result)}"


class PretrainTask(RetrievalTask):
    name = "pretrain"
    run_config = PretrainRunConfig


def load_for_inference(run_dir: str | Path) -> tuple[RetrievalModel, Tokenizer]:
    model, tokenizer, _ = checkpoint.load_for_inference(run_dir)
    if not isinstance(model, RetrievalModel):
        raise checkpoint.CheckpointError(f"{run_dir}: a {model.model_type} model; retrieval needs a retrieval or pretrain run")
    return model, tokenizer
