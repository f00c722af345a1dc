"""Answer questions with a trained VQA run: one question, or a JSON Lines file of them.

Batch mode never loses work to one bad line: a missing or corrupt image, an empty
question or an unreadable line gets `{"error": ...}` in its output line (and a message
on stderr naming the line); every other line is answered, in input order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmt.data.transforms import ImageError, load_image, to_pixels
from mmt.tasks.vqa import load_for_inference

BATCH = 64  # questions answered per forward pass


class _Answerer:
    def __init__(self, run_dir: str | Path):
        self.model, self.tokenizer, self.vocab = load_for_inference(run_dir)
        self.size = self.model.config.vision.image_size

    @torch.no_grad()
    def answer(self, images: list, questions: list[str]) -> list[dict[str, Any]]:
        """images: (H, W, 3) uint8 arrays; one answer + softmax score per question."""
        pixels = to_pixels(np.stack(images))
        ids, _ = self.tokenizer.batch(questions, self.model.config.text.max_len, wrap="cls")
        probs = self.model.answer_logits(pixels, ids).float().softmax(-1)
        score, best = probs.max(-1)
        return [{"answer": self.vocab.answers[i], "score": round(s, 4)} for i, s in zip(best.tolist(), score.tolist())]


def _check_question(question: Any) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is empty" if isinstance(question, str) or question is None else "question must be text")
    return question


def predict_one(run_dir: str | Path, image: str | Path, question: str) -> dict[str, Any]:
    answerer = _Answerer(run_dir)
    return answerer.answer([load_image(image, answerer.size)], [_check_question(question)])[0]


def predict_file(run_dir: str | Path, input_path: str | Path, output_path: str | Path) -> int:
    """Answer every line of `input_path` into `output_path`; exit code 1 if any line failed."""
    answerer = _Answerer(run_dir)
    input_path = Path(input_path)
    try:
        lines = input_path.read_text().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{input_path}: cannot read ({e.strerror})") from None
    results: list[dict[str, Any] | None] = [None] * len(lines)
    pending: list[tuple[int, dict[str, Any], Any, str]] = []
    failures = 0

    def flush() -> None:
        if pending:
            answers = answerer.answer([p[2] for p in pending], [p[3] for p in pending])
            for (index, record, _, _), answer in zip(pending, answers):
                results[index] = {**record, **answer}
            pending.clear()

    for index, line in enumerate(lines):
        where = f"{input_path}:{index + 1}"
        record: dict[str, Any] = {}
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("line is not a JSON object")
            if "image" not in record:
                raise ValueError("missing key 'image'")
            question = _check_question(record.get("question"))
            image = load_image(Path(input_path.parent, record["image"]), answerer.size)
        except (json.JSONDecodeError, ValueError, ImageError) as e:
            reason = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            print(f"{where}: {reason}", file=sys.stderr)
            results[index] = {**record, "answer": None, "score": None, "error": f"line {index + 1}: {reason}"}
            failures += 1
            continue
        pending.append((index, record, image, question))
        if len(pending) == BATCH:
            flush()
    flush()
    Path(output_path).write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"answered {len(lines) - failures} of {len(lines)} lines into {output_path}" + (f"; {failures} failed" if failures else ""))
    return 1 if failures else 0
