"""VQA v2 in the official layout, read into `VQARecord`s; soft targets, answer vocabulary, results.

Files (https://visualqa.org/download.html):

    v2_OpenEnded_mscoco_train2014_questions.json
        {"data_subtype": "train2014", "questions": [{"image_id": 458752, "question": "What is ...?",
                                                     "question_id": 458752000}, ...], ...}
    v2_mscoco_train2014_annotations.json  (none for the test splits)
        {"data_subtype": "train2014", "annotations": [{"question_id": 458752000, "image_id": 458752,
         "question_type": "what is", "answer_type": "other", "multiple_choice_answer": "net",
         "answers": [{"answer": "net", "answer_confidence": "maybe", "answer_id": 1}, ... 10 ...]}, ...]}
    <image_root>/COCO_train2014_000000458752.jpg   (COCO_{subtype}_{image_id:012d}.jpg)

The subtype in image names is the questions file's "data_subtype" (or `data_subtype=`), except
that test-dev2015 questions are about test2015 images. Records follow the questions file; with
annotations every question must have exactly one and every annotation a question.

Soft targets. Training a classifier over answers uses, for each answer a given by k of the n
humans, the score min(1, k/3) (`soft_scores`): 0.33, 0.67, 1 for k = 1, 2, >= 3. That is the
common simplification of the official accuracy, which averages min(1, matches/3) over the n
leave-one-out subsets of n-1 humans: (k*min(1,(k-1)/3) + (n-k)*min(1,k/3)) / n, i.e. 0.3, 0.6,
0.9, 1 for k = 1..4 of 10 (`soft_scores(..., exact=True)`; see mmt.metrics.vqa). Answers are
compared as the strings given (no normalisation here: pass normalised strings to match the
evaluation's rules).

Answer vocabulary (`build_answer_vocab`): the top_k answers (3129 is the usual size for VQA v2)
ranked by how many questions have them as "multiple_choice_answer" (the official consensus
answer; the default), or with count="all" by how often any human gave them; ties are broken
alphabetically (AnswerVocab's rule), so the ids are reproducible.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from mmt.data.answers import AnswerVocab
from mmt.data.formats.records import (
    DUPLICATE_ID,
    MISSING_ANNOTATION,
    MISSING_FIELD,
    UNKNOWN_QUESTION,
    BadRecords,
    DataError,
    VQARecord,
    handle,
    id_field,
    is_id,
    read_json,
    record_list,
    require,
    text_field,
)
from mmt.metrics import vqa as vqa_metric

__all__ = [
    "VQARecord",
    "build_answer_vocab",
    "coco_image_name",
    "find_pair",
    "load_vqa_v2",
    "soft_scores",
    "targets",
    "write_results",
]

DEFAULT_VOCAB_SIZE = 3129
# Question subtypes whose images carry another subtype in their file names.
IMAGE_SUBTYPES = {"test-dev2015": "test2015"}

_QUESTION = '{"question_id", "image_id", "question"}'
_ANNOTATION = '{"question_id", "image_id", "answers", "answer_type", "question_type"}'
_QUESTIONS_NAME = re.compile(r"^(v2_)?OpenEnded_mscoco_(.+)_questions\.json$")
_ANNOTATIONS_NAME = re.compile(r"^(v2_)?mscoco_(.+)_annotations\.json$")


def coco_image_name(subtype: str, image_id: int) -> str:
    """The official COCO file name of an image: COCO_{subtype}_{image_id:012d}.jpg (test-dev -> test)."""
    return f"COCO_{IMAGE_SUBTYPES.get(subtype, subtype)}_{image_id:012d}.jpg"


# ----------------------------------------------------------------------------------- reading


def find_pair(path: str | Path, annotations: str | Path | None = None, data: Any = None) -> tuple[Path, Path | None]:
    """(questions file, annotations file or None) for `path`, which may be either of the two.

    The partner comes from `annotations` when given (then `path` must be the questions file),
    else from the official names in the same folder:
    [v2_]OpenEnded_mscoco_<subtype>_questions.json <-> [v2_]mscoco_<subtype>_annotations.json.
    A questions file without annotations beside it is returned alone (unanswered questions); an
    annotations file without its questions file raises DataError.
    """
    path = Path(path)
    if data is None:
        data = read_json(path, "VQA v2 questions or annotations")
    is_questions = isinstance(data, dict) and "questions" in data
    if annotations is not None:
        if not is_questions:
            raise DataError(path, "", "not a VQA v2 questions file (no 'questions'); pass the questions file with annotations=", key="questions")
        return path, Path(annotations)
    if is_questions:
        match = _QUESTIONS_NAME.match(path.name)
        if match:
            partner = path.with_name(f"{match.group(1) or ''}mscoco_{match.group(2)}_annotations.json")
            if partner.is_file():
                return path, partner
        return path, None
    match = _ANNOTATIONS_NAME.match(path.name)
    if match:
        partner = path.with_name(f"{match.group(1) or ''}OpenEnded_mscoco_{match.group(2)}_questions.json")
        if partner.is_file():
            return partner, path
    raise DataError(path, "", "a VQA v2 annotations file; its questions file (v2_OpenEnded_mscoco_<subtype>_questions.json) was not found beside it: pass the questions file")


def _subtype(path: Path, data: dict, override: str | None) -> str:
    if override is not None:
        return override
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise DataError(path, "", "missing key 'data_subtype' (e.g. \"train2014\"; it names the image files); pass data_subtype=", kind=MISSING_FIELD, key="data_subtype")
    return subtype


def _human_answers(path: Path, where: str, answers: Any) -> list[str]:
    if not isinstance(answers, list) or not answers:
        raise DataError(path, where, "'answers' must be a non-empty list of {\"answer\": ...} objects", key="answers")
    texts = []
    for n, human in enumerate(answers):
        if not isinstance(human, dict) or "answer" not in human:
            raise DataError(path, where, f"missing key 'answers[{n}].answer'", kind=MISSING_FIELD, key=f"answers[{n}].answer")
        if not isinstance(human["answer"], str):
            raise DataError(path, where, f"'answers[{n}].answer' must be a string, got {type(human['answer']).__name__}", key=f"answers[{n}].answer")
        texts.append(human["answer"])
    return texts


def _new_question_id(path: Path, section: str, index: int, record: Any, first_at: dict[int, str]) -> tuple[int, str]:
    """Record `index` of `section`'s question_id (present, an id, not in `first_at`, which
    maps the ids met so far to where they were) and the record's name for messages."""
    where = f"{section}[{index}]"
    require(path, where, record, ("question_id",))
    question_id = id_field(path, where, record["question_id"], "question_id")
    where = f"{section}[{index}] (question_id {question_id})"
    if question_id in first_at:
        raise DataError(path, where, f"duplicate question_id {question_id} (first at {first_at[question_id]})", kind=DUPLICATE_ID, key="question_id")
    return question_id, where


def _read_annotations(path: Path, bad: BadRecords | None) -> tuple[dict[int, tuple[str, dict]], set[int], str | None]:
    """question_id -> (where, checked annotation); the ids of skipped annotations; the file's data_subtype."""
    data = read_json(path, "VQA v2 annotations")
    records = record_list(path, data, "annotations", _ANNOTATION)
    found: dict[int, tuple[str, dict]] = {}
    first_at: dict[int, str] = {}  # where each good annotation's question_id came first
    skipped: set[int] = set()
    for index, record in enumerate(records):
        try:
            question_id, where = _new_question_id(path, "annotations", index, record, first_at)
            require(path, where, record, ("image_id", "answers", "answer_type", "question_type"))
            id_field(path, where, record["image_id"], "image_id")
            for key in ("answer_type", "question_type"):
                if not isinstance(record[key], str):
                    raise DataError(path, where, f"{key!r} must be a string, got {type(record[key]).__name__}", key=key)
            consensus = record.get("multiple_choice_answer")
            if consensus is not None and not isinstance(consensus, str):
                raise DataError(path, where, f"'multiple_choice_answer' must be a string, got {type(consensus).__name__}", key="multiple_choice_answer")
            answers = _human_answers(path, where, record["answers"])
            found[question_id] = (where, {**record, "answers": answers})
            first_at[question_id] = where
        except DataError as e:
            if isinstance(record, dict) and is_id(record.get("question_id")) and e.kind != DUPLICATE_ID:
                skipped.add(record["question_id"])
            handle(e, bad)
    subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else None
    return found, skipped, subtype


def load_vqa_v2(
    questions_path: str | Path,
    image_root: str | Path,
    annotations_path: str | Path | None = None,
    *,
    data_subtype: str | None = None,
    bad: BadRecords | None = None,
) -> list[VQARecord]:
    """One record per question of an official questions file, in file order.

    Images are image_root/COCO_{subtype}_{image_id:012d}.jpg. Without annotations (test splits)
    records have no answers. Missing keys, wrong types, duplicate question ids, a question
    without annotation (missing_annotation), an annotation without question (unknown_question)
    or about another image raise DataError naming file, record and key; with `bad` they are
    skipped and counted there (a question whose annotation was bad is dropped with it).
    """
    questions_path, root = Path(questions_path), Path(image_root)
    data = read_json(questions_path, "VQA v2 questions")
    questions = record_list(questions_path, data, "questions", _QUESTION)
    subtype = _subtype(questions_path, data, data_subtype)

    annotations: dict[int, tuple[str, dict]] | None = None
    bad_annotations: set[int] = set()
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        annotations, bad_annotations, annotated_subtype = _read_annotations(annotations_path, bad)
        if data_subtype is None and annotated_subtype is not None and annotated_subtype != subtype:
            raise DataError(annotations_path, "", f"data_subtype {annotated_subtype!r} does not match {subtype!r} of {questions_path}", key="data_subtype")

    records: list[VQARecord] = []
    seen: dict[int, str] = {}
    for index, question in enumerate(questions):
        try:
            question_id, where = _new_question_id(questions_path, "questions", index, question, seen)
            seen[question_id] = where
            require(questions_path, where, question, ("image_id", "question"))
            image_id = id_field(questions_path, where, question["image_id"], "image_id")
            text = text_field(questions_path, where, question["question"], "question")
            record = VQARecord(
                image_path=root / coco_image_name(subtype, image_id),
                question=text,
                question_id=question_id,
                answers=[],
                image_id=image_id,
                source=str(questions_path),
                where=where,
            )
            if annotations is not None:
                if question_id in bad_annotations:
                    continue  # its annotation was bad and has been counted already
                if question_id not in annotations:
                    raise DataError(questions_path, where, f"no annotation for question_id {question_id} in {annotations_path}", kind=MISSING_ANNOTATION, key="question_id")
                annotation_where, annotation = annotations[question_id]
                if annotation["image_id"] != image_id:
                    raise DataError(
                        annotations_path, annotation_where,
                        f"image_id {annotation['image_id']} differs from the question's image_id {image_id} ({questions_path}: {where})",
                        key="image_id",
                    )
                consensus = annotation.get("multiple_choice_answer")
                record = VQARecord(
                    image_path=record.image_path,
                    question=text,
                    question_id=question_id,
                    answers=annotation["answers"],
                    answer_type=annotation["answer_type"],
                    question_type=annotation["question_type"],
                    image_id=image_id,
                    multiple_choice_answer=consensus if consensus is not None else most_frequent(annotation["answers"]),
                    source=str(questions_path),
                    where=where,
                )
            records.append(record)
        except DataError as e:
            handle(e, bad)

    if annotations is not None:
        for question_id, (annotation_where, _) in annotations.items():
            if question_id not in seen:
                error = DataError(annotations_path, annotation_where, f"question_id {question_id} is not in {questions_path}", kind=UNKNOWN_QUESTION, key="question_id")
                handle(error, bad)
    return records


# ------------------------------------------------------------------------- targets and vocab


def most_frequent(answers: Sequence[str]) -> str | None:
    """The answer given most often (ties: alphabetically first); None for no answers."""
    if not answers:
        return None
    counts = Counter(answers)
    return min(counts, key=lambda a: (-counts[a], a))


def soft_scores(answers: Sequence[str], exact: bool = False) -> dict[str, float]:
    """Score of each distinct answer among the human `answers` (in order of first appearance).

    Default: min(1, k/3) for an answer k humans gave (the usual training target). exact=True:
    the official leave-one-out accuracy, the mean over the n subsets of n-1 humans of
    min(1, matches/3) = (k*min(1, (k-1)/3) + (n-k)*min(1, k/3)) / n.
    """
    counts = Counter(answers)
    n = len(answers)
    if not exact:
        return {answer: min(1.0, k / 3.0) for answer, k in counts.items()}
    return {answer: (k * min(1.0, (k - 1) / 3.0) + (n - k) * min(1.0, k / 3.0)) / n for answer, k in counts.items()}


def targets(record: VQARecord, vocab: AnswerVocab, exact: bool = False) -> dict[int, float]:
    """Class index -> soft score for the record's answers that are in `vocab` (others are dropped)."""
    scores = soft_scores(record.answers, exact=exact)
    found = {vocab.index[answer]: score for answer, score in scores.items() if answer in vocab.index and score > 0}
    return dict(sorted(found.items()))


def build_answer_vocab(
    records: Iterable[VQARecord],
    top_k: int | None = DEFAULT_VOCAB_SIZE,
    count: Literal["multiple_choice", "all"] = "multiple_choice",
) -> AnswerVocab:
    """The top_k most frequent answers (all when None), ties alphabetically.

    count="multiple_choice": one vote per question, for its multiple_choice_answer (the most
    frequent human answer where a record has none); count="all": one vote per human answer.
    Unanswered records are ignored.
    """
    if count not in ("multiple_choice", "all"):
        raise ValueError(f"count must be 'multiple_choice' or 'all', got {count!r}")
    votes: list[str] = []
    for record in records:
        if not record.answers:
            continue
        if count == "all":
            votes.extend(record.answers)
        else:
            votes.append(record.multiple_choice_answer if record.multiple_choice_answer is not None else most_frequent(record.answers))
    if not votes:
        raise ValueError("no answered records to build an answer vocabulary from")
    return AnswerVocab.build(votes, max_size=top_k)


def write_results(path: str | Path, answers: dict[int, str]) -> None:
    """Write question id -> answer as the official results file `[{"question_id", "answer"}, ...]`,
    atomically (the writer of mmt.metrics.vqa, which `mmt score vqa` reads)."""
    vqa_metric.write_results(path, answers)
