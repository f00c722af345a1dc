"""VQA on a built-in world (Sort-of-CLEVR, or the shapes world's QA) or your own data: data ->
batches, per-question-type evaluation, saving (the `Task` protocol, `mmt.tasks.base`). Works
with both answer heads: the classifier over an answer vocabulary and the decoder that writes
the answer (exact match counts). A curriculum (question types trained alone first) follows the
training through `observe`, and its end is kept in checkpoints (`state`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmt import checkpoint, registry
from mmt.config import Amount, Count, Fraction, Settings
from mmt.data.answers import AnswerVocab
from mmt.data.formats.shards import is_shard_dir
from mmt.data.images import Fit, to_pixels
from mmt.data.loader import ImageFiles, Pixels, decode_all
from mmt.data.progress import bar
from mmt.data.worlds import shapes, sort_of_clevr
from mmt.files import atomic_write_text
from mmt.generation import GenerationConfig
from mmt.models.vqa import VQAConfig, VQAModel
from mmt.tasks.base import Task
from mmt.tasks.common import (
    ShapesConfig,
    SourceConfig,
    StreamedShards,
    check_packed,
    checked_records,
    epoch_order,
    init_tokenizer,
    shapes_splits,
    share,
    step_images,
)
from mmt.text import Tokenizer
from mmt.train import TrainConfig

log = logging.getLogger(__name__)

ANSWERS_NAME = "answers.json"
UNKNOWN_ANSWER = -100  # F.cross_entropy's default ignore_index


@dataclasses.dataclass
class SortOfClevrConfig(Settings):
    """Which Sort-of-CLEVR to generate."""

    num_train: Count = 9800  # training images (20 questions each)
    num_test: Count = 200  # test images (20 questions each)
    seed: Amount = 0  # generation seed; train and test use different streams of it


@dataclasses.dataclass
class VQARunConfig(Settings):
    """Everything a `mmt train vqa` run needs."""

    model: VQAConfig = dataclasses.field(default_factory=lambda: registry.preset("vqa-fast"))
    dataset: Literal["sort-of-clevr", "shapes"] = "sort-of-clevr"  # which built-in world to train on
    data: SortOfClevrConfig = dataclasses.field(default_factory=SortOfClevrConfig)  # dataset=sort-of-clevr
    shapes: ShapesConfig = dataclasses.field(default_factory=ShapesConfig)  # dataset=shapes
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)  # your own data (source.train=...) instead of `dataset`
    # curriculum: for the first curriculum_steps steps, train only on questions of these types
    # (rows of the accuracy table); off unless the training questions have every one of them.
    # On Sort-of-CLEVR, all questions from the start stall on a plateau for thousands of steps;
    # the non-relational ones first teach the model to find the named object, and "count"
    # ones learned beside them keep it finding that object when the other relational
    # questions arrive (without them, some seeds unlearned it there and stalled; docs/lab-notes.md).
    curriculum: tuple[str, ...] = ("non-relational", "count")
    curriculum_steps: Amount = 3000  # the curriculum's length (with curriculum_until: its longest)
    # end the curriculum early, at the first training log (every train.log_every steps) whose
    # training accuracy on its questions reaches this (0: it always lasts curriculum_steps).
    # How soon a run learns its curriculum questions varies with the seed: a fixed length
    # wastes steps on a quick run and lets the rest in too early on a slow one.
    curriculum_until: Fraction = 0.97
    # the Sort-of-CLEVR recipe trains with torch's fused attention kernel everywhere: its accuracy
    # was established with it (docs/lab-notes.md, 2026-11-28), though on a CPU in bf16 the
    # literal formula is faster where attention has no score bias
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            steps=6800, batch_size=32, lr=6e-4, warmup_steps=200, eval_every=250, save_every=250, attention="fused"
        )
    )
    # decoding of the generative head (model.head=generate) in evaluation; greedy by default
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)


@dataclasses.dataclass(frozen=True)
class Question:
    """One question of either world, as the VQA task sees it."""

    image_index: int
    text: str
    answer: str
    types: tuple[str, ...]  # rows of the accuracy table it counts in, "overall" first
    human_answers: tuple[str, ...] = ()  # your own data: every human answer (VQA v2 has 10)


@dataclasses.dataclass
class VQASplit:
    images: np.ndarray | Pixels | ImageFiles  # (N, H, W, 3) uint8 (own data: as `Pixels`), or own image files not decoded yet
    questions: list[Question]


def own_question(image_index: int, question: str, answers: list[str], consensus: str | None, answer_type: str) -> Question:
    """A question of your own data: answered by the official consensus answer, else the most
    frequent human answer; typed by answer type ("yes/no", "number", "other")."""
    from mmt.data.formats.vqa_v2 import most_frequent

    return Question(image_index, question, consensus or most_frequent(answers), ("overall", answer_type or "other"), tuple(answers))


def packed_question(image_index: int, meta: dict) -> Question:
    """`own_question` of a packed VQA record (a shard sample's JSON)."""
    return own_question(image_index, meta["question"], meta["answers"], meta.get("multiple_choice_answer"), meta.get("answer_type", ""))


def own_split(path: str, src: SourceConfig, size: int | Fit) -> VQASplit:
    """A VQA v2 or JSON Lines source, or a shard folder of one (`mmt data pack`), as a split:
    images in order of first use, questions as `own_question` makes them."""
    from mmt.data.formats.records import DataError, VQARecord
    from mmt.data.formats.shards import is_shard_dir, iter_packed
    from mmt.data.images import load_image

    if is_shard_dir(path):  # images were checked when packed; each is decoded once
        image_of: dict[str, int] = {}
        images, questions = [], []
        for meta, data in iter_packed(path):
            check_packed(path, meta, "vqa")
            if meta["image_path"] not in image_of:
                image_of[meta["image_path"]] = len(images)
                images.append(load_image(data, size, f"{path}: sample {meta['index']}"))
            questions.append(packed_question(image_of[meta["image_path"]], meta))
        if not images:
            raise DataError(path, "shards", "no samples")
        return VQASplit(Pixels(np.stack(images)), questions)
    records, skipped = checked_records(path, src)
    if skipped:
        log.warning(f"{path}: skipped bad records (source.skip_bad): {skipped}")
    if not records or not all(isinstance(r, VQARecord) for r in records):
        raise DataError(path, "records", "needs question-answer records (VQA v2 questions + annotations, or JSON Lines with question and answer)")
    image_of: dict[str, int] = {}
    first: list = []  # the first record of each image, which names it in errors
    questions = []
    for r in records:
        if not r.answers:
            raise DataError(path, r.where or f"question {r.question_id}", "has no answers (a test split without annotations cannot train or score)")
        index = image_of.setdefault(str(r.image_path), len(image_of))
        if index == len(first):
            first.append(r)
        questions.append(own_question(index, r.question, r.answers, r.multiple_choice_answer, r.answer_type))
    return VQASplit(ImageFiles.of_records(first, size if isinstance(size, Fit) else Fit(size)), questions)


def decoded_split(split: VQASplit, src: SourceConfig, desc: str) -> VQASplit:
    """`split` with its own image files decoded once into memory (uint8; evaluation data);
    with source.skip_bad an image that does not decode is left out with its questions."""
    if not isinstance(split.images, ImageFiles):
        return split
    images, kept, bad = decode_all(split.images, src.workers, src.skip_bad, desc)
    return _kept(split, Pixels(images), kept, bad)


def fully_checked_split(split: VQASplit, src: SourceConfig) -> VQASplit:
    """With source.skip_bad, a training split of image files less the images that do not
    decode (each decoded once, by source.workers processes) and their questions."""
    if not src.skip_bad or not isinstance(split.images, ImageFiles):
        return split
    _, kept, bad = decode_all(split.images, src.workers, skip_bad=True, desc="check images", keep=False)
    return _kept(split, split.images.subset(kept), kept, bad)


def _kept(split: VQASplit, images, kept: list[int], bad) -> VQASplit:
    """`split` with only the images `kept` (now `images`) and their questions, re-indexed."""
    if bad.total:
        log.warning(f"skipped images that do not decode (source.skip_bad): {dict(bad.counts)}")
    new_index = {old: new for new, old in enumerate(kept)}
    questions = [dataclasses.replace(q, image_index=new_index[q.image_index]) for q in split.questions if q.image_index in new_index]
    return VQASplit(images, questions)


def _subset(split: VQASplit, first: int, last: int) -> VQASplit:
    """Images first..last-1 of a split with their questions (re-indexed)."""
    questions = [dataclasses.replace(q, image_index=q.image_index - first) for q in split.questions if first <= q.image_index < last]
    images = split.images.subset(slice(first, last)) if isinstance(split.images, ImageFiles) else split.images[first:last]
    return VQASplit(images, questions)


def load_split(cfg: VQARunConfig, which: Literal["train", "val", "test"], read: dict[str, VQASplit] | None = None) -> VQASplit:
    """A split of the configured world, or of your own data (source.train; validation is
    source.val or the last 10% of the training images; test is source.test, else source.val).
    Sort-of-CLEVR has no validation split: its test split serves. `read` keeps source.train
    as read for the train split, so the held-out tail does not read and check it again."""
    src = cfg.source
    if src.train:
        size = Fit.of(cfg.model.vision)
        if which == "test" or (which == "val" and src.val):
            path = src.test if which == "test" and src.test else src.val
            if not path:
                raise ValueError("this run trained on source.train with a held-out validation tail; give --set source.test=FILE")
            return decoded_split(own_split(path, src, size), src, f"load {Path(path).name}")
        train = read[src.train] if read is not None and src.train in read else own_split(src.train, src, size)
        if read is not None:
            read[src.train] = train
        if src.val:
            return fully_checked_split(train, src)
        n = len(train.images)
        if n < 2:
            raise ValueError(f"{src.train}: {n} usable image(s); give source.val or more training images")
        held = min(1000, max(1, n // 10))
        if which == "train":
            return fully_checked_split(_subset(train, 0, n - held), src)
        return decoded_split(_subset(train, n - held, n), src, "load validation images")
    if cfg.dataset == "shapes":
        train, val, test = shapes_splits(cfg.shapes, only=(which,))
        split = {"train": train, "val": val, "test": test}[which]
        questions = [Question(i, qa.question, qa.answer, ("overall", qa.qtype)) for i, qas in enumerate(split.qa) for qa in qas]
        return VQASplit(split.images, questions)
    data = cfg.data
    train, test = sort_of_clevr.splits(data.num_train if which == "train" else 0, data.num_test if which != "train" else 0, data.seed)
    split = train if which == "train" else test
    return VQASplit(split.images, [Question(q.image_index, q.text, q.answer, question_types(q)) for q in split.questions])


class QuestionSet:
    """One split, tokenised: pixels, question ids, answers and which image each question is about.

    Answers are class ids (classifier head) or token ids [BOS] answer [EOS] (generative head).
    """

    def __init__(self, split: VQASplit, tokenizer: Tokenizer, vocab: AnswerVocab | None, model: VQAConfig):
        self.split, self.tokenizer = split, tokenizer
        # (N, 3, H, W): float for a built-in world; own data as uint8 `Pixels`, or, for
        # training images left on disk, None (`VQATask.train_batch` has them decoded)
        self.pixels = split.images if isinstance(split.images, Pixels) else None if isinstance(split.images, ImageFiles) else to_pixels(split.images)
        texts = sorted({q.text for q in split.questions})  # templates repeat: tokenise each sentence once
        ids, _ = tokenizer.batch(texts, model.text.max_len, wrap="cls")
        row = {t: i for i, t in enumerate(texts)}
        self.question_ids = ids[[row[q.text] for q in split.questions]]  # (Q, T)
        if model.head == "generate":
            self.answers, _ = tokenizer.batch([q.answer for q in split.questions], model.answer_max_len, wrap="bos_eos")
            # what a perfect model writes, as text: answers pass through the tokenizer's normalisation
            self.answer_texts = [tokenizer.decode(row) for row in self.answers]
        elif any(len(q.human_answers) > 1 for q in split.questions):
            # several human answers (VQA v2): soft targets min(1, k/3) for an answer k humans
            # gave; the classifier trains on them with binary cross-entropy, and a prediction
            # scores its answer's target (the usual VQA accuracy)
            from mmt.data.formats.vqa_v2 import soft_scores

            self.answers = torch.zeros(len(split.questions), len(vocab))
            for i, q in enumerate(split.questions):
                for answer, score in soft_scores(q.human_answers or (q.answer,)).items():
                    if answer in vocab.index:
                        self.answers[i, vocab.index[answer]] = score
        else:
            # an answer outside the vocabulary can never be predicted: it counts as wrong in
            # evaluation and is ignored by the training loss (cross-entropy's ignore index)
            self.answers = torch.tensor([vocab.index.get(q.answer, UNKNOWN_ANSWER) for q in split.questions])
        self.questions_of_image = self.rows_by_image()

    def rows_by_image(self, types: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """Each image's question rows; with `types`, only questions of one of those types."""
        by_image = defaultdict(list)
        for i, q in enumerate(self.split.questions):
            if not types or set(types) & set(q.types):
                by_image[q.image_index].append(i)
        return [torch.tensor(by_image[i], dtype=torch.long) for i in range(len(self.split.images))]

    def batch(self, images: np.ndarray, questions_of_image: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """All questions about `images` (indices into the split), or those `questions_of_image` lists."""
        per_image = [(questions_of_image or self.questions_of_image)[i] for i in images]
        rows = torch.cat(per_image)
        counts = torch.tensor([len(r) for r in per_image])
        answers = self.answers[rows]
        if answers.ndim == 2 and not answers.is_floating_point():  # answer tokens: drop all-padding columns
            answers = answers[:, : int((answers != 0).sum(1).max())]
        return {
            **({"pixels": self.pixels[torch.as_tensor(images)]} if self.pixels is not None else {}),
            "question_ids": self.question_ids[rows],
            "answers": answers,
            "image_index": torch.arange(len(images)).repeat_interleave(counts),  # rows come image by image
        }


class VQATask(Task):
    name = "vqa"
    run_config = VQARunConfig
    cfg: VQARunConfig

    def prepare(self, run_dir: Path) -> VQAConfig:
        cfg, model = self.cfg, copy.deepcopy(self.cfg.model)
        size = cfg.shapes.image_size if cfg.dataset == "shapes" else sort_of_clevr.IMAGE_SIZE
        if model.vision.image_size != size and not cfg.source.train:  # own data is resized to the model
            key = "shapes.image_size" if cfg.dataset == "shapes" else "the Sort-of-CLEVR image size"
            raise ValueError(f"model.vision.image_size={model.vision.image_size} but {key} is {size}: set model.vision.image_size={size}")
        self.stream = None
        read: dict[str, VQASplit] = {}  # own data: source.train read once for training and its held-out tail
        if is_shard_dir(cfg.source.train):  # shards: questions read up front, images streamed while training
            if not cfg.source.val:
                raise ValueError(f"{cfg.source.train}: training from shards streams the data; give validation data as source.val (a file or a shard folder)")
            self.stream = StreamedShards(cfg.source, Fit.of(model.vision), cfg.train, "vqa")
            train = VQASplit(np.zeros((0, 1, 1, 3), np.uint8), [packed_question(0, meta) for meta in self.stream.records])
            report = {"train_questions": len(train.questions), "skipped_train": self.stream.skipped}
            atomic_write_text(run_dir / "data_report.json", json.dumps(report, indent=2) + "\n")
        else:
            train = load_split(cfg, "train", read)
        answers_path = run_dir / ANSWERS_NAME
        # answers are texts too: the generative head writes them
        self.tokenizer = init_tokenizer(run_dir, cfg.train, lambda: [q.text for q in train.questions] + [q.answer for q in train.questions])
        if answers_path.is_file():  # resuming: reuse the run's own
            self.vocab = AnswerVocab.load(answers_path)
        else:
            # ranked by training frequency; answers the dataset defines but this (small)
            # training split never uses still get a class, so the head always covers them
            seen = AnswerVocab.build(q.answer for q in train.questions).answers
            defined = sort_of_clevr.ANSWERS if cfg.dataset == "sort-of-clevr" and not cfg.source.train else ()
            answers = seen + [a for a in defined if a not in seen]
            source = checkpoint.model_directory(cfg.train.init) / ANSWERS_NAME if cfg.train.init else None
            if source is not None and source.is_file():  # --init from a VQA run: its classes keep their rows, new answers follow
                kept = AnswerVocab.load(source).answers
                answers = kept + [a for a in answers if a not in kept]
            self.vocab = AnswerVocab(answers)
            self.vocab.save(answers_path)
        model.text.vocab_size = self.tokenizer.vocab_size
        model.num_answers = len(self.vocab)
        if model.head == "generate":  # the decoder's positions must cover the longest training answer
            answer_ids, _ = self.tokenizer.batch(sorted({q.answer for q in train.questions}), 10_000, wrap="bos_eos")
            model.answer_max_len = max(model.answer_max_len, answer_ids.shape[1])
        self.model_cfg = model
        self.train_set = None if self.stream else QuestionSet(train, self.tokenizer, self.vocab, model)
        self.train_images = None
        if isinstance(train.images, ImageFiles):  # own image files: decoded per batch
            self.train_images = step_images(train.images, cfg.source, cfg.train, self._train_images)
        self.curriculum_rows = None  # each image's curriculum questions, while the curriculum lasts
        self.curriculum_end = cfg.curriculum_steps  # the first step that trains on all questions
        if cfg.curriculum_steps > 0 and cfg.curriculum and self.stream is not None:
            log.info("curriculum: not applied to data streamed from shards; training on all questions from the start")
        elif cfg.curriculum_steps > 0 and cfg.curriculum:
            present = {t for q in self.train_set.split.questions for t in q.types}
            missing = [t for t in cfg.curriculum if t not in present]  # a curriculum for other data
            if not missing:
                rows = self.train_set.rows_by_image(tuple(cfg.curriculum))
                count = sum(len(r) for r in rows)
                self.curriculum_rows = rows
                kinds = f"{count:,} {'/'.join(cfg.curriculum)} questions"
                early = f"; it ends early if their training accuracy reaches {cfg.curriculum_until:g}" if cfg.curriculum_until else ""
                if cfg.curriculum_steps >= cfg.train.steps:  # a run shorter than the curriculum never leaves it
                    log.info(f"curriculum: all {cfg.train.steps} steps train on {kinds} (curriculum_steps={cfg.curriculum_steps}){early}")
                else:
                    log.info(f"curriculum: steps 1-{cfg.curriculum_steps} train on {kinds}, then on all{early}")
            else:
                log.info(f"curriculum: no training question has type {'/'.join(missing)}; training on all questions from the start")
        which = "val" if cfg.dataset == "shapes" or cfg.source.train else "test"
        self.eval_set = QuestionSet(load_split(cfg, which, read), self.tokenizer, self.vocab, model)
        return model

    def build_model(self, model_cfg: VQAConfig) -> VQAModel:
        return VQAModel(model_cfg)

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict[str, torch.Tensor]:
        """Images of seeded epoch permutations, each with all its questions (during the
        curriculum: its curriculum questions), share `part` of `parts`; from shards, the
        share's streamed questions, each with its image."""
        if self.stream is not None:
            taken = self.stream.take(step, part, parts)
            split = VQASplit(np.stack([image for image, _ in taken]), [packed_question(i, meta) for i, (_, meta) in enumerate(taken)])
            return QuestionSet(split, self.tokenizer, self.vocab, self.model_cfg).batch(np.arange(len(taken)))
        images, _ = self._train_images(step, part, parts)
        rows = self.curriculum_rows if self.curriculum_rows is not None and step < self.curriculum_end else None
        batch = self.train_set.batch(images, rows)
        if self.train_images is not None:  # own image files, decoded ahead by worker processes
            batch = {"pixels": to_pixels(self.train_images.take(step, part, parts)), **batch}
        return batch

    def _train_images(self, step: int, part: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, their slots in the step's batch) of share `part` of `parts` of step
        `step` (`StepImages` decodes them ahead for own data)."""
        B = self.cfg.train.batch_size
        slots = share(np.arange(B), part, parts)
        return epoch_order(self.cfg.train.seed, step, B, len(self.train_set.questions_of_image))[slots], slots

    def observe(self, step: int, record: dict) -> dict:
        """Called with each training log record (`step` steps done; its accuracy is summed over
        all processes, so every process decides alike). Ends the curriculum once that accuracy
        reaches `curriculum_until`; returns what to add to the record."""
        until = self.cfg.curriculum_until
        if self.curriculum_rows is None or not until or step >= self.curriculum_end or record["train_accuracy"] < until:
            return {}
        self.curriculum_end = step
        log.info(f"curriculum: training accuracy {record['train_accuracy']:.4f} reached {until:g} at step {step}; all questions from here")
        return {"curriculum_end": step}

    def state(self) -> dict:
        """What a resumed run must restore (saved with each checkpoint)."""
        return {"curriculum_end": self.curriculum_end}

    def load_state(self, state: dict) -> None:
        self.curriculum_end = state.get("curriculum_end", self.cfg.curriculum_steps)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms the batch's loss is the mean of: its questions, or with a generative
        head its answer tokens (the trainer weighs micro-steps by it)."""
        answers = batch["answers"]
        if self.model_cfg.head == "generate":
            return int((answers[:, 1:] != self.model_cfg.text.pad_id).sum())
        return len(answers)

    @staticmethod
    def batch_accuracy(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        if "answers_correct" in out:  # generative head
            return out["answers_correct"].item(), len(batch["answers"])
        predicted = out["answer_logits"].argmax(-1)
        if batch["answers"].is_floating_point():  # soft targets: the predicted answer's score
            return batch["answers"].gather(1, predicted[:, None]).sum().item(), len(predicted)
        return (predicted == batch["answers"]).sum().item(), len(predicted)

    @staticmethod
    @torch.no_grad()
    def predictions_correct(
        model: VQAModel, questions: QuestionSet, images_per_batch: int = 50, generation: GenerationConfig | None = None
    ) -> np.ndarray:
        """How right the model answers each question of the split: 1 or 0 (generative: exact
        text, decoded with `generation`, greedy by default), or with soft targets the predicted
        answer's score min(1, k/3)."""
        model.eval()
        device = next(model.parameters()).device
        correct = np.zeros(len(questions.split.questions), dtype=float)
        n = len(questions.questions_of_image)
        for start in bar(range(0, n, images_per_batch), desc="answer", unit="batch"):
            images = np.arange(start, min(n, start + images_per_batch))
            batch = {k: v.to(device) for k, v in questions.batch(images).items()}
            rows = torch.cat([questions.questions_of_image[i] for i in images]).numpy()
            if model.config.head == "generate":
                out = model.generate_answers(batch["pixels"], batch["question_ids"], batch["image_index"], generation)
                ids = out.ids[:, 0].cpu()
                correct[rows] = [questions.tokenizer.decode(row) == questions.answer_texts[r] for row, r in zip(ids, rows)]
            else:
                logits = model.answer_logits(batch["pixels"], batch["question_ids"], batch["image_index"])
                predicted = logits.argmax(-1).cpu()
                targets = questions.answers[rows]
                if targets.is_floating_point():
                    correct[rows] = targets.gather(1, predicted[:, None]).squeeze(1).numpy()
                else:
                    correct[rows] = (predicted == targets).numpy()
        return correct

    def evaluate(self, model: VQAModel, questions: QuestionSet | None = None) -> dict[str, float]:
        """Accuracy overall and per question type."""
        questions = questions or self.eval_set
        correct = self.predictions_correct(model, questions, generation=self.cfg.generation)
        groups: dict[str, list[float]] = {}
        for ok, q in zip(correct, questions.split.questions):
            for key in q.types:
                groups.setdefault(key, []).append(float(ok))
        if "non-relational" in groups:  # Sort-of-CLEVR: families, then subtypes
            order = ["overall", "non-relational", "relational", *sort_of_clevr.NON_RELATIONAL, *sort_of_clevr.RELATIONAL]
        else:  # the shapes world's question types, or your own data's answer types
            order = ["overall", *shapes.QTYPES, *sorted(k for k in groups if k != "overall" and k not in shapes.QTYPES)]
        return {k: float(np.mean(groups[k])) for k in order if k in groups}

    @staticmethod
    def headline(result: dict[str, float]) -> dict[str, float]:
        return {k: result[k] for k in ("overall", "non-relational", "relational") if k in result}

    @staticmethod
    def score(result: dict[str, float]) -> float:
        return result.get("overall", 0.0)

    def format_result(self, result: dict[str, float]) -> str:
        return format_table(result)

    def save_model(self, model: VQAModel, directory: Path) -> None:
        checkpoint.save_pretrained(model, directory, self.tokenizer)
        self.vocab.save(directory / ANSWERS_NAME)

    def test(self, model: VQAModel, tokenizer: Tokenizer, directory: Path, out: Path) -> tuple[dict, str]:
        """Accuracy per question type on the test split (the run's own data: source.test, else source.val)."""
        test = load_split(self.cfg, "test")
        vocab = AnswerVocab.load(directory / ANSWERS_NAME, model.config.num_answers if model.config.head == "classify" else None)
        result = self.evaluate(model, QuestionSet(test, tokenizer, vocab, model.config))
        return result, format_table(result, counts_by_type(test.questions))


def format_table(result: dict[str, float], counts: dict[str, int] | None = None) -> str:
    """Accuracy per question type as a text table."""
    lines = [f"{'question type':<16} {'accuracy':>9}" + (f" {'questions':>10}" if counts else "")]
    for key, value in result.items():
        subtype = key in sort_of_clevr.NON_RELATIONAL + sort_of_clevr.RELATIONAL and "non-relational" in result
        indent = "  " if subtype or key in shapes.QTYPES else ""
        extra = f" {counts[key]:>10}" if counts else ""
        lines.append(f"{indent + key:<16} {value * 100:>8.2f}%{extra}")
    return "\n".join(lines)


def question_types(q: sort_of_clevr.Question) -> tuple[str, str, str]:
    """The rows of the accuracy table a question counts in."""
    return ("overall", q.family, q.subtype)


def counts_by_type(questions: list[Question]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for q in questions:
        for key in q.types:
            counts[key] += 1
    return counts
