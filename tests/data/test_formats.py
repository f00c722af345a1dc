"""Real-data readers (COCO captions, Karpathy splits, VQA v2, JSON Lines) and their validation.
Every fixture is written here: tiny images with PIL and JSON files in the official layouts.
Soft scores are worked out by hand in the comments."""

import json
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmt.data.formats import check_dataset, coco, detect_format, format_report, jsonl, load_source, records, vqa_v2
from mmt.data.formats.records import BadRecords, CaptionRecord, DataError, VQARecord, check_image, read_json
from mmt.metrics.vqa import load_results

# ------------------------------------------------------------------------------------ fixtures


def write_image(path, size=(24, 16), color=(200, 30, 30), fmt=None, noise_seed=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise_seed is None:
        image = Image.new("RGB", size, color)
    else:
        pixels = np.random.default_rng(noise_seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    image.save(path, format=fmt)
    return path


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def png_with_header(path, width, height):
    """A PNG whose IHDR claims width x height; its one IDAT holds a few bytes only."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(body)
    return path


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_set(tmp_path):
    root = tmp_path / "val2014"
    for image_id in (1, 2, 3, 4):
        write_image(root / f"COCO_val2014_{image_id:012d}.jpg", color=(image_id * 40, 10, 10))
    data = {
        "info": {},
        "licenses": [],
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 16, "width": 24} for i in (1, 2, 3, 4)],
        "annotations": [
            {"id": 10, "image_id": 3, "caption": "three a"},
            {"id": 11, "image_id": 1, "caption": "one a"},
            {"id": 12, "image_id": 3, "caption": "three b"},
            {"id": 13, "image_id": 2, "caption": "two a"},
            {"id": 14, "image_id": 1, "caption": "one b"},
        ],
    }
    return write_json(tmp_path / "annotations" / "captions_val2014.json", data), root, data


@pytest.fixture
def karpathy_set(tmp_path):
    root = tmp_path / "coco"
    entries = []
    for n, (folder, split) in enumerate([("train2014", "train"), ("val2014", "restval"), ("val2014", "val"), ("val2014", "test")]):
        name = f"COCO_{folder}_{n:012d}.jpg"
        write_image(root / folder / name)
        entries.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "imgid": n,
                "cocoid": 100 + n,
                "sentences": [{"raw": f"A Picture {n}.", "tokens": ["a", "picture", str(n)]}, {"raw": f"image {n}", "tokens": ["image", str(n)]}],
            }
        )
    return write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"}), root, entries


def human(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": n + 1} for n, a in enumerate(answers)]


@pytest.fixture
def vqa_set(tmp_path):
    root = tmp_path / "val2014"
    for image_id in (7, 9):
        write_image(root / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 7, "question": "What colour is the car?", "question_id": 70},
            {"image_id": 9, "question": "How many dogs?", "question_id": 90},
            {"image_id": 7, "question": "Is it raining?", "question_id": 71},
        ],
    }
    annotations = {
        "data_subtype": "val2014",
        "annotations": [
            {
                "question_id": 90, "image_id": 9, "question_type": "how many", "answer_type": "number",
                "multiple_choice_answer": "2", "answers": human("2", "2", "2", "two", "two", "3", "2", "2", "1", "2"),
            },
            {
                "question_id": 70, "image_id": 7, "question_type": "what color is the", "answer_type": "other",
                "multiple_choice_answer": "red",
                "answers": human("red", "red", "dark red", "maroon", "red", "dark red", "red", "crimson", "pink", "scarlet"),
            },
            {
                "question_id": 71, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
                "multiple_choice_answer": "no", "answers": human(*["no"] * 9, "yes"),
            },
        ],
    }
    q = write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    a = write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations)
    return q, a, root, questions, annotations


# ------------------------------------------------------------------------------ shared pieces


def test_data_error_names_file_record_and_key_and_pickles():
    error = DataError("/d/captions.json", "annotations[5] (id 17)", "missing key 'caption'", kind="missing_field", key="caption")
    assert str(error) == "/d/captions.json: annotations[5] (id 17): missing key 'caption'"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.kind, copy.key, copy.where) == (str(error), "missing_field", "caption", "annotations[5] (id 17)")


def test_bad_records_counts_and_keeps_first_examples():
    bad = BadRecords(max_examples=2)
    for n in range(3):
        bad.add(DataError("f.jsonl", f"line {n + 1}", "invalid JSON", kind="invalid_json"))
    bad.add(DataError("f.jsonl", "line 9", "missing key 'text'", kind="missing_field", key="text"))
    assert bad.counts == {"invalid_json": 3, "missing_field": 1} and bad.total == 4
    assert bad.examples["invalid_json"] == ["f.jsonl: line 1: invalid JSON", "f.jsonl: line 2: invalid JSON"]
    other = BadRecords()
    other.add(DataError("g", "line 1", "x", kind="missing_field"))
    bad.merge(other)
    assert bad.counts["missing_field"] == 2 and len(bad.examples["missing_field"]) == 2


def test_read_json_errors(tmp_path):
    with pytest.raises(DataError, match="no such file") as info:
        read_json(tmp_path / "nope.json")
    assert info.value.kind == "missing_file"
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"broken\.json: line 2, column 12: invalid JSON") as info:
        read_json(broken)
    assert info.value.kind == "invalid_json"


# ------------------------------------------------------------------------------- COCO captions


def test_coco_captions_grouped_per_image_in_order(coco_set):
    path, root, _ = coco_set
    got = coco.load_coco_captions(path, root)
    assert [r.image_id for r in got] == [1, 2, 3]  # image 4 has no caption
    assert [r.captions for r in got] == [["one a", "one b"], ["two a"], ["three a", "three b"]]
    assert got[0].image_path == root / "COCO_val2014_000000000001.jpg"
    assert got[2].where == "images[2] (id 3)" and got[2].source == str(path)
    with_empty = coco.load_coco_captions(path, root, keep_uncaptioned=True)
    assert [(r.image_id, r.captions) for r in with_empty][-1] == (4, [])


def test_coco_missing_keys_name_record_and_key(coco_set, tmp_path):
    path, root, data = coco_set
    del data["images"][1]["file_name"]
    write_json(path, data)
    with pytest.raises(DataError) as info:
        coco.load_coco_captions(path, root)
    assert str(info.value) == f"{path}: images[1] (id 2): missing key 'file_name'"
    assert (info.value.kind, info.value.key) == ("missing_field", "file_name")

    data["images"][1]["file_name"] = "COCO_val2014_000000000002.jpg"
    del data["annotations"][3]["caption"]
    write_json(path, data)
    with pytest.raises(DataError, match=r"annotations\[3\] \(id 13\): missing key 'caption'"):
        coco.load_coco_captions(path, root)

    with pytest.raises(DataError, match=r"missing key 'annotations'"):
        coco.load_coco_captions(write_json(tmp_path / "x.json", {"images": []}), root)


def test_coco_unknown_image_id_names_the_annotation(coco_set):
    path, root, data = coco_set
    data["annotations"].append({"id": 15, "image_id": 99, "caption": "lost"})
    write_json(path, data)
    with pytest.raises(DataError) as info:
        coco.load_coco_captions(path, root)
    assert str(info.value) == f"{path}: annotations[5] (id 15): image_id 99 is not in 'images'"
    assert (info.value.kind, info.value.key) == ("unknown_image", "image_id")


def test_coco_skip_bad_counts_and_keeps_good_records(coco_set):
    path, root, data = coco_set
    del data["images"][1]["file_name"]  # image 2: bad; its annotation goes with it, uncounted
    data["annotations"].append({"id": 15, "image_id": 99, "caption": "lost"})
    data["annotations"].append({"id": 16, "image_id": 1, "caption": "   "})
    data["images"].append({"id": 1, "file_name": "again.jpg"})
    write_json(path, data)
    bad = BadRecords()
    got = coco.load_coco_captions(path, root, bad=bad)
    assert bad.counts == {"missing_field": 1, "unknown_image": 1, "invalid_value": 1, "duplicate_id": 1}
    assert [(r.image_id, r.captions) for r in got] == [(1, ["one a", "one b"]), (3, ["three a", "three b"])]


# ---------------------------------------------------------------------------- Karpathy splits


def test_karpathy_splits_and_restval(karpathy_set):
    path, root, _ = karpathy_set
    train = coco.load_karpathy(path, root, "train")
    assert [r.image_id for r in train] == [100, 101]  # restval folded into train
    assert train[1].image_path == root / "val2014" / "COCO_val2014_000000000001.jpg"
    assert train[0].captions == ["A Picture 0.", "image 0"]
    assert [r.image_id for r in coco.load_karpathy(path, root, "train", restval_into_train=False)] == [100]
    assert [r.image_id for r in coco.load_karpathy(path, root, "restval")] == [101]
    assert [r.image_id for r in coco.load_karpathy(path, root, "val")] == [102]
    assert [r.image_id for r in coco.load_karpathy(path, root, "test")] == [103]
    assert len(coco.load_karpathy(path, root, None)) == 4
    assert coco.load_karpathy(path, root, "test", use_tokens=True)[0].captions == ["a picture 3", "image 3"]
    with pytest.raises(ValueError, match="unknown Karpathy split 'dev'"):
        coco.load_karpathy(path, root, "dev")


def test_karpathy_imgid_and_no_filepath(tmp_path):
    root = tmp_path / "flickr"
    write_image(root / "1000.jpg")
    path = write_json(tmp_path / "dataset_flickr8k.json", {"images": [{"filename": "1000.jpg", "split": "val", "imgid": 5, "sentences": [{"raw": "a dog"}]}]})
    (record,) = coco.load_karpathy(path, root, "val")
    assert (record.image_id, record.image_path, record.captions) == (5, root / "1000.jpg", ["a dog"])


def test_karpathy_bad_records(karpathy_set):
    path, root, entries = karpathy_set
    del entries[0]["sentences"][1]["raw"]
    entries[2]["split"] = "holdout"
    del entries[3]["cocoid"], entries[3]["imgid"]
    write_json(path, {"images": entries})
    with pytest.raises(DataError) as info:
        coco.load_karpathy(path, root, "train")
    assert str(info.value) == f"{path}: images[0] (cocoid 100): missing key 'sentences[1].raw'"
    bad = BadRecords()
    got = coco.load_karpathy(path, root, None, bad=bad)
    assert [r.image_id for r in got] == [101]
    assert bad.counts == {"missing_field": 2, "invalid_value": 1}
    assert any("images[2] (cocoid 102): 'split' must be one of" in e for e in bad.examples["invalid_value"])


# ------------------------------------------------------------------------------------ VQA v2


def test_vqa_v2_records(vqa_set):
    q, a, root, _, _ = vqa_set
    got = vqa_v2.load_vqa_v2(q, root, a)
    assert [r.question_id for r in got] == [70, 90, 71]  # questions-file order
    car = got[0]
    assert car.image_path == root / "COCO_val2014_000000000007.jpg"
    assert (car.question, car.answer_type, car.question_type, car.image_id) == ("What colour is the car?", "other", "what color is the", 7)
    assert car.multiple_choice_answer == "red" and len(car.answers) == 10 and car.answers[2] == "dark red"
    assert car.where == "questions[0] (question_id 70)"


def test_vqa_v2_image_names():
    assert vqa_v2.coco_image_name("train2014", 458752) == "COCO_train2014_000000458752.jpg"
    assert vqa_v2.coco_image_name("test-dev2015", 1) == "COCO_test2015_000000000001.jpg"


def test_vqa_v2_questions_without_annotations(vqa_set):
    q, _, root, _, _ = vqa_set
    got = vqa_v2.load_vqa_v2(q, root)
    assert [(r.question_id, r.answers, r.multiple_choice_answer) for r in got] == [(70, [], None), (90, [], None), (71, [], None)]


def test_vqa_v2_errors_name_file_record_and_key(vqa_set):
    q, a, root, questions, annotations = vqa_set
    questions["questions"][1].pop("image_id")
    write_json(q, questions)
    with pytest.raises(DataError) as info:
        vqa_v2.load_vqa_v2(q, root, a)
    assert str(info.value) == f"{q}: questions[1] (question_id 90): missing key 'image_id'"

    questions["questions"][1]["image_id"] = 9
    questions["questions"].append({"image_id": 9, "question": "Why?", "question_id": 91})
    write_json(q, questions)
    with pytest.raises(DataError, match=r"questions\[3\] \(question_id 91\): no annotation for question_id 91") as info:
        vqa_v2.load_vqa_v2(q, root, a)
    assert info.value.kind == "missing_annotation"

    questions["questions"].pop()
    annotations["annotations"].append({**annotations["annotations"][0], "question_id": 92})
    write_json(q, questions)
    write_json(a, annotations)
    with pytest.raises(DataError) as info:
        vqa_v2.load_vqa_v2(q, root, a)
    assert str(info.value) == f"{a}: annotations[3] (question_id 92): question_id 92 is not in {q}"
    assert (info.value.kind, info.value.key) == ("unknown_question", "question_id")

    annotations["annotations"].pop()
    annotations["annotations"][1]["answers"][4] = {"answer_id": 5}
    write_json(a, annotations)
    with pytest.raises(DataError, match=r"annotations\[1\] \(question_id 70\): missing key 'answers\[4\]\.answer'"):
        vqa_v2.load_vqa_v2(q, root, a)

    del questions["data_subtype"]
    write_json(q, questions)
    with pytest.raises(DataError, match="missing key 'data_subtype'"):
        vqa_v2.load_vqa_v2(q, root)
    assert vqa_v2.load_vqa_v2(q, root, data_subtype="val2014")[0].image_path.name == "COCO_val2014_000000000007.jpg"


def test_vqa_v2_skip_bad(vqa_set):
    q, a, root, questions, annotations = vqa_set
    questions["questions"][2]["question"] = ""  # invalid_value
    questions["questions"].append({"image_id": 9, "question": "Why?", "question_id": 91})  # no annotation
    annotations["annotations"][0]["answers"] = []  # question 90's annotation: bad, question dropped with it
    annotations["annotations"].append({**annotations["annotations"][1], "question_id": 93})  # no question
    write_json(q, questions)
    write_json(a, annotations)
    bad = BadRecords()
    got = vqa_v2.load_vqa_v2(q, root, a, bad=bad)
    assert [r.question_id for r in got] == [70]
    assert bad.counts == {"invalid_value": 2, "missing_annotation": 1, "unknown_question": 1}


def test_soft_scores_hand_computed():
    answers = ["red"] * 4 + ["dark red"] * 2 + ["maroon"] + ["crimson", "pink", "scarlet"]
    scores = vqa_v2.soft_scores(answers)
    # min(1, k/3): red 4 -> 1, dark red 2 -> 2/3, maroon 1 -> 1/3
    assert scores["red"] == 1.0 and scores["dark red"] == pytest.approx(2 / 3) and scores["maroon"] == pytest.approx(1 / 3)
    assert list(scores)[:3] == ["red", "dark red", "maroon"]
    exact = vqa_v2.soft_scores(answers, exact=True)
    # leave-one-out over 10: k=4 -> (4*1 + 6*1)/10 = 1; k=2 -> (2*(1/3) + 8*(2/3))/10 = 0.6;
    # k=1 -> (1*0 + 9*(1/3))/10 = 0.3
    assert exact["red"] == pytest.approx(1.0) and exact["dark red"] == pytest.approx(0.6) and exact["maroon"] == pytest.approx(0.3)
    # k=3 -> (3*(2/3) + 7*1)/10 = 0.9
    assert vqa_v2.soft_scores(["2"] * 3 + ["3"] * 7, exact=True)["2"] == pytest.approx(0.9)
    # raw strings: "2" and "two" are different answers
    assert vqa_v2.soft_scores(["2", "2", "2", "two", "two"]) == {"2": 1.0, "two": pytest.approx(2 / 3)}


def test_answer_vocab_and_targets(vqa_set):
    q, a, root, _, _ = vqa_set
    got = vqa_v2.load_vqa_v2(q, root, a)
    # one vote per question: "2", "no", "red" once each -> alphabetical
    assert vqa_v2.build_answer_vocab(got).answers == ["2", "no", "red"]
    # every human answer: no 9, 2 6, red 4, dark red 2, two 2, then 1-vote answers alphabetically
    all_answers = vqa_v2.build_answer_vocab(got, top_k=None, count="all").answers
    assert all_answers == ["no", "2", "red", "dark red", "two", "1", "3", "crimson", "maroon", "pink", "scarlet", "yes"]
    vocab = vqa_v2.build_answer_vocab(got, top_k=4, count="all")
    assert vocab.answers == ["no", "2", "red", "dark red"]
    car = got[0]  # red 4, dark red 2 (maroon etc. not in the vocabulary)
    assert vqa_v2.targets(car, vocab) == {2: 1.0, 3: pytest.approx(2 / 3)}
    assert vqa_v2.targets(car, vocab, exact=True) == {2: pytest.approx(1.0), 3: pytest.approx(0.6)}
    with pytest.raises(ValueError, match="no answered records"):
        vqa_v2.build_answer_vocab(vqa_v2.load_vqa_v2(q, root))


def test_write_results_official_format(tmp_path):
    path = tmp_path / "out" / "results.json"
    vqa_v2.write_results(path, {70: "red", 90: "2"})
    assert json.loads(path.read_text()) == [{"question_id": 70, "answer": "red"}, {"question_id": 90, "answer": "2"}]
    assert load_results(path) == {70: "red", 90: "2"}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left


# -------------------------------------------------------------------------------- JSON Lines


def test_jsonl_captions_resolved_and_grouped(tmp_path):
    write_image(tmp_path / "img" / "a.png", fmt="PNG")
    elsewhere = write_image(tmp_path / "other" / "b.jpg")
    path = tmp_path / "data" / "pairs.jsonl"
    path.parent.mkdir()
    lines = [
        {"image": "../img/a.png", "text": "first"},
        {"image": str(elsewhere), "text": ["b one", "b two"]},
        {},
        {"image": "../img/a.png", "text": "second", "extra": 1},
    ]
    path.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    got = jsonl.load_jsonl(path)
    assert [(r.image_path, r.captions) for r in got] == [(path.parent / "../img/a.png", ["first", "second"]), (elsewhere, ["b one", "b two"])]
    assert got[0].where == "lines 1, 4" and got[0].image_id == "../img/a.png" and isinstance(got[0], CaptionRecord)
    assert check_dataset(got).ok


def test_jsonl_vqa(tmp_path):
    path = tmp_path / "vqa.jsonl"
    path.write_text(
        json.dumps({"image": "x.jpg", "question": "colour?", "answer": "red"}) + "\n"
        + json.dumps({"image": "x.jpg", "question": "count?", "answer": ["2", "two", "2"], "question_id": 5, "answer_type": "number"}) + "\n"
    )
    first, second = jsonl.load_jsonl(path)
    assert isinstance(first, VQARecord)
    assert (first.image_path, first.question_id, first.answers, first.multiple_choice_answer) == (tmp_path / "x.jpg", 1, ["red"], "red")
    assert (second.question_id, second.answers, second.multiple_choice_answer, second.answer_type) == (5, ["2", "two", "2"], "2", "number")


def test_jsonl_bad_lines_name_file_line_and_key(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = [json.dumps({"image": f"{n}.jpg", "text": f"caption {n}"}) for n in range(3)]
    path.write_text("\n".join([good[0], '{"image": "x.jpg", "text": ', good[1], "[1, 2]", json.dumps({"image": "y.jpg"}), good[2]]) + "\n")
    with pytest.raises(DataError) as info:
        jsonl.load_jsonl(path)
    assert str(info.value).startswith(f"{path}: line 2: invalid JSON at column")
    path.write_text("\n".join([good[0], json.dumps({"image": "y.jpg"})]) + "\n")
    with pytest.raises(DataError) as info:
        jsonl.load_jsonl(path)
    assert str(info.value) == f"{path}: line 2: missing key 'text'" and info.value.key == "text"
    path.write_text("\n".join([good[0], "[1, 2]"]) + "\n")
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got list"):
        jsonl.load_jsonl(path)
    path.write_bytes(good[0].encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"line 2: not UTF-8"):
        jsonl.load_jsonl(path)

    path.write_text("\n".join([good[0], '{"image": "x.jpg", "text": ', good[1], "[1, 2]", json.dumps({"image": "y.jpg"}), good[2]]) + "\n")
    bad = BadRecords()
    got = jsonl.load_jsonl(path, bad=bad)
    assert [r.captions for r in got] == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert [r.where for r in got] == ["line 1", "line 3", "line 6"]
    assert bad.counts == {"invalid_json": 1, "not_an_object": 1, "missing_field": 1}


# -------------------------------------------------------------------- format detection, sources


def test_detect_format_rules(coco_set, karpathy_set, vqa_set, tmp_path):
    assert detect_format(coco_set[0]) == "coco"
    assert detect_format(karpathy_set[0]) == "karpathy"
    assert detect_format(vqa_set[0]) == "vqa" and detect_format(vqa_set[1]) == "vqa"
    assert detect_format(tmp_path / "anything.jsonl") == "jsonl"
    instances = write_json(tmp_path / "instances.json", {"images": [], "annotations": [], "categories": []})
    with pytest.raises(DataError, match="instances or keypoints"):
        detect_format(instances)
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(write_json(tmp_path / "odd.json", {"rows": []}))
    with pytest.raises(DataError, match="top level is a list"):
        detect_format(write_json(tmp_path / "list.json", [1]))


def test_load_source_each_format(coco_set, karpathy_set, vqa_set, tmp_path):
    source = load_source(coco_set[0], coco_set[1])
    assert (source.format, len(source.records), source.bad.total) == ("coco", 3, 0)
    assert len(load_source(karpathy_set[0], karpathy_set[1]).records) == 4
    assert len(load_source(karpathy_set[0], karpathy_set[1], split="val").records) == 1
    q, a, root = vqa_set[:3]
    for path in (q, a):  # either file of the pair finds the other by its official name
        source = load_source(path, root)
        assert source.format == "vqa" and [len(r.answers) for r in source.records] == [10, 10, 10]
    lines = tmp_path / "l.jsonl"
    lines.write_text(json.dumps({"image": "a.jpg", "text": "t"}) + "\n")
    assert load_source(lines).format == "jsonl"
    assert load_source(coco_set[0], coco_set[1], kind="coco").format == "coco"
    with pytest.raises(ValueError, match="needs the folder of its images"):
        load_source(coco_set[0])
    with pytest.raises(ValueError, match="unknown data format"):
        load_source(coco_set[0], coco_set[1], kind="csv")


# ------------------------------------------------------------------------------- bad images


def test_truncated_and_corrupt_images_fail_in_pil(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name, fmt in (("t.jpg", "JPEG"), ("t.png", "PNG")):
        path = truncate(write_image(tmp_path / name, size=(64, 64), fmt=fmt, noise_seed=1))
        with Image.open(path) as image:  # the header still reads...
            assert image.size == (64, 64)
            with pytest.raises((OSError, SyntaxError)):  # ...the pixels do not
                image.load()


@pytest.fixture
def mixed_images(tmp_path):
    """Caption records: good, missing, truncated JPEG, good, not an image, truncated PNG, good (shares
    the first image), too large for a 5000-pixel limit."""
    folder = tmp_path / "img"
    good = [write_image(folder / f"good{n}.jpg", color=(n * 60, 0, 0)) for n in range(2)]
    files = [
        good[0],
        folder / "missing.jpg",
        truncate(write_image(folder / "cut.jpg", size=(64, 64), noise_seed=2)),
        good[1],
        folder / "text.jpg",
        truncate(write_image(folder / "cut.png", size=(64, 64), fmt="PNG", noise_seed=3)),
        good[0],
        write_image(folder / "big.png", size=(80, 80)),
    ]
    (folder / "text.jpg").write_text("not an image")
    source = str(tmp_path / "captions.json")
    return [CaptionRecord(path, [f"caption {n}"], n, source, f"images[{n}] (id {n})") for n, path in enumerate(files)]


def test_check_dataset_raises_naming_file_record_and_image(mixed_images):
    with pytest.raises(DataError) as info:
        check_dataset(mixed_images)
    assert str(info.value) == f"{mixed_images[1].source}: images[1] (id 1): image {mixed_images[1].image_path}: image not found"
    assert info.value.kind == "missing_image"
    for n, kind in ((2, "corrupt_image"), (4, "corrupt_image"), (5, "corrupt_image")):
        with pytest.raises(DataError, match=rf"images\[{n}\] \(id {n}\): image .*") as info:
            check_dataset([mixed_images[0], mixed_images[n]])
        assert info.value.kind == kind
    with pytest.raises(DataError, match=r"images\[7\].*80x80 image exceeds the 5,000-pixel limit") as info:
        check_dataset([mixed_images[0], mixed_images[7]], max_pixels=5000)
    assert info.value.kind == "too_large"


def test_check_dataset_skip_bad_counts_and_keeps_good_in_order(mixed_images):
    before = list(mixed_images)
    report = check_dataset(mixed_images, skip_bad=True, max_pixels=5000)
    assert [r.image_id for r in report.records] == [0, 3, 6]
    assert report.bad.counts == {"missing_image": 1, "corrupt_image": 3, "too_large": 1}
    assert (report.num_records, report.num_images, report.ok) == (8, 7, False)
    assert mixed_images == before and report.records[0] is mixed_images[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    text = format_report(report)
    assert "good: 3" in text and "corrupt_image: 3" in text and "e.g." in text and "images[2] (id 2)" in text
    # Without decoding, the truncated files pass (their headers are intact): load=False checks headers only.
    quick = check_dataset(mixed_images, load=False, skip_bad=True, max_pixels=5000)
    assert quick.bad.counts == {"missing_image": 1, "corrupt_image": 1, "too_large": 1}


def test_check_warns_when_truncated_images_are_allowed(mixed_images, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        check_dataset(mixed_images[:1])


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or original(self))
    claims_huge = png_with_header(tmp_path / "bomb.png", 100_000, 100_000)  # above PIL's own refusal
    claims_large = png_with_header(tmp_path / "large.png", 9_000, 9_000)  # 81M: above MAX_PIXELS, below PIL's
    ordinary = write_image(tmp_path / "ordinary.png", size=(30, 30), fmt="PNG")
    for path, limit in ((claims_huge, records.MAX_PIXELS), (claims_large, records.MAX_PIXELS), (ordinary, 100)):
        with pytest.raises(DataError, match="not decoded") as info:
            check_image(path, max_pixels=limit)
        assert info.value.kind == "too_large" and str(path) in str(info.value)
    assert decoded == []
    assert check_image(ordinary) == (30, 30) and len(decoded) == 1  # the spy does see decoding


def test_load_source_and_check_together(tmp_path):
    write_image(tmp_path / "a.jpg")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join([json.dumps({"image": "a.jpg", "text": "ok"}), "oops", json.dumps({"image": "gone.jpg", "text": "no file"})]) + "\n")
    with pytest.raises(DataError, match=r"line 2: invalid JSON"):
        load_source(path)
    source = load_source(path, skip_bad=True)
    report = check_dataset(source, skip_bad=True)
    assert report.bad.counts == {"invalid_json": 1, "missing_image": 1}
    assert (report.num_records, [r.captions for r in report.records]) == (3, [["ok"]])
    assert report.as_dict()["num_good"] == 1 and report.format == "jsonl"
    assert format_report(check_dataset([r for r in source.records if r.captions == ["ok"]])).endswith("no bad records")


def test_data_check_command(tmp_path, capsys):
    from mmt.cli import main

    write_image(tmp_path / "a.png", fmt="PNG")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "one"}) + "\n" + json.dumps({"image": "missing.png", "text": "two"}) + "\n"
                    + json.dumps({"image": "broken.png", "text": "three"}) + "\n")
    assert main(["data", "check", str(path)]) == 2  # stops at the first bad record, naming it
    assert "missing.png" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert main(["data", "check", str(path), "--skip-bad", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["num_good"] == 1 and report["bad"]["total"] == 2
    assert "skipped: 2" in capsys.readouterr().out
