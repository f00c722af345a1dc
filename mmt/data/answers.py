"""Answer vocabulary for classifier-style VQA: answer text <-> class id, saved as answers.json."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable


class AnswerVocab:
    """Answers ordered by training frequency (ties alphabetically), so ids are reproducible."""

    def __init__(self, answers: list[str]):
        if len(set(answers)) != len(answers):
            raise ValueError("answer vocabulary has duplicates")
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    @classmethod
    def build(cls, answers: Iterable[str], max_size: int | None = None) -> "AnswerVocab":
        """The `max_size` most frequent answers (all when None)."""
        counts = Counter(answers)
        ranked = sorted(counts, key=lambda a: (-counts[a], a))
        return cls(ranked[:max_size] if max_size else ranked)

    def __len__(self) -> int:
        return len(self.answers)

    def id(self, answer: str) -> int:
        if answer not in self.index:
            raise KeyError(f"answer {answer!r} is not in the answer vocabulary of {len(self)} answers")
        return self.index[answer]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"answers": self.answers}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, classes: int | None = None) -> "AnswerVocab":
        """The vocabulary saved at `path`; with `classes`, checked to have one answer for each
        output of the classifier it belongs to (another model's would answer wrongly)."""
        try:
            data = json.loads(Path(path).read_text())
            answers = data["answers"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable answer vocabulary ({e})") from None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{path}: 'answers' must be a list of strings")
        if classes is not None and len(answers) != classes:
            raise ValueError(f"{path}: {len(answers)} answers for a classifier of {classes} outputs; these are not the model's answers")
        return cls(answers)
