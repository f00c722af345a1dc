import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer import ptbtokenizer

from mmt.metrics import captions
from mmt.metrics.captions import (
    format_scores,
    load_coco_references,
    load_coco_results,
    ptb_tokenize,
    score_captions,
    score_files,
    simple_tokenize,
    write_coco_references,
    write_coco_results,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java on PATH (PTB tokenizer, METEOR)")
needs_pgrep = pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to list child processes")

REFERENCES = {
    1: ["A man riding a horse on a beach.", "A person rides a horse near the ocean.", "A man on a brown horse at the beach."],
    2: ["A plate of food with broccoli and rice.", "A white plate with rice, chicken and broccoli."],
    3: ["Two dogs playing in the snow.", "Two dogs run through the snow."],
}
EXACT = {image_id: refs[0] for image_id, refs in REFERENCES.items()}


def fast_scores(results, references):
    """Scores without Java, so the numbers do not depend on the machine."""
    return score_captions(results, references, meteor=False, tokenize="simple")


def child_processes() -> list[str]:
    """Processes (including unreaped zombies) whose parent is this Python."""
    found = subprocess.run(["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True)
    return found.stdout.splitlines()


def test_identical_captions_score_one():
    scores = fast_scores(EXACT, REFERENCES)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr-D"] > 0
    assert scores["tokenizer"] == "simple" and "METEOR" not in scores


def test_disjoint_captions_score_zero():
    results = {1: "zebra xylophone quartet", 2: "purple umbrella factory", 3: "violin under water"}
    scores = fast_scores(results, REFERENCES)
    for n in range(1, 5):
        assert scores[f"BLEU-{n}"] == pytest.approx(0.0, abs=1e-6)  # pycocoevalcap adds 1e-15 to counts
    assert scores["ROUGE-L"] == 0.0
    assert scores["CIDEr-D"] == 0.0


def test_bleu_and_rouge_by_hand():
    # Hypothesis 6 words, closest reference 6 words: no brevity penalty.
    # Unigrams: a, runs, on, the, grass match; cat does not -> p1 = 5/6.
    # Bigrams: "runs on", "on the", "the grass" match; "a cat", "cat runs" do not -> p2 = 3/5.
    # BLEU-2 = sqrt(p1 * p2) = sqrt(1/2). ROUGE-L: LCS 5, P = R = 5/6, so F = 5/6.
    scores = fast_scores({7: "a cat runs on the grass"}, {7: ["a dog runs on the grass", "a brown dog runs outside"]})
    assert scores["BLEU-1"] == pytest.approx(5 / 6)
    assert scores["BLEU-2"] == pytest.approx(math.sqrt(1 / 2))
    assert scores["ROUGE-L"] == pytest.approx(5 / 6)

    # Clipping: "the" counts at most twice (its count in the second reference) -> p1 = 2/5; lengths 5 = 5.
    scores = fast_scores({7: "the the the the the"}, {7: ["a cat on a mat", "the cat and the dog"]})
    assert scores["BLEU-1"] == pytest.approx(2 / 5)

    # Brevity penalty: 2 words against 4 -> p1 = 1, BP = exp(1 - 4/2) = 1/e.
    # ROUGE-L: LCS 2, P = 1, R = 1/2, F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 1.22 / 1.94.
    scores = fast_scores({7: "a dog"}, {7: ["a dog runs fast"]})
    assert scores["BLEU-1"] == pytest.approx(math.exp(-1))
    assert scores["ROUGE-L"] == pytest.approx(1.22 / 1.94)


def test_cider_d_orders_captions_and_penalizes_padding():
    def cider(caption_for_image_1):
        return fast_scores({**EXACT, 1: caption_for_image_1}, REFERENCES)["CIDEr-D"]

    exact, partial, wrong = cider("a man riding a horse on a beach"), cider("a man on a beach"), cider("two dogs in the snow")
    assert exact > partial > wrong
    # "-D": clipped n-gram weights and the length penalty make repeating reference words lose
    assert cider("a man riding a horse on a beach horse horse horse horse beach beach") < exact


def test_cider_d_known_values():
    # When every reference of an image equals its caption, each n-gram vector's cosine with
    # each reference is 1 and the length penalty is exp(0) = 1: mean over n = 1..4 is 1, times 10.
    captions_by_image = {1: "a man riding a horse", 2: "a plate of food", 3: "two dogs in snow"}
    scores = fast_scores(captions_by_image, {i: [c, c] for i, c in captions_by_image.items()})
    assert scores["CIDEr-D"] == pytest.approx(10.0)
    # The IDF comes from the scored images' references: with one image every n-gram has IDF log(1/1) = 0.
    assert fast_scores({1: "a dog"}, {1: ["a dog"]})["CIDEr-D"] == 0.0


def test_simple_tokenizer():
    assert simple_tokenize("A man's hat, on-the-table!") == "a man 's hat on the table"
    assert simple_tokenize("  Two\tdogs\u2019 'ball'  ") == "two dogs ball"


def test_without_java_falls_back_and_refuses_what_needs_it(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    scores = score_captions(EXACT, REFERENCES)
    assert scores["tokenizer"] == "simple" and "METEOR" not in scores
    with pytest.raises(RuntimeError, match="METEOR runs a Java program"):
        score_captions(EXACT, REFERENCES, meteor=True)
    with pytest.raises(RuntimeError, match="PTB tokenizer runs a Java program"):
        score_captions(EXACT, REFERENCES, meteor=False, tokenize="ptb")
    with pytest.raises(ValueError, match="tokenize='nltk'"):
        score_captions(EXACT, REFERENCES, tokenize="nltk")


def test_images_must_match():
    with pytest.raises(ValueError, match=r"1 image id\(s\) in results have no references in references: \[9\]"):
        fast_scores({**EXACT, 9: "a cat"}, REFERENCES)
    many = {i: ["a cat"] for i in range(10, 17)}
    expected = r"7 image id\(s\) in references have no caption in results: \[10, 11, 12, 13, 14, \.\.\. \(2 more\)\]"
    with pytest.raises(ValueError, match=expected):
        fast_scores(EXACT, {**REFERENCES, **many})
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        fast_scores(EXACT, {**REFERENCES, 1: "a man riding a horse"})


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap(capfd):
    texts = ['A man, riding a HORSE!', 'It\'s a "quoted" word (really) -- done...', "Caf\u00e9 na\u00efve; 3.5 don't", ""]
    # "-lrb-" survives: upstream lowercases before it filters "-LRB-"; the COCO server does the same
    expected = ["a man riding a horse", "it 's a quoted word -lrb- really -rrb- done", "caf\u00e9 na\u00efve 3.5 do n't", ""]
    assert ptb_tokenize(texts) == expected
    if os.access(Path(ptbtokenizer.__file__).parent, os.W_OK):  # upstream writes a temp file next to itself
        upstream = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
        assert [upstream[i][0] for i in range(len(texts))] == expected
    # a line break inside a caption must not shift the captions after it
    assert ptb_tokenize(["a dog\rruns", "a\u2028cat", "the end."]) == ["a dog runs", "a cat", "the end"]
    capfd.readouterr()  # upstream's tokenizer lets Java print to stderr; scoring must not
    score_captions(EXACT, REFERENCES, meteor=False, tokenize="ptb")
    assert capfd.readouterr() == ("", "")


@pytest.fixture(scope="module")
def meteor_run():
    """One METEOR run for the module: the jar takes ~8 s to load its paraphrase table."""
    results = {**EXACT, 2: "a plate with broccoli", 3: "a cat on a sofa"}
    scores = score_captions(results, REFERENCES, meteor=True)
    children = child_processes() if shutil.which("pgrep") else None
    return scores, children


@needs_java
@pytest.mark.multiprocess
def test_meteor_when_java_present(meteor_run):
    scores, _ = meteor_run
    assert scores["tokenizer"] == "ptb"
    assert 0 < scores["METEOR"] < 1  # one exact, one partial, one wrong caption
    assert scores["BLEU-4"] < 1 and scores["CIDEr-D"] > 0


@needs_java
@needs_pgrep
def test_no_java_process_left_after_scoring(meteor_run):
    _, children = meteor_run
    assert children == []


@needs_java
@needs_pgrep
def test_meteor_failure_stops_java_and_does_not_hang(monkeypatch):
    def fail_holding_the_lock(self, gts, res):
        self.lock.acquire()  # as upstream compute_score does, then fails before releasing it
        raise ValueError("could not convert string to float: b''")

    monkeypatch.setattr(Meteor, "compute_score", fail_holding_the_lock)
    errors, finished = [], threading.Event()

    def score():
        try:
            score_captions(EXACT, REFERENCES, meteor=True, tokenize="simple")
        except RuntimeError as e:
            errors.append(str(e))
        gc.collect()  # Meteor.__del__ runs here; upstream it waits for the lock
        finished.set()

    threading.Thread(target=score, daemon=True).start()
    assert finished.wait(timeout=30), "Meteor.__del__ blocked on the lock compute_score left taken"
    assert len(errors) == 1 and "METEOR (meteor-1.5.jar) failed" in errors[0]
    assert child_processes() == []


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_score_files_reads_coco_formats(tmp_path):
    references = {
        "images": [{"id": 42, "file_name": "a.jpg"}, {"id": 43, "file_name": "b.jpg"}],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "A dog runs on the grass."},
            {"image_id": 43, "id": 2, "caption": "A red bus on a street."},
            {"image_id": 42, "id": 3, "caption": "A brown dog running."},
        ],
    }
    results = [{"image_id": 43, "caption": "a red bus on a street"}, {"image_id": 42, "caption": "a dog runs on the grass"}]
    ref_path, res_path = write(tmp_path / "refs.json", references), write(tmp_path / "results.json", results)
    expected = {42: ["A dog runs on the grass.", "A brown dog running."], 43: ["A red bus on a street."]}
    assert load_coco_references(ref_path) == expected
    # a bare annotation list is accepted too
    assert load_coco_references(write(tmp_path / "bare.json", references["annotations"])) == load_coco_references(ref_path)
    scores = score_files(res_path, ref_path, meteor=False, tokenize="simple")
    assert scores["BLEU-1"] == pytest.approx(1.0) and scores["ROUGE-L"] == pytest.approx(1.0)
    table = format_scores(scores)
    assert "BLEU-1    1.0000" in table and "CIDEr-D" in table and "(tokenizer: simple)" in table


def test_write_then_load_round_trip(tmp_path):
    results = {5: "a cat", "img_6": "two dogs"}
    references = {5: ["a cat sits", "a kitten"], "img_6": ["two dogs play"]}
    write_coco_results(tmp_path / "out" / "results.json", results)
    write_coco_references(tmp_path / "out" / "refs.json", references)
    assert load_coco_results(tmp_path / "out" / "results.json") == results
    assert load_coco_references(tmp_path / "out" / "refs.json") == references
    with pytest.raises(ValueError, match=r"image id np\.int64\(5\) has type int64; COCO files need int or str"):
        write_coco_results(tmp_path / "bad.json", {np.int64(5): "a cat"})


TWO_CAPTIONS = [{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("refs.json", {"annotations": [*TWO_CAPTIONS, {"image_id": 3}]}, r"refs\.json: annotations\[2\]: missing key 'caption'"),
        ("refs.json", [{"image_id": 1, "caption": 3}], r"refs\.json: \[0\]: 'caption' must be a string, got int"),
        ("refs.json", {"images": []}, r"refs\.json: missing key 'annotations'"),
        ("results.json", [*TWO_CAPTIONS, {"caption": "c"}], r"results\.json: \[2\]: missing key 'image_id'"),
        ("results.json", [*TWO_CAPTIONS, {"image_id": 1, "caption": "a"}], r"results\.json: \[2\]: duplicate image_id 1 \(first at \[0\]\)"),
        ("results.json", '[{"image_id": 1,\n  "caption": "a",}]', r"results\.json: invalid JSON at line 2, column 18"),
    ],
)
def test_loader_errors_name_file_and_record(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    load = load_coco_references if name == "refs.json" else load_coco_results
    with pytest.raises(ValueError, match=expected):
        load(path)


def test_score_files_names_both_files_for_a_missing_image(tmp_path):
    res_path = write(tmp_path / "results.json", [{"image_id": 1, "caption": "a"}, {"image_id": 3, "caption": "b"}])
    ref_path = write(tmp_path / "refs.json", {"annotations": [{"image_id": 1, "caption": "a"}]})
    with pytest.raises(ValueError, match=r"image id\(s\) in .*results\.json have no references in .*refs\.json: \[3\]"):
        score_files(res_path, ref_path, meteor=False, tokenize="simple")


@pytest.mark.multiprocess
def test_only_scoring_captions_needs_pycocoevalcap():
    # a machine without pycocoevalcap can still train, evaluate VQA and predict; scoring
    # captions there says what is missing
    code = """
import sys
sys.modules["pycocoevalcap"] = None  # any import of it now fails
import mmt.cli, mmt.metrics.vqa
from mmt.metrics.captions import score_captions
from mmt.tasks import TASKS, task_class
for name in TASKS:
    task_class(name)
try:
    score_captions({1: "a red circle"}, {1: ["a red circle"]}, meteor=False, tokenize="simple")
except ImportError as e:
    print("scoring:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("scoring:") and "pip install 'mmt-vl[captions]'" in out.stdout
