"""Tiny train -> checkpoint -> crash -> resume -> eval -> predict, on the built-in data."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mmt import checkpoint
from mmt import train as train_lib
from mmt.cli import main
from mmt.config import apply_overrides
from mmt.data.worlds import sort_of_clevr
from mmt.tasks.vqa import VQARunConfig, VQATask
from tests.own_data import shapes_images

TINY = [
    "data.num_train=6",
    "data.num_test=3",
    "train.steps=4",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.log_every=1",
    "model.vision.encoder.depth=1",
    "model.fusion_encoder.depth=1",
]


def tiny_cfg(extra=()):
    return apply_overrides(VQARunConfig(), TINY + list(extra))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vqa") / "run"
    assert main(["train", "vqa", str(directory), "--no-progress", *sum((["--set", s] for s in TINY), [])]) == 0
    return directory


@pytest.mark.e2e
def test_run_directory_layout(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"run_config.json", "tokenizer.json", "answers.json", "metrics.jsonl", "checkpoints", "model"} <= names
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert {p.name for p in ckpt.iterdir()} == {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval" in r] == [2, 4]
    assert set(records[-1]["eval"]) >= {"overall", "non-relational", "relational", "closest", "count"}


# the second case crashes inside the steps whose BatchNorm statistics are averaged for the
# evaluation at step 4 (steps 2-4): the checkpoint of step 2 holds half of that average
# the third case ends its curriculum on training accuracy at step 1, before the crash: the
# resumed run must know that from the checkpoint and train its steps on all questions
@pytest.mark.e2e
@pytest.mark.parametrize("extra", [[], ["train.eval_every=4", "train.batchnorm_average_steps=3"], ["curriculum_until=1e-9"]])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, extra):
    straight = tmp_path / "straight"
    train_lib.train(VQATask(tiny_cfg(extra)), straight, progress=False)
    if extra == ["curriculum_until=1e-9"]:
        ends = [json.loads(l)["curriculum_end"] for l in (straight / "metrics.jsonl").read_text().splitlines() if "curriculum_end" in l]
        assert ends == [1]

    crashed = tmp_path / "crashed"
    task = VQATask(tiny_cfg(extra))
    real_batch = task.train_batch

    def crash_at_step_3(step, part=0, parts=1):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_batch(step, part, parts)

    task.train_batch = crash_at_step_3
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(task, crashed, progress=False)
    assert train_lib.latest_checkpoint(crashed).name == "step-0000002"
    train_lib.train(VQATask(tiny_cfg(extra)), crashed, resume=True, progress=False)

    a = checkpoint.read_weights(straight / "model" / "model.safetensors")
    b = checkpoint.read_weights(crashed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses(crashed) == pytest.approx(losses(straight), abs=1e-6)  # the crashed step's line is gone too


@pytest.mark.e2e
def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_lib.train(VQATask(tiny_cfg()), tmp_path, resume=True, progress=False)


@pytest.mark.e2e
def test_eval_prints_a_table_and_writes_json(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for row in ("overall", "non-relational", "relational", "shape", "left", "top", "closest", "furthest", "count"):
        assert row in out
    result = json.loads((run_dir / "eval.json").read_text())
    assert 0.0 <= result["overall"] <= 1.0 and result.keys() >= {"closest", "furthest", "count"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    data = sort_of_clevr.SortOfClevr.generate(1, 7)
    Image.fromarray(data.images[0]).save(folder / "scene.png")
    rgba = np.concatenate([data.images[0], np.full((75, 75, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).resize((150, 150)).save(folder / "big_rgba.png")
    Image.fromarray(data.images[0]).convert("L").save(folder / "gray.jpg")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return folder


@pytest.mark.e2e
def test_predict_one_question(run_dir, images, capsys):
    question = "What is the shape of the red object?"
    assert main(["predict", str(run_dir), "--image", str(images / "scene.png"), "--question", question, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["answer"] in sort_of_clevr.ANSWERS and 0.0 <= answer["score"] <= 1.0
    for name in ("big_rgba.png", "gray.jpg"):  # any size or mode is converted
        assert main(["predict", str(run_dir), "--image", str(images / name), "--question", question]) == 0


@pytest.mark.e2e
def test_batch_predict_reports_bad_lines_and_answers_the_rest(run_dir, images, tmp_path, capsys):
    lines = [
        json.dumps({"image": str(images / "scene.png"), "question": "Is the blue object on the left?", "id": 7}),
        json.dumps({"image": str(images / "missing.png"), "question": "Is the red object on the top?"}),
        json.dumps({"image": str(images / "corrupt.png"), "question": "Is the red object on the top?"}),
        json.dumps({"image": str(images / "scene.png"), "question": "   "}),
        "{not json",
        json.dumps({"question": "no image here"}),
        json.dumps({"image": "gray.jpg", "question": "How many objects have the same shape as the gray object?"}),
    ]
    src = images / "questions.jsonl"  # relative image paths resolve against the input file's folder
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    assert main(["predict", str(run_dir), "--input", str(src), "--out", str(out)]) == 1
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(lines)
    assert results[0]["id"] == 7 and results[0]["answer"] in sort_of_clevr.ANSWERS and "error" not in results[0]
    assert results[6]["answer"] in sort_of_clevr.ANSWERS
    expected = {1: "image not found", 2: "corrupt.png: ", 3: "'question' is empty", 4: "invalid JSON", 5: "missing key 'image'"}
    for index, reason in expected.items():
        assert results[index]["answer"] is None and reason in results[index]["error"]
        assert results[index]["error"].startswith(f"line {index + 1}:")
    err = capsys.readouterr().err
    assert f"{src}:2: " in err and f"{src}:5: " in err
    assert main(["predict", str(run_dir), "--input", str(src)]) == 2  # --input needs --out
    assert "--input needs --out" in capsys.readouterr().err


@pytest.mark.e2e
def test_train_refuses_to_overwrite_a_run(run_dir, capsys):
    assert main(["train", "vqa", str(run_dir), "--set", "train.steps=1"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(["train", "vqa", str(run_dir) + "-x", "--set", "model.fusion=sideways"]) == 2
    assert "model.fusion: 'sideways' is not one of" in capsys.readouterr().err


@pytest.mark.e2e
def test_vqa_trains_and_evaluates_on_your_own_json_lines(tmp_path, capsys):
    split = shapes_images(tmp_path, 10, seed=2)
    lines = []
    for i, qas in enumerate(split.qa):
        for qa in qas:
            kind = "yes/no" if qa.answer in ("yes", "no") else "other"
            lines.append(json.dumps({"image": f"img/{i}.png", "question": qa.question, "answer": [qa.answer] * 3 + ["maybe"], "answer_type": kind}))
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    overrides = [f"source.train={tmp_path / 'qa.jsonl'}", "model.vision.image_size=32", "train.steps=2", "train.batch_size=3",
                 "train.warmup_steps=1", "train.eval_every=2", "train.save_every=2", "model.vision.encoder.depth=1"]
    assert main(["train", "vqa", str(run), "--no-progress", *sum((["--set", s] for s in overrides), [])]) == 0
    answers = json.loads((run / "answers.json").read_text())["answers"]
    assert "maybe" not in answers and "yes" in answers  # each question's most frequent human answer; no built-in answers added
    assert main(["eval", str(run), "--set", f"source.test={tmp_path / 'qa.jsonl'}"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert set(result) == {"overall", "other", "yes/no"}


def test_several_human_answers_give_soft_targets_and_vqa_accuracy():
    from mmt.data.answers import AnswerVocab
    from mmt.tasks.vqa import Question, QuestionSet, VQASplit
    from mmt.text import Tokenizer

    humans = ("red",) * 4 + ("dark red",) * 2 + ("maroon",) + ("blue",) * 3  # 10 answers
    split = VQASplit(np.zeros((1, 75, 75, 3), np.uint8), [Question(0, "what colour?", "red", ("overall", "other"), humans)])
    vocab = AnswerVocab(["red", "dark red", "blue"])  # "maroon" is outside the vocabulary
    cfg = tiny_cfg()
    questions = QuestionSet(split, Tokenizer.train(["what colour?"]), vocab, cfg.model)
    # min(1, k/3): red 4 -> 1, dark red 2 -> 2/3, blue 3 -> 1
    torch.testing.assert_close(questions.answers, torch.tensor([[1.0, 2 / 3, 1.0]]))
    batch = questions.batch(np.array([0]))
    for predicted, score in ((0, 1.0), (1, 2 / 3)):
        logits = torch.full((1, 3), -5.0)
        logits[0, predicted] = 5.0
        assert VQATask.batch_accuracy({"answer_logits": logits}, batch) == (pytest.approx(score), 1)


def logged(caplog) -> str:
    """The messages logged since the last call, a line each."""
    text = "".join(record.getMessage() + "\n" for record in caplog.records)
    caplog.clear()
    return text


def test_curriculum_trains_on_its_question_types_first(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmt")
    task = VQATask(tiny_cfg(["curriculum_steps=2", "curriculum_until=0"]))
    task.prepare(tmp_path)
    assert "curriculum: steps 1-2 train on 84 non-relational/count questions, then on all\n" in logged(caplog)

    def kinds(step):
        texts = [task.tokenizer.decode(row) for row in task.train_batch(step)["question_ids"]]
        return {"count" if "how many" in t else "closest/furthest" if "closest" in t or "furthest" in t else "non-relational" for t in texts}

    assert kinds(0) == kinds(1) == {"non-relational", "count"}
    assert kinds(2) == {"non-relational", "count", "closest/furthest"}
    assert len(task.train_batch(2)["question_ids"]) == 2 * 20
    assert 2 * 10 < len(task.train_batch(0)["question_ids"]) < 2 * 20

    only = VQATask(tiny_cfg(["curriculum_steps=2", "curriculum=[\"non-relational\"]"]))
    only.prepare(tmp_path)
    assert "train on 60 non-relational questions" in logged(caplog)
    assert len(only.train_batch(0)["question_ids"]) == 2 * 10

    shapes_task = VQATask(apply_overrides(VQARunConfig(), ["dataset=shapes", "shapes.num_train=4", "shapes.num_val=2", "shapes.num_test=1",
                                                          "model.vision.image_size=64", "curriculum_steps=2"]))
    (tmp_path / "shapes").mkdir()
    shapes_task.prepare(tmp_path / "shapes")  # the shapes world has "count" questions, but not every curriculum type
    assert "no training question has type non-relational; training on all questions from the start" in logged(caplog)
    assert shapes_task.curriculum_rows is None


def test_curriculum_ends_when_its_training_accuracy_reaches_curriculum_until(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmt")
    task = VQATask(tiny_cfg(["curriculum_steps=50", "curriculum_until=0.9"]))
    task.prepare(tmp_path)
    assert ("all 4 steps train on 84 non-relational/count questions (curriculum_steps=50); it ends early if their training accuracy reaches 0.9"
            in logged(caplog))
    per_image = lambda step: len(task.train_batch(step)["question_ids"]) // 2
    assert task.observe(10, {"train_accuracy": 0.89}) == {} and per_image(10) < 20
    assert task.observe(20, {"train_accuracy": 0.9}) == {"curriculum_end": 20}
    assert "training accuracy 0.9000 reached 0.9 at step 20; all questions from here" in logged(caplog)
    assert per_image(19) < 20 and per_image(20) == 20
    assert task.observe(30, {"train_accuracy": 0.95}) == {}  # ended once
    assert task.state() == {"curriculum_end": 20}
    again = VQATask(tiny_cfg(["curriculum_steps=50", "curriculum_until=0.9"]))
    again.prepare(tmp_path)
    again.load_state(task.state())
    assert again.curriculum_end == 20

    off = VQATask(tiny_cfg(["curriculum_steps=50", "curriculum_until=0"]))
    off.prepare(tmp_path)
    assert off.observe(10, {"train_accuracy": 1.0}) == {} and off.curriculum_end == 50
    with pytest.raises(ValueError, match=r"curriculum_until: 1\.5 is out of range \(must be in \[0, 1\]\)"):  # a training accuracy
        tiny_cfg(["curriculum_until=1.5"])


@pytest.mark.e2e
def test_batchnorm_statistics_are_the_even_average_of_the_last_steps(tmp_path):
    # the saved model's BatchNorm statistics: the plain mean of the batch statistics of the
    # last 3 training steps before the final evaluation (fp32: the hook sees bf16 inputs under
    # autocast on a CPU that has it, and its means would not match to the tolerance)
    cfg = tiny_cfg(["train.steps=6", "train.eval_every=6", "train.batchnorm_average_steps=3", "train.precision=fp32"])
    task, seen = VQATask(cfg), []
    build = task.build_model

    def build_with_hook(model_cfg):
        model = build(model_cfg)
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()) if m.training else None)
        return model

    task.build_model = build_with_hook
    train_lib.train(task, tmp_path / "run", progress=False)
    assert len(seen) == 6
    weights = checkpoint.read_weights(tmp_path / "run" / "model" / "model.safetensors")
    name = next(k for k in weights if k.endswith("running_mean"))
    means = torch.stack([x.mean((0, 2, 3)) for x in seen])
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in seen])  # unbiased, as torch keeps it
    assert torch.allclose(weights[name], means[3:].mean(0), atol=1e-5)
    assert torch.allclose(weights[name.replace("mean", "var")], variances[3:].mean(0), atol=1e-4)
    assert not torch.allclose(weights[name], means.mean(0), atol=1e-3)  # not every step's
    assert weights[name.replace("running_mean", "num_batches_tracked")].item() == 3


def test_batchnorm_averaging_schedule():
    cfg = train_lib.TrainConfig(steps=25, eval_every=10, batchnorm_average_steps=3)
    plan = [train_lib.batchnorm_averaging(step, cfg) for step in range(25)]
    assert [s for s, (average, _) in enumerate(plan) if average] == [7, 8, 9, 17, 18, 19, 22, 23, 24]
    assert [s for s, (_, restart) in enumerate(plan) if restart] == [7, 17, 22]
    off = train_lib.TrainConfig(steps=25, eval_every=10, batchnorm_average_steps=0)
    assert not any(any(train_lib.batchnorm_averaging(step, off)) for step in range(25))


def test_curriculum_longer_than_the_run_says_the_whole_run_uses_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmt")
    VQATask(tiny_cfg(["curriculum_until=0"])).prepare(tmp_path)  # default curriculum_steps=3000 > 4 steps
    assert "curriculum: all 4 steps train on 84 non-relational/count questions (curriculum_steps=3000)\n" in logged(caplog)


def _generated_lines(rng: np.random.Generator, images, n: int) -> list[bytes]:
    """`n` JSON Lines input lines drawn from what such a file can legally (and not) hold: good
    records, other JSON values, fields of other types, text a tokenizer may choke on, line
    separators that are not newlines, bytes that are not UTF-8, blank lines, CRLF endings."""
    texts = [
        "Is the red object on the left?", "   ", "", "what\u2028is\u2029this\x85?", "\u3000", "日本語の質問",
        "emoji 🙂 question", "a\x00b", "word " * 300, "[MASK] [PAD] [BOS]", "\r", "?" * 5,
    ]
    image_values = [str(images / "scene.png"), "gray.jpg", str(images / "missing.png"), "corrupt.png", 123, None, [], "  "]
    lines = []
    for _ in range(n):
        kind = rng.integers(0, 10)
        if kind < 5:  # a record, its fields drawn from good and bad values
            record = {"image": image_values[rng.integers(len(image_values))], "question": texts[rng.integers(len(texts))]}
            if rng.random() < 0.15:
                del record["question" if rng.random() < 0.5 else "image"]
            if rng.random() < 0.2:
                record["question"] = [None, 7, {"a": 1}, ["q"]][rng.integers(4)]
            if rng.random() < 0.3:
                record["id"] = int(rng.integers(1000))
            line = json.dumps(record, ensure_ascii=bool(rng.random() < 0.5)).encode()
        elif kind == 5:
            line = [b"[1, 2, 3]", b"null", b"42", b'"text"', b"true"][rng.integers(5)]
        elif kind == 6:
            line = [b"{not json", b'{"image": "a.png",', b"\xff\xfe bad bytes", b'{"question": "caf\xe9"}'][rng.integers(4)]
        elif kind == 7:
            line = b""
        else:
            record = {"image": str(images / "scene.png"), "question": texts[0]}
            line = json.dumps(record).encode() + (b"\r" if kind == 8 else b"")
        lines.append(line)
    return lines


def _answerable(number: int, raw: bytes, base) -> bool:
    """Whether line `number` is a record the model can answer (the contract's oracle)."""
    try:
        record = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(record, dict):
        return False
    image, question = record.get("image"), record.get("question")
    if not (isinstance(image, str) and image.strip() and isinstance(question, str) and question.strip()):
        return False
    try:
        Image.open(base / image).load()
    except Exception:
        return False
    return True


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_predict_answers_every_line_in_order_for_generated_inputs(run_dir, images, tmp_path, capsys, seed):
    # the contract: one output line per input line, in order; every good line answered; every bad
    # line given "error": "line N: ..."; the exit status says whether any line failed
    rng = np.random.default_rng(seed)
    lines = _generated_lines(rng, images, 60)
    if seed == 1:
        lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte-order mark before the first line
    src = images / f"generated-{seed}.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    status = main(["predict", str(run_dir), "--input", str(src), "--out", str(out)])
    results = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert len(results) == len(lines)
    good = [_answerable(number, raw, images) for number, raw in enumerate(lines, 1)]
    for number, (result, ok) in enumerate(zip(results, good), 1):
        if ok:
            assert "error" not in result and result["answer"] in sort_of_clevr.ANSWERS, (number, lines[number - 1], result)
        else:
            assert result["answer"] is None and result["error"].startswith(f"line {number}: "), (number, lines[number - 1], result)
        if ok and b'"id"' in lines[number - 1]:
            assert result["id"] == json.loads(lines[number - 1].decode("utf-8-sig"))["id"]  # other keys are copied
    assert status == (0 if all(good) else 1) and any(good) and not all(good)
    capsys.readouterr()


@pytest.mark.e2e
def test_batch_predict_checks_its_output_before_any_work(run_dir, images, tmp_path, capsys):
    src = tmp_path / "questions.jsonl"
    src.write_text(json.dumps({"image": str(images / "scene.png"), "question": "Is the red object on the left?"}) + "\n")
    before = src.read_bytes()
    cases = {str(src): "is the input file", str(tmp_path): "is a folder", str(tmp_path / "no" / "out.jsonl"): "does not exist"}
    for out, reason in cases.items():
        assert main(["predict", str(run_dir), "--input", str(src), "--out", out]) == 2
        assert reason in capsys.readouterr().err
    assert src.read_bytes() == before and not (tmp_path / "no").exists()


def test_own_vqa_images_stay_on_disk_for_training_and_split_into_equal_shares(tmp_path):
    """Own VQA data: training images are decoded per batch (the shares of a step make up the
    whole step's images, the ones the pipeline fits), validation images are held as uint8."""
    from mmt.data.images import Fit, load_image, to_pixels
    from mmt.data.loader import ImageFiles, Pixels
    from mmt.tasks.vqa import VQATask

    split = shapes_images(tmp_path, 12, seed=3)
    lines = [json.dumps({"image": f"img/{i}.png", "question": qa.question, "answer": qa.answer}) for i, qas in enumerate(split.qa) for qa in qas]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines) + "\n")
    cfg = apply_overrides(VQARunConfig(), [f"source.train={tmp_path / 'qa.jsonl'}", "source.workers=0", "model.vision.image_size=16",
                                           "train.batch_size=4"])
    task = VQATask(cfg)
    (tmp_path / "run").mkdir()
    task.prepare(tmp_path / "run")
    assert isinstance(task.train_set.split.images, ImageFiles) and len(task.train_set.split.images) == 11  # the last image held out
    assert isinstance(task.eval_set.pixels, Pixels) and len(task.eval_set.pixels) == 1
    whole = task.train_batch(5)
    images, _ = task._train_images(5, 0, 1)
    paths = task.train_set.split.images.paths
    assert torch.equal(whole["pixels"], to_pixels(np.stack([load_image(paths[i], Fit(16)) for i in images])))
    halves = [task.train_batch(5, part, 2) for part in range(2)]
    for key in ("pixels", "question_ids"):
        assert torch.equal(torch.cat([h[key] for h in halves]), whole[key])
