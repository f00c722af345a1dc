"""VQA on the built-in Sort-of-CLEVR: data -> batches, per-question-type evaluation, saving.

The trainer (`mmt.train`) calls: prepare, build_model, train_batch, batch_accuracy,
evaluate, headline, score, save_model.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mmt import checkpoint, registry
from mmt.data import sort_of_clevr
from mmt.data.answers import AnswerVocab
from mmt.data.transforms import to_pixels
from mmt.models.vqa import VQAConfig, VQAModel
from mmt.text import Tokenizer
from mmt.train import TrainConfig

ANSWERS_NAME = "answers.json"
UNKNOWN_ANSWER = -100  # F.cross_entropy's default ignore_index


@dataclasses.dataclass
class SortOfClevrConfig:
    """Which Sort-of-CLEVR to generate."""

    num_train: int = 9800  # training images (20 questions each)
    num_test: int = 200  # test images (20 questions each)
    seed: int = 0  # generation seed; train and test use different streams of it


@dataclasses.dataclass
class VQARunConfig:
    """Everything a `mmt train vqa` run needs."""

    model: VQAConfig = dataclasses.field(default_factory=lambda: registry.preset("vqa-small"))
    data: SortOfClevrConfig = dataclasses.field(default_factory=SortOfClevrConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(steps=1700, batch_size=32, lr=6e-4, warmup_steps=200, eval_every=250, save_every=250)
    )


class QuestionSet:
    """One split, tokenised: pixels, question ids, answer ids and which image each question is about."""

    def __init__(self, split: sort_of_clevr.SortOfClevr, tokenizer: Tokenizer, vocab: AnswerVocab, max_len: int):
        self.split = split
        self.pixels = to_pixels(split.images)  # (N, 3, 75, 75)
        texts = sorted({q.text for q in split.questions})  # templates repeat: tokenise each sentence once
        ids, _ = tokenizer.batch(texts, max_len, wrap="cls")
        row = {t: i for i, t in enumerate(texts)}
        self.question_ids = ids[[row[q.text] for q in split.questions]]  # (Q, T)
        # an answer outside the vocabulary can never be predicted: it counts as wrong in
        # evaluation and is ignored by the training loss (cross-entropy's ignore index)
        self.answers = torch.tensor([vocab.index.get(q.answer, UNKNOWN_ANSWER) for q in split.questions])
        by_image = defaultdict(list)
        for i, q in enumerate(split.questions):
            by_image[q.image_index].append(i)
        self.questions_of_image = [torch.tensor(by_image[i]) for i in range(len(split.images))]

    def batch(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """All questions about `images` (indices into the split)."""
        per_image = [self.questions_of_image[i] for i in images]
        rows = torch.cat(per_image)
        counts = torch.tensor([len(r) for r in per_image])
        return {
            "pixels": self.pixels[torch.as_tensor(images)],
            "question_ids": self.question_ids[rows],
            "answers": self.answers[rows],
            "image_index": torch.arange(len(images)).repeat_interleave(counts),  # rows come image by image
        }


class VQATask:
    name = "vqa"

    def __init__(self, cfg: VQARunConfig):
        self.cfg = cfg

    def prepare(self, run_dir: Path) -> None:
        data = self.cfg.data
        train, test = sort_of_clevr.splits(data.num_train, data.num_test, data.seed)
        tokenizer_path, answers_path = run_dir / checkpoint.TOKENIZER_NAME, run_dir / ANSWERS_NAME
        if tokenizer_path.is_file() and answers_path.is_file():  # resuming: reuse the run's own
            self.tokenizer, self.vocab = Tokenizer.load(tokenizer_path), AnswerVocab.load(answers_path)
        else:
            self.tokenizer = Tokenizer.train((q.text for q in train.questions), kind="word")
            # ranked by training frequency; answers the dataset defines but this (small)
            # training split never uses still get a class, so the head always covers them
            seen = AnswerVocab.build(q.answer for q in train.questions).answers
            self.vocab = AnswerVocab(seen + [a for a in sort_of_clevr.ANSWERS if a not in seen])
            self.tokenizer.save(tokenizer_path)
            self.vocab.save(answers_path)
        model = self.cfg.model
        model.text.vocab_size = self.tokenizer.vocab_size
        model.num_answers = len(self.vocab)
        self.train_set = QuestionSet(train, self.tokenizer, self.vocab, model.text.max_len)
        self.test_set = QuestionSet(test, self.tokenizer, self.vocab, model.text.max_len)

    def build_model(self) -> VQAModel:
        return VQAModel(self.cfg.model)

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        """Images step*B .. step*B+B-1 of an endless sequence of seeded epoch permutations."""
        B, n = self.cfg.train.batch_size, len(self.train_set.questions_of_image)
        positions = np.arange(step * B, (step + 1) * B)
        epochs = positions // n
        images = np.empty(B, dtype=np.int64)
        for epoch in np.unique(epochs):
            order = np.random.default_rng([self.cfg.train.seed, int(epoch)]).permutation(n)
            images[epochs == epoch] = order[positions[epochs == epoch] % n]
        return self.train_set.batch(images)

    @staticmethod
    def batch_accuracy(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        correct = (out["answer_logits"].argmax(-1) == batch["answers"]).sum().item()
        return correct, len(batch["answers"])

    @torch.no_grad()
    def predict_split(self, model: VQAModel, questions: QuestionSet, images_per_batch: int = 50) -> torch.Tensor:
        """Predicted answer id for every question of the split."""
        model.eval()
        device = next(model.parameters()).device
        predictions = torch.empty(len(questions.answers), dtype=torch.long)
        n = len(questions.questions_of_image)
        for start in range(0, n, images_per_batch):
            images = np.arange(start, min(n, start + images_per_batch))
            batch = questions.batch(images)
            rows = torch.cat([questions.questions_of_image[i] for i in images])
            logits = model.answer_logits(
                batch["pixels"].to(device), batch["question_ids"].to(device), batch["image_index"].to(device)
            )
            predictions[rows] = logits.argmax(-1).cpu()
        return predictions

    def evaluate(self, model: VQAModel, questions: QuestionSet | None = None) -> dict[str, float]:
        """Accuracy overall, per family (non-relational / relational) and per subtype."""
        questions = questions or self.test_set
        correct = (self.predict_split(model, questions) == questions.answers).numpy()
        groups: dict[str, list[bool]] = defaultdict(list)
        for ok, q in zip(correct, questions.split.questions):
            for key in question_types(q):
                groups[key].append(bool(ok))
        order = ["overall", "non-relational", "relational", *sort_of_clevr.NON_RELATIONAL, *sort_of_clevr.RELATIONAL]
        return {k: float(np.mean(groups[k])) for k in order if groups[k]}

    @staticmethod
    def headline(result: dict[str, float]) -> dict[str, float]:
        return {k: result[k] for k in ("overall", "non-relational", "relational") if k in result}

    @staticmethod
    def score(result: dict[str, float]) -> float:
        return result.get("overall", 0.0)

    def save_model(self, model: VQAModel, directory: Path) -> None:
        checkpoint.save_pretrained(model, directory, self.tokenizer)
        self.vocab.save(directory / ANSWERS_NAME)


def format_table(result: dict[str, float], counts: dict[str, int] | None = None) -> str:
    """Accuracy per question type as a text table."""
    lines = [f"{'question type':<16} {'accuracy':>9}" + (f" {'questions':>10}" if counts else "")]
    for key, value in result.items():
        indent = "  " if key in sort_of_clevr.NON_RELATIONAL + sort_of_clevr.RELATIONAL else ""
        extra = f" {counts[key]:>10}" if counts else ""
        lines.append(f"{indent + key:<16} {value * 100:>8.2f}%{extra}")
    return "\n".join(lines)


def load_for_inference(run_dir: str | Path) -> tuple[VQAModel, Tokenizer, AnswerVocab]:
    """The model a VQA run saved (run_dir/model, or a model directory itself)."""
    directory = Path(run_dir)
    if (directory / "model" / checkpoint.CONFIG_NAME).is_file():
        directory = directory / "model"
    model = checkpoint.from_pretrained(directory).eval()
    tokenizer = checkpoint.load_tokenizer(directory)
    if tokenizer is None:
        raise checkpoint.CheckpointError(f"{directory}: no tokenizer.json beside the model")
    return model, tokenizer, AnswerVocab.load(directory / ANSWERS_NAME)


def question_types(q: sort_of_clevr.Question) -> tuple[str, str, str]:
    """The rows of the accuracy table a question counts in."""
    return ("overall", q.family, q.subtype)


def counts_by_type(questions: list[sort_of_clevr.Question]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for q in questions:
        for key in question_types(q):
            counts[key] += 1
    return counts
