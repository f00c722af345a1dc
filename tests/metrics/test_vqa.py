"""The official VQA accuracy (mmt.metrics.vqa): every normalisation rule, hand-computed accuracies,
end-to-end scoring of official-format files, and the file errors. Expected values are worked out by
hand from the rules of the official evaluation (see the module docstring)."""

import json

import pytest

from mmt.metrics.vqa import (
    CONTRACTIONS,
    PUNCTUATION,
    format_vqa_scores,
    load_results,
    normalize_answer,
    process_punctuation,
    score_files,
    vqa_accuracy,
    write_results,
)

# ------------------------------------------------------------------------------ normalisation


def test_tables_have_the_official_sizes():
    assert len(PUNCTUATION) == 21 and len(set(PUNCTUATION)) == 21
    assert len(CONTRACTIONS) == 120
    for kept in ".':#$%&*|~^":  # the period has its own rule; the others are never touched
        assert kept not in PUNCTUATION


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  yes  ", "yes"),  # ends stripped
        ("\tyes\n", "yes"),  # tab and newline become spaces, then stripped
        ("red\tand\nblue", "red and blue"),  # inner tab/newline -> space
        ("red    car", "red car"),  # runs of spaces collapse (split + join)
    ],
)
def test_whitespace(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("text, expected", [("YES", "yes"), ("New York", "new york"), ("iPhone", "iphone")])
def test_lower_case(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("mark", PUNCTUATION)
def test_each_mark_becomes_a_space_when_not_next_to_a_space(mark):
    # "x<mark>y": the mark touches no space and there is no digit,digit -> replaced by a space.
    assert normalize_answer(f"x{mark}y") == "x y"
    assert normalize_answer(f"x{mark}") == "x"  # trailing: "x " -> stripped by split


@pytest.mark.parametrize("mark", PUNCTUATION)
def test_each_mark_is_deleted_everywhere_when_next_to_a_space_somewhere(mark):
    # The mark stands before a space once ("z<mark> w"), so all its occurrences are deleted,
    # also the one inside "x<mark>y": "xy z w".
    assert normalize_answer(f"x{mark}y z{mark} w") == "xy z w"
    # A space before the mark counts too: "x<mark>y <mark>z" -> "xy z".
    assert normalize_answer(f"x{mark}y {mark}z") == "xy z"


def test_the_space_rule_is_decided_per_mark():
    # "-" touches a space ("red -"), "/" does not: "-" deleted, "/" replaced.
    assert normalize_answer("black/white red - blue") == "black white red blue"
    assert normalize_answer("yes, no") == "yes no"  # ", " -> comma deleted
    assert normalize_answer("yes!") == "yes"  # "!" -> space, then stripped
    assert normalize_answer("what?!") == "what"
    assert normalize_answer("(left)") == "left"


def test_commas_between_digits():
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("100,978") == "100978"  # the example on visualqa.org/evaluation
    assert normalize_answer("1,000,000") == "1000000"
    # A digit,digit anywhere deletes every mark of the list, not just that comma.
    assert normalize_answer("2,500 cat/dog") == "2500 catdog"
    # A comma that is not between digits follows the space rule.
    assert normalize_answer("red,blue") == "red blue"
    assert normalize_answer("1,b") == "1 b"  # no digit,digit: comma -> space
    assert normalize_answer("1,a") == "1"  # ... and the "a" so split off is an article


def test_apostrophe_colon_and_other_characters_are_kept():
    assert normalize_answer("girl's") == "girl's"
    assert normalize_answer("2:50 pm") == "2:50 pm"
    assert normalize_answer("#1") == "#1"
    assert normalize_answer("50%") == "50%"
    assert normalize_answer("$5 & up") == "$5 & up"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes.", "yes"),  # period at the end: deleted
        ("2.5", "2.5"),  # period before a digit (decimal point): kept
        ("3.14.", "3.14"),  # first kept (before "1"), last deleted
        ("5.", "5"),  # after a digit but not before one: deleted (the look-behind has no effect)
        (".5", ".5"),  # before a digit: kept
        ("a.m.", "am"),  # both deleted; "am" is not an article
        ("st. louis", "st louis"),
        ("no.1", "no.1"),  # before a digit: kept
    ],
)
def test_periods(text, expected):
    assert normalize_answer(text) == expected


def test_at_most_32_periods_are_deleted():
    # The official call passes re.UNICODE (32) as the count: of 40 lone periods, 8 stay.
    assert process_punctuation("." * 40) == "." * 8
    assert normalize_answer("yes" + "." * 33) == "yes."


@pytest.mark.parametrize(
    "word, digit",
    [("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"),
     ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10")],
)
def test_number_words(word, digit):
    assert normalize_answer(word) == digit
    assert normalize_answer(word.upper()) == digit  # lower-cased first


def test_number_words_only_whole_words_zero_to_ten():
    assert normalize_answer("eleven") == "eleven"
    assert normalize_answer("someone") == "someone"
    assert normalize_answer("twofold") == "twofold"
    assert normalize_answer("one two three") == "1 2 3"
    assert normalize_answer("two-three") == "2 3"  # "-" -> space, then two words


@pytest.mark.parametrize("article", ["a", "an", "the"])
def test_each_article_is_dropped(article):
    assert normalize_answer(f"{article} dog") == "dog"
    assert normalize_answer(f"dog {article} cat") == "dog cat"
    assert normalize_answer(article.upper() + " dog") == "dog"  # "A", "AN", "THE"
    assert normalize_answer(article) == ""  # nothing left


def test_articles_only_as_whole_words():
    assert normalize_answer("theater") == "theater"
    assert normalize_answer("another") == "another"
    assert normalize_answer("banana") == "banana"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats", "what's"),
        ("cant", "can't"),
        ("wont", "won't"),
        ("Dont", "don't"),  # lower-cased before the lookup
        ("yall", "y'all"),
        ("oclock", "o'clock"),
        ("twas", "'twas"),
        ("couldnt've", "couldn't've"),
        ("i dont know", "i don't know"),
        ("don't", "don't"),  # already has it
        ("Im", "im"),  # the table's key "Im" is capitalised and can never match
        ("somebody'd", "somebodyd"),  # the table's one reversed entry
    ],
)
def test_contractions(text, expected):
    assert normalize_answer(text) == expected


def test_rules_combined():
    # "-" and "!" touch no space -> spaces; lower; "a" dropped.
    assert normalize_answer("  A Red-Car!\n") == "red car"
    # "." at the end deleted; "the" dropped; "two" -> "2".
    assert normalize_answer("The two dogs.") == "2 dogs"
    # Contraction lookup comes after the punctuation: "dont?" -> "dont " -> "don't".
    assert normalize_answer("Dont?") == "don't"


# ------------------------------------------------------------------------------ accuracy


def _humans(k: int, answer: str = "yes", other: str = "no", n: int = 10) -> list[str]:
    return [answer] * k + [other] * (n - k)


@pytest.mark.parametrize(
    "k, expected",
    [
        # k of 10 humans match. Leaving out a matching answer leaves k-1 matches, leaving out
        # another leaves k: acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
        (0, 0.0),  # no subset has a match
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4 * min(1, 3/3) + 6 * 1) / 10 = 1
        (5, 1.0),
        (8, 1.0),  # issue #1 of the official repository: 8 "yes" -> 1.0 for "yes"
        (10, 1.0),
    ],
)
def test_accuracy_by_number_of_matching_humans(k, expected):
    assert vqa_accuracy("yes", _humans(k)) == pytest.approx(expected)


def test_accuracy_example_of_the_official_authors():
    # 8 "yes", 2 "no": "no" scores (8 * 2/3 + 2 * 1/3) / 10 = 0.6 (their issue #1).
    assert vqa_accuracy("no", _humans(8)) == pytest.approx(0.6)


def test_accuracy_other_numbers_of_humans():
    # n = 1: the one subset is empty -> 0 even for the same answer.
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    # n = 3, all match: each subset has 2 matches -> 2/3.
    assert vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)
    # n = 4, all match: each subset has 3 -> 1.
    assert vqa_accuracy("yes", ["yes"] * 4) == 1.0
    # n = 5, 2 match: (2 * 1/3 + 3 * 2/3) / 5 = (2/3 + 2) / 5 = 8/15.
    assert vqa_accuracy("yes", ["yes", "yes", "no", "no", "no"]) == pytest.approx(8 / 15)


def test_unanimous_humans_mean_no_normalisation():
    humans = ["yes"] * 10
    assert vqa_accuracy("yes", humans) == 1.0
    assert vqa_accuracy(" yes\n", humans) == 1.0  # whitespace is always cleaned
    assert vqa_accuracy("Yes", humans) == 0.0  # official: no lower-casing when all agree
    assert vqa_accuracy("yes.", humans) == 0.0
    assert vqa_accuracy("Yes", humans, always_normalize=True) == 1.0
    assert vqa_accuracy("yes.", humans, always_normalize=True) == 1.0
    # An unanimous "the cat" keeps its article, so "cat" does not match it.
    assert vqa_accuracy("cat", ["the cat"] * 10) == 0.0
    assert vqa_accuracy("the cat", ["the cat"] * 10) == 1.0


def test_disagreeing_humans_are_normalised_with_the_prediction():
    # Humans say "two" x5 and "2" x5: all normalise to "2" -> 10 matches for "Two." -> 1.
    assert vqa_accuracy("Two.", ["two"] * 5 + ["2"] * 5) == 1.0
    # "Red." -> "red"; 2 of 10 humans said "red" -> 0.6.
    assert vqa_accuracy("Red.", ["red", "Red"] + ["blue"] * 8) == pytest.approx(0.6)
    # Unanimity is judged after whitespace cleaning: " yes" and "yes" agree -> no normalisation.
    assert vqa_accuracy("Yes", [" yes"] * 5 + ["yes"] * 5) == 0.0


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError):
        vqa_accuracy(None, ["yes"])


# ------------------------------------------------------------------------------ files

QUESTIONS = [
    # (question_id, answer_type, question_type, human answers, predicted answer, accuracy by hand)
    (1, "yes/no", "is there a", ["yes"] * 10, "yes", 1.0),  # unanimous, exact
    (2, "number", "how many", ["2"] * 3 + ["3"] * 7, "two", 0.9),  # "two" -> "2": 3 matches
    (3, "other", "what color is the", ["red"] * 2 + ["blue"] * 8, "Red.", 0.6),  # -> "red": 2 matches
    (4, "other", "what color is the", ["black and white"] * 10, "white", 0.0),
]


def _write_fixture(tmp_path, results=None, questions=None, annotations=None):
    """Write official-format files (results, questions, annotations) for QUESTIONS; override any part."""
    if results is None:
        results = [{"question_id": q, "answer": pred} for q, _, _, _, pred, _ in QUESTIONS]
    if questions is None:
        questions = {
            "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
            "questions": [{"question_id": q, "image_id": 100 + q, "question": f"question {q}?"} for q, *_ in QUESTIONS],
        }
    if annotations is None:
        annotations = {
            "info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {},
            "annotations": [
                {
                    "question_id": q, "image_id": 100 + q, "answer_type": atype, "question_type": qtype,
                    "multiple_choice_answer": humans[0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)],
                }
                for q, atype, qtype, humans, _, _ in QUESTIONS
            ],
        }
    paths = []
    for name, data in (("results.json", results), ("questions.json", questions), ("annotations.json", annotations)):
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        paths.append(path)
    return paths


def test_score_files_end_to_end(tmp_path):
    for q, _, _, humans, pred, expected in QUESTIONS:  # the hand values per question
        assert vqa_accuracy(pred, humans) == pytest.approx(expected), q
    scores = score_files(*_write_fixture(tmp_path))
    assert scores["num_questions"] == 4
    assert scores["overall"] == pytest.approx(62.5)  # (1 + 0.9 + 0.6 + 0) / 4 = 0.625
    assert scores["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 90.0, "other": 30.0})  # other: (0.6 + 0) / 2
    assert scores["num_per_answer_type"] == {"yes/no": 1, "number": 1, "other": 2}
    assert scores["per_question_type"] == pytest.approx({"is there a": 100.0, "how many": 90.0, "what color is the": 30.0})

    table = format_vqa_scores(scores)
    assert "overall" in table and "62.50" in table and "yes/no" in table and "90.00" in table and "what color is the" in table
    assert "what color" not in format_vqa_scores(scores, question_types=False)


def test_always_normalize_in_files(tmp_path):
    results = [{"question_id": q, "answer": pred} for q, *_, pred, _ in QUESTIONS]
    results[0]["answer"] = "Yes!"  # unanimous "yes": 0 officially, 1 when always normalising
    paths = _write_fixture(tmp_path, results=results)
    assert score_files(*paths)["per_answer_type"]["yes/no"] == 0.0
    assert score_files(*paths, always_normalize=True)["per_answer_type"]["yes/no"] == 100.0


def test_write_results_round_trip(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results(path, {q: pred for q, *_, pred, _ in QUESTIONS})
    assert json.loads(path.read_text()) == [{"question_id": q, "answer": pred} for q, *_, pred, _ in QUESTIONS]
    assert load_results(path) == {q: pred for q, *_, pred, _ in QUESTIONS}
    _, questions, annotations = _write_fixture(tmp_path)
    assert score_files(path, questions, annotations)["overall"] == pytest.approx(62.5)
    with pytest.raises(ValueError, match="integer"):
        write_results(path, {"1": "yes"})
    with pytest.raises(ValueError, match="string"):
        write_results(path, {1: 2})
    with pytest.raises(ValueError, match="no answers"):
        write_results(path, {})


@pytest.mark.parametrize("which", [0, 1, 2])
def test_missing_file(tmp_path, which):
    paths = _write_fixture(tmp_path)
    paths[which].unlink()
    with pytest.raises(FileNotFoundError, match=paths[which].name):
        score_files(*paths)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_invalid_json(tmp_path, which):
    paths = _write_fixture(tmp_path)
    paths[which].write_text('[{"question_id": 1,')
    with pytest.raises(ValueError, match=rf"{paths[which].name}: invalid JSON at line 1"):
        score_files(*paths)


@pytest.mark.parametrize("key", ["question_id", "answer"])
def test_results_record_missing_a_key(tmp_path, key):
    results = [{"question_id": q, "answer": pred} for q, *_, pred, _ in QUESTIONS]
    del results[2][key]
    paths = _write_fixture(tmp_path, results=results)
    with pytest.raises(ValueError, match=rf"results.json: \[2\]: missing key '{key}'"):
        score_files(*paths)


def test_results_bad_records(tmp_path):
    bad = [
        ({"question_id": 1}, r"results.json: the file must be a list"),
        ([{"question_id": "1", "answer": "yes"}], r"results.json: \[0\]: 'question_id' must be an integer"),
        ([{"question_id": 1, "answer": 2}], r"results.json: \[0\]: 'answer' must be a string"),
        (["yes"], r"results.json: \[0\]: expected an object"),
    ]
    for results, message in bad:
        with pytest.raises(ValueError, match=message):
            score_files(*_write_fixture(tmp_path, results=results))


def test_results_question_not_in_annotations(tmp_path):
    results = [{"question_id": q, "answer": pred} for q, *_, pred, _ in QUESTIONS] + [{"question_id": 99, "answer": "yes"}]
    with pytest.raises(ValueError, match=r"results.json: \[4\]: question_id 99 is not in .*annotations.json"):
        score_files(*_write_fixture(tmp_path, results=results))


def test_results_missing_questions(tmp_path):
    results = [{"question_id": 2, "answer": "2"}]
    with pytest.raises(ValueError, match=r"results.json: no answer for 3 of the 4 questions .*\[1, 3, 4\]"):
        score_files(*_write_fixture(tmp_path, results=results))
    with pytest.raises(ValueError, match=r"no answer for 4 of the 4 questions"):
        score_files(*_write_fixture(tmp_path, results=[]))


def test_results_duplicate_question(tmp_path):
    results = [{"question_id": q, "answer": pred} for q, *_, pred, _ in QUESTIONS] + [{"question_id": 3, "answer": "blue"}]
    with pytest.raises(ValueError, match=r"results.json: \[4\]: duplicate question_id 3 \(first at \[2\]\)"):
        score_files(*_write_fixture(tmp_path, results=results))


def test_bad_questions_and_annotations_files(tmp_path):
    with pytest.raises(ValueError, match="questions.json: missing key 'questions'"):
        score_files(*_write_fixture(tmp_path, questions=[]))
    with pytest.raises(ValueError, match="annotations.json: missing key 'annotations'"):
        score_files(*_write_fixture(tmp_path, annotations={"questions": []}))
    paths = _write_fixture(tmp_path)
    annotations = json.loads(paths[2].read_text())
    del annotations["annotations"][1]["answer_type"]
    with pytest.raises(ValueError, match=r"annotations.json: annotations\[1\]: missing key 'answer_type'"):
        score_files(*_write_fixture(tmp_path, annotations=annotations))
    annotations = json.loads(paths[2].read_text())
    annotations["annotations"][0]["answers"] = []
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'answers' must be a non-empty list"):
        score_files(*_write_fixture(tmp_path, annotations=annotations))
    questions = json.loads(paths[1].read_text())
    questions["questions"].append({"question_id": 7, "image_id": 1, "question": "?"})
    with pytest.raises(ValueError, match=r"do not list the same questions: 1 question\(s\) without annotation \[7\]"):
        score_files(*_write_fixture(tmp_path, questions=questions))


def test_score_vqa_command(tmp_path, capsys):
    from mmt.cli import main

    results, questions, annotations = _write_fixture(tmp_path)
    out = tmp_path / "scores.json"
    args = ["score", "vqa", "--results", str(results), "--questions", str(questions), "--annotations", str(annotations)]
    assert main(args + ["--out", str(out)]) == 0
    assert "62.50" in capsys.readouterr().out
    assert json.loads(out.read_text())["overall"] == pytest.approx(62.5)
    results.write_text("[{\"question_id\": 1}]")
    assert main(args) == 2
    assert str(results) in capsys.readouterr().err
