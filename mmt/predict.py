"""Use a trained run: answer questions (VQA), caption images (captioning) or classify
images zero-shot among text labels (retrieval / pretraining), one at a time or a JSON
Lines file of them.

Batch mode never loses work to one bad line: a missing or corrupt image, an empty
question or an unreadable line gets `{"error": ...}` in its output line (and a message
on stderr naming the line); every other line is answered, in input order, and the exit
code is 1 when any line failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmt import checkpoint
from mmt.data.answers import AnswerVocab
from mmt.data.transforms import ImageError, load_image, to_pixels
from mmt.generation import GenerationConfig

BATCH = 64  # inputs handled per forward pass


class _Answerer:
    """VQA: one answer + softmax score per (image, question)."""

    empty_result = {"answer": None, "score": None}

    def __init__(self, model, tokenizer, directory: Path, generation: GenerationConfig):
        from mmt.tasks.vqa import ANSWERS_NAME

        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.vocab = AnswerVocab.load(directory / ANSWERS_NAME)
        self.size = model.config.vision.image_size

    def parse(self, record: dict[str, Any], base: Path) -> tuple:
        question = _check_question(record.get("question"))
        return load_image(Path(base, _image_key(record)), self.size), question

    @torch.no_grad()
    def __call__(self, items: list[tuple]) -> list[dict[str, Any]]:
        pixels = to_pixels(np.stack([image for image, _ in items]))
        ids, _ = self.tokenizer.batch([q for _, q in items], self.model.config.text.max_len, wrap="cls")
        if self.model.config.head == "generate":  # the answer's probability under the decoder
            out = self.model.generate_answers(
                pixels, ids, config=self.generation, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id
            )
            return _ranked("answer", self.tokenizer, out.ids, out.scores.exp())
        probs = self.model.answer_logits(pixels, ids).float().softmax(-1)
        score, best = probs.max(-1)
        return [{"answer": self.vocab.answers[i], "score": round(s, 4)} for i, s in zip(best.tolist(), score.tolist())]


class _Captioner:
    """Captioning: the best caption (or `num_return` of them) per image, with log-probability scores."""

    empty_result = {"caption": None, "score": None}

    def __init__(self, model, tokenizer, generation: GenerationConfig):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.size = model.config.vision.image_size

    def parse(self, record: dict[str, Any], base: Path) -> tuple:
        return (load_image(Path(base, _image_key(record)), self.size),)

    @torch.no_grad()
    def __call__(self, items: list[tuple]) -> list[dict[str, Any]]:
        out = self.model.generate(to_pixels(np.stack([item[0] for item in items])), self.generation)
        return _ranked("caption", self.tokenizer, out.ids, out.scores)


class _Classifier:
    """Retrieval / pretraining: zero-shot classification of each image among text labels."""

    empty_result = {"label": None, "score": None}

    def __init__(self, model, tokenizer, labels: list[str], template: str):
        from mmt.tasks.retrieval import embed_texts

        labels = [label.strip() for label in labels if label.strip()]
        if not labels:
            raise ValueError("zero-shot classification needs labels: --labels \"a red circle,a blue square\"")
        if "{}" not in template:
            raise ValueError(f"--template {template!r} needs a {{}} where the label goes")
        self.model, self.labels = model, labels
        self.size = model.config.vision.image_size
        self.label_emb = embed_texts(model, tokenizer, [template.format(label) for label in labels])

    def parse(self, record: dict[str, Any], base: Path) -> tuple:
        return (load_image(Path(base, _image_key(record)), self.size),)

    @torch.no_grad()
    def __call__(self, items: list[tuple]) -> list[dict[str, Any]]:
        from mmt.tasks.retrieval import encode_images

        image_emb, _ = encode_images(self.model, to_pixels(np.stack([item[0] for item in items])))
        probs = torch.softmax(self.model.scale().cpu() * image_emb @ self.label_emb.T, dim=1)
        results = []
        for row in probs.tolist():
            ranked = sorted(zip(self.labels, row), key=lambda pair: -pair[1])
            results.append({"label": ranked[0][0], "score": round(ranked[0][1], 4),
                            "labels": [{"label": label, "score": round(p, 4)} for label, p in ranked]})
        return results


def _ranked(key: str, tokenizer, ids: torch.Tensor, scores: torch.Tensor) -> list[dict[str, Any]]:
    """Per input, the best text under `key` with its score, and all `num_return` of them
    under `key + "s"` when there are several. ids (B, R, L), scores (B, R), best first."""
    results = []
    for rows, row_scores in zip(ids, scores.tolist()):
        ranked = [{key: tokenizer.decode(row), "score": round(score, 4)} for row, score in zip(rows, row_scores)]
        results.append({**ranked[0], key + "s": ranked} if len(ranked) > 1 else ranked[0])
    return results


def _image_key(record: dict[str, Any]) -> str:
    if "image" not in record:
        raise ValueError("missing key 'image'")
    return record["image"]


def _check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty" if isinstance(question, str) or question is None else "question must be text")
    return question


def load_predictor(
    run_dir: str | Path, generation: GenerationConfig | None = None, labels: list[str] | None = None, template: str = "{}"
) -> _Answerer | _Captioner | _Classifier:
    """The predictor for whatever task the run trained (`labels`: zero-shot classes for a
    retrieval or pretraining run, each put into `template`)."""
    model, tokenizer, directory = checkpoint.load_for_inference(run_dir)
    if model.model_type == "retrieval":
        if not labels:
            raise ValueError(f"{directory} is a retrieval model: give --labels \"a,b,c\" to classify images among them")
        return _Classifier(model, tokenizer, labels, template)
    if model.model_type == "vqa":
        return _Answerer(model, tokenizer, directory, generation or GenerationConfig())
    if model.model_type == "caption":
        return _Captioner(model, tokenizer, generation or GenerationConfig())
    raise checkpoint.CheckpointError(f"{directory}: mmt predict does not handle {model.model_type!r} models yet")


def predict_one(run_dir: str | Path, image: str | Path, question: str | None = None,
                generation: GenerationConfig | None = None, labels: list[str] | None = None,
                template: str = "{}") -> dict[str, Any]:
    predictor = load_predictor(run_dir, generation, labels, template)
    record = {"image": str(image)} if question is None else {"image": str(image), "question": question}
    return predictor([predictor.parse(record, Path.cwd())])[0]


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path,
                 generation: GenerationConfig | None = None, labels: list[str] | None = None,
                 template: str = "{}") -> int:
    """Answer every line of `input_path` into `output_path`; exit code 1 if any line failed.
    Image paths are relative to the input file's folder."""
    predictor = load_predictor(run_dir, generation, labels, template)
    input_path = Path(input_path)
    try:
        lines = input_path.read_text().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{input_path}: cannot read ({e.strerror})") from None
    results: list[dict[str, Any] | None] = [None] * len(lines)
    pending: list[tuple[int, dict[str, Any], tuple]] = []
    failures = 0

    def flush() -> None:
        if pending:
            for (index, record, _), result in zip(pending, predictor([p[2] for p in pending])):
                results[index] = {**record, **result}
            pending.clear()

    for index, line in enumerate(lines):
        record: dict[str, Any] = {}
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("line is not a JSON object")
            item = predictor.parse(record, input_path.parent)
        except (json.JSONDecodeError, ValueError, ImageError) as e:
            reason = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            print(f"{input_path}:{index + 1}: {reason}", file=sys.stderr)
            results[index] = {**record, **predictor.empty_result, "error": f"line {index + 1}: {reason}"}
            failures += 1
            continue
        pending.append((index, record, item))
        if len(pending) == BATCH:
            flush()
    flush()
    Path(output_path).write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"answered {len(lines) - failures} of {len(lines)} lines into {output_path}" + (f"; {failures} failed" if failures else ""))
    return 1 if failures else 0
