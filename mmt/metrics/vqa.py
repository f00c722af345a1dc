"""The VQA accuracy of the official VQA v1/v2 evaluation, reimplemented and checked by hand.

Reference: the evaluation code of the VQA authors, github.com/GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py` on master (commit a013f00, the version the
authors confirm in their issue #14), and the rules published at https://visualqa.org/evaluation.html
(Antol et al. 2015, "VQA: Visual Question Answering", ICCV; Goyal et al. 2017, "Making the V in
VQA Matter", CVPR). No code is taken from there; the word tables below (number words, articles,
punctuation marks, contractions) are the same facts as that file's lists, written out again here.

Accuracy of one answer (`vqa_accuracy`). With n human answers (10 in VQA v2), each of the n
leave-one-out subsets of n - 1 answers gives min(1, matches in the subset / 3); the accuracy is
their mean. With k of 10 humans matching that is (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10:
0, 0.3, 0.6, 0.9 for k = 0..3 and 1 for k >= 4. The leave-one-out goes by position (the official
code drops answer records that compare equal, and the records differ by their "answer_id").
Fewer than 4 answers can never give full credit, and a single answer always scores 0.

When answers are normalised (the official rule, kept here by default): the prediction and every
human answer first get newlines and tabs turned into spaces and the ends stripped. If the human
answers (so cleaned) are all the same string, nothing more is done: the prediction must equal it
exactly, case included ("Yes" scores 0 against ten "yes"). The authors kept it so on purpose, to
leave answers read off text in the image untouched. If the humans disagree, the prediction and
every human answer are normalised by `normalize_answer`. Pass `always_normalize=True` to
normalise in both cases, as some later toolkits do; numbers then differ from the official ones.
(Other revisions in that repository, e.g. c4e6a0e and `vqa/vqaEval.py`, instead always
normalise the prediction and only punctuation-process disagreeing human answers; the authors'
reply in issue #14 (2022) confirms the a013f00 rule, which is the one kept here.)

`normalize_answer`, in the official order:

1. Newline and tab become a space; leading and trailing whitespace is stripped.
2. Punctuation, decided once per mark on the text of step 1, for each of the 21 marks
   ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !
   every occurrence of the mark is deleted if that mark stands next to a space anywhere in the
   text (before or after it), or if the text holds a digit, comma, digit anywhere ("1,000");
   otherwise every occurrence becomes a space. So "1,000" -> "1000", "red,blue" -> "red blue",
   "yes, no" -> "yes no", and in "2,500 cat/dog" the slash is deleted too ("2500 catdog"). The
   apostrophe, colon and all other characters (# $ % & * ' : ...) are kept ("girl's", "2:50").
3. Periods: a "." is deleted unless the next character is a digit 0-9: "yes." -> "yes",
   "2.5" stays, "5." -> "5", ".5" stays. The official pattern means "not preceded by a digit"
   too, but its look-behind is written as a look-ahead ("(?!<=\\d)") and has no effect, so only
   the following character counts. The official call also passes re.UNICODE where the count of
   replacements goes, so at most the first 32 such periods are deleted; that is kept.
4. Lower-casing, then splitting on whitespace (runs of spaces collapse to one).
5. Each word "none", "zero", "one" .. "ten" becomes "0", "0", "1" .. "10" (whole words only).
6. Each word "a", "an", "the" is dropped.
7. Each remaining word found in the contractions table gets its apostrophes ("dont" -> "don't",
   "isnt" -> "isn't", "whats" -> "what's"). The table is the official one, quirks included:
   its keys "Im", "Ive", "Id've", "I'dve" have capitals and never match a lower-cased word, and
   "somebody'd" goes the other way, to "somebodyd".

Digits are matched as ASCII 0-9, as in the official code (Python 2, patterns without re.UNICODE).

Files use the official formats: results `[{"question_id": int, "answer": str}, ...]`, questions
`{"questions": [{"question_id", "image_id", "question"}, ...]}`, annotations `{"annotations":
[{"question_id", "answer_type", "question_type", "answers": [{"answer", ...}, ...], ...}, ...]}`.
Accuracies from `score_files` are percentages (0-100), not rounded; the official tool rounds
them to 2 decimals, as `format_vqa_scores` prints them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from mmt.data.formats.records import is_id
from mmt.files import atomic_write_text
from mmt.metrics.captions import read_json

# Number words the official evaluation turns into digits.
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The punctuation marks the official evaluation handles (period apart), in its order.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# Spelling without apostrophes -> spelling with them, as the official table has it: one
# "key=value" pair per token. Capitalised keys never match (words are lower-cased first).
_CONTRACTION_PAIRS = """
    aint=ain't  arent=aren't  cant=can't  couldve=could've  couldnt=couldn't
    couldn'tve=couldn't've  couldnt've=couldn't've  didnt=didn't  doesnt=doesn't  dont=don't
    hadnt=hadn't  hadnt've=hadn't've  hadn'tve=hadn't've  hasnt=hasn't  havent=haven't
    hed=he'd  hed've=he'd've  he'dve=he'd've  hes=he's  howd=how'd  howll=how'll  hows=how's
    Id've=I'd've  I'dve=I'd've  Im=I'm  Ive=I've
    isnt=isn't  itd=it'd  itd've=it'd've  it'dve=it'd've  itll=it'll  let's=let's  maam=ma'am
    mightnt=mightn't  mightnt've=mightn't've  mightn'tve=mightn't've  mightve=might've
    mustnt=mustn't  mustve=must've  neednt=needn't  notve=not've  oclock=o'clock  oughtnt=oughtn't
    ow's'at='ow's'at  'ows'at='ow's'at  'ow'sat='ow's'at
    shant=shan't  shed've=she'd've  she'dve=she'd've  she's=she's
    shouldve=should've  shouldnt=shouldn't  shouldnt've=shouldn't've  shouldn'tve=shouldn't've
    somebody'd=somebodyd  somebodyd've=somebody'd've  somebody'dve=somebody'd've
    somebodyll=somebody'll  somebodys=somebody's
    someoned=someone'd  someoned've=someone'd've  someone'dve=someone'd've
    someonell=someone'll  someones=someone's
    somethingd=something'd  somethingd've=something'd've  something'dve=something'd've
    somethingll=something'll
    thats=that's  thered=there'd  thered've=there'd've  there'dve=there'd've  therere=there're
    theres=there's  theyd=they'd  theyd've=they'd've  they'dve=they'd've  theyll=they'll
    theyre=they're  theyve=they've  twas='twas  wasnt=wasn't  wed've=we'd've  we'dve=we'd've
    weve=we've  werent=weren't  whatll=what'll  whatre=what're  whats=what's  whatve=what've
    whens=when's  whered=where'd  wheres=where's  whereve=where've
    whod=who'd  whod've=who'd've  who'dve=who'd've  wholl=who'll  whos=who's  whove=who've
    whyll=why'll  whyre=why're  whys=why's  wont=won't
    wouldve=would've  wouldnt=wouldn't  wouldnt've=wouldn't've  wouldn'tve=wouldn't've
    yall=y'all  yall'll=y'all'll  y'allll=y'all'll  yall'd've=y'all'd've  y'alld've=y'all'd've
    y'all'dve=y'all'd've  youd=you'd  youd've=you'd've  you'dve=you'd've
    youll=you'll  youre=you're  youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=") for pair in _CONTRACTION_PAIRS.split())

_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?![0-9])")
_MAX_PERIODS_REMOVED = 32  # the official call passes re.UNICODE (== 32) as the replacement count

ANSWER_TYPES = ("yes/no", "number", "other")  # VQA v2's answer types, in the order tables show them
_SHOWN_IDS = 5  # how many offending question ids an error message lists


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, ends stripped (step 1, applied to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Steps 2 and 3 of `normalize_answer`: the 21 punctuation marks, then periods."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        next_to_space = (mark + " ") in text or (" " + mark) in text  # decided on the input text
        out = out.replace(mark, "" if delete_all or next_to_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digits_articles(text: str) -> str:
    """Steps 4 to 7 of `normalize_answer`: lower-case, number words, articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation: whitespace, punctuation, periods, case, numbers, articles, contractions.

    See the module docstring for each rule. Examples: "Two." -> "2", "the dog" -> "dog",
    "1,000" -> "1000", "2.5" -> "2.5", "dont" -> "don't", "black/white" -> "black white".
    """
    return process_digits_articles(process_punctuation(clean_whitespace(text)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str], *, always_normalize: bool = False) -> float:
    """Official VQA accuracy (0..1) of one predicted answer against the human answers of one question.

    Mean over the len(human_answers) leave-one-out subsets of min(1, matching answers / 3).
    Matching is string equality after the official processing: whitespace cleaned always;
    `normalize_answer` on the prediction and the human answers only when the (cleaned) human
    answers are not all identical, unless `always_normalize` (see the module docstring).
    """
    if isinstance(human_answers, str) or not human_answers:
        raise ValueError("human_answers must be a non-empty list of answer strings")
    if not isinstance(prediction, str) or not all(isinstance(a, str) for a in human_answers):
        raise TypeError("the prediction and the human answers must be strings")
    prediction = clean_whitespace(prediction)
    humans = [clean_whitespace(a) for a in human_answers]
    if always_normalize or len(set(humans)) > 1:
        prediction = normalize_answer(prediction)
        humans = [normalize_answer(a) for a in humans]
    matches = [a == prediction for a in humans]
    total = sum(matches)
    # Leaving out answer i leaves total - matches[i] matching answers among the others.
    per_subset = [min(1.0, (total - left_out) / 3) for left_out in matches]
    return sum(per_subset) / len(per_subset)


# ---------------------------------------------------------------------------------------- files


def _preview(ids: list) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN_IDS])
    more = f", ... ({len(ids) - _SHOWN_IDS} more)" if len(ids) > _SHOWN_IDS else ""
    return f"[{shown}{more}]"


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({what})")
    return read_json(path)


def _record(path: Path, where: str, record, keys: tuple[str, ...]) -> dict:
    """The record, checked to be an object holding `keys` and an int question_id."""
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where}: expected an object with {', '.join(map(repr, keys))}, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise ValueError(f"{path}: {where}: missing key {key!r}")
    if not is_id(record["question_id"]):
        raise ValueError(f"{path}: {where}: 'question_id' must be an integer, got {record['question_id']!r:.40}")
    return record


def _record_list(path: Path, data, key: str | None, example: str) -> tuple[list, str]:
    """The list of records at data[key] (or data itself when key is None), and the prefix naming it."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path}: missing key {key!r} (official format: {{\"{key}\": [{example}, ...], ...}})")
        data = data[key]
    where = key or "the file"
    if not isinstance(data, list):
        raise ValueError(f"{path}: {where} must be a list of {example} records, got {type(data).__name__}")
    return data, key or ""


def _check_unique(path: Path, where: str, index: int, question_id: int, first_index: dict[int, int]) -> None:
    if question_id in first_index:
        first = first_index[question_id]
        raise ValueError(f"{path}: {where}[{index}]: duplicate question_id {question_id} (first at [{first}])")
    first_index[question_id] = index


def load_results(path: str | Path) -> dict[int, str]:
    """Read an official results file, `[{"question_id": int, "answer": str}, ...]`: question id -> answer."""
    path = Path(path)
    records, _ = _record_list(path, _read_json(path, "VQA results"), None, '{"question_id": ..., "answer": ...}')
    answers: dict[int, str] = {}
    first_index: dict[int, int] = {}
    for index, record in enumerate(records):
        record = _record(path, f"[{index}]", record, ("question_id", "answer"))
        if not isinstance(record["answer"], str):
            raise ValueError(f"{path}: [{index}]: 'answer' must be a string, got {type(record['answer']).__name__}")
        _check_unique(path, "", index, record["question_id"], first_index)
        answers[record["question_id"]] = record["answer"]
    return answers


def load_question_ids(path: str | Path) -> list[int]:
    """The question ids of an official questions file, `{"questions": [{"question_id", ...}, ...]}`, in file order."""
    path = Path(path)
    records, prefix = _record_list(path, _read_json(path, "VQA questions"), "questions", '{"question_id", "image_id", "question"}')
    first_index: dict[int, int] = {}
    for index, record in enumerate(records):
        record = _record(path, f"{prefix}[{index}]", record, ("question_id",))
        _check_unique(path, prefix, index, record["question_id"], first_index)
    return list(first_index)


def load_annotations(path: str | Path) -> dict[int, dict]:
    """Read an official annotations file: question id -> {"answer_type", "question_type", "answers": [str, ...]}."""
    path = Path(path)
    example = '{"question_id", "answer_type", "question_type", "answers"}'
    records, prefix = _record_list(path, _read_json(path, "VQA annotations"), "annotations", example)
    annotations: dict[int, dict] = {}
    first_index: dict[int, int] = {}
    for index, record in enumerate(records):
        where = f"{prefix}[{index}]"
        record = _record(path, where, record, ("question_id", "answer_type", "question_type", "answers"))
        for key in ("answer_type", "question_type"):
            if not isinstance(record[key], str):
                raise ValueError(f"{path}: {where}: {key!r} must be a string, got {type(record[key]).__name__}")
        humans = record["answers"]
        if not isinstance(humans, list) or not humans:
            raise ValueError(f"{path}: {where}: 'answers' must be a non-empty list of {{\"answer\": ...}} objects")
        texts = []
        for n, human in enumerate(humans):
            if not isinstance(human, dict) or not isinstance(human.get("answer"), str):
                raise ValueError(f"{path}: {where}.answers[{n}]: expected an object with a string 'answer'")
            texts.append(human["answer"])
        _check_unique(path, prefix, index, record["question_id"], first_index)
        annotations[record["question_id"]] = {
            "answer_type": record["answer_type"],
            "question_type": record["question_type"],
            "answers": texts,
        }
    if not annotations:
        raise ValueError(f"{path}: no annotations to score against")
    return annotations


def _percent_means(groups: dict[str, list[float]]) -> dict[str, float]:
    return {name: 100.0 * sum(values) / len(values) for name, values in groups.items()}


def score_files(
    results_path: str | Path,
    questions_path: str | Path,
    annotations_path: str | Path,
    *,
    always_normalize: bool = False,
) -> dict:
    """Official VQA accuracy of a results file, overall and per answer and question type.

    Every annotated question needs exactly one answer, and the results may hold no other
    question, as the official evaluation requires; the questions file must list the same
    questions as the annotations. Returns percentages (0-100, unrounded):
    {"overall": float, "per_answer_type": {type: float}, "per_question_type": {type: float},
    "num_questions": int, "num_per_answer_type": {type: int}}; types as the annotations name them.
    """
    results_path, questions_path, annotations_path = Path(results_path), Path(questions_path), Path(annotations_path)
    results = load_results(results_path)
    question_ids = load_question_ids(questions_path)
    annotations = load_annotations(annotations_path)

    asked = set(question_ids)
    unannotated = [q for q in question_ids if q not in annotations]
    unasked = [q for q in annotations if q not in asked]
    if unannotated or unasked:
        raise ValueError(
            f"{questions_path} and {annotations_path} do not list the same questions: "
            f"{len(unannotated)} question(s) without annotation {_preview(unannotated)}, "
            f"{len(unasked)} annotation(s) without question {_preview(unasked)}"
        )
    unknown = [q for q in results if q not in annotations]
    if unknown:
        index = list(results).index(unknown[0])
        raise ValueError(
            f"{results_path}: [{index}]: question_id {unknown[0]} is not in {annotations_path} "
            f"({len(unknown)} such question id(s): {_preview(unknown)})"
        )
    missing = [q for q in annotations if q not in results]
    if missing:
        raise ValueError(
            f"{results_path}: no answer for {len(missing)} of the {len(annotations)} questions in "
            f"{annotations_path} (the official evaluation needs every one): {_preview(missing)}"
        )

    everything: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for question_id, annotation in annotations.items():
        accuracy = vqa_accuracy(results[question_id], annotation["answers"], always_normalize=always_normalize)
        everything.append(accuracy)
        by_answer_type.setdefault(annotation["answer_type"], []).append(accuracy)
        by_question_type.setdefault(annotation["question_type"], []).append(accuracy)
    return {
        "overall": 100.0 * sum(everything) / len(everything),
        "per_answer_type": _percent_means(by_answer_type),
        "per_question_type": _percent_means(by_question_type),
        "num_questions": len(everything),
        "num_per_answer_type": {name: len(values) for name, values in by_answer_type.items()},
    }


def format_vqa_scores(scores: dict, *, question_types: bool = True) -> str:
    """A text table of `score_files` output: accuracy (%, 2 decimals as the official tool rounds) and counts."""
    answer_types = scores["per_answer_type"]
    ordered = [t for t in ANSWER_TYPES if t in answer_types] + sorted(t for t in answer_types if t not in ANSWER_TYPES)
    counts = scores.get("num_per_answer_type", {})
    lines = [f"{'VQA accuracy':<24} {'%':>7}  questions"]
    lines.append(f"{'overall':<24} {scores['overall']:>7.2f}  {scores['num_questions']}")
    lines += [f"{'  ' + name:<24} {answer_types[name]:>7.2f}  {counts.get(name, '')}" for name in ordered]
    if question_types and scores.get("per_question_type"):
        lines.append("per question type:")
        lines += [f"{'  ' + name:<24} {value:>7.2f}" for name, value in sorted(scores["per_question_type"].items())]
    return "\n".join(lines)


def write_results(path: str | Path, answers: dict[int, str]) -> None:
    """Write question id -> answer as an official results file (atomically), in the dict's order."""
    if not answers:
        raise ValueError(f"{path}: no answers to write")
    for question_id, answer in answers.items():
        if not is_id(question_id):
            raise ValueError(f"{path}: question id {question_id!r} must be an integer")
        if not isinstance(answer, str):
            raise ValueError(f"{path}: answer for question {question_id} must be a string, got {type(answer).__name__}")
    records = [{"question_id": question_id, "answer": answer} for question_id, answer in answers.items()]
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
