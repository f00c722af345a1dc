"""Devices and precision: one rule (mmt.devices) for training, evaluation and prediction. The
tests marked by `needs_gpu` run where torch sees a CUDA GPU and are skipped elsewhere."""

import json

import pytest
import torch

import mmt
from mmt.cli import main
from mmt.devices import autocast, autocast_dtype, bf16_supported, choose_device

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")
TINY = ["data.num_train=8", "data.num_test=4", "train.steps=4", "train.batch_size=4", "train.warmup_steps=1",
        "train.eval_every=4", "train.save_every=4", "model.vision.encoder.depth=1", "model.fusion_encoder.depth=1"]


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


def test_the_precision_rule():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if bf16_supported(cpu) else None)  # never fp16 on a CPU
    with pytest.raises(ValueError, match="precision 'fp8' is not one of auto, bf16, fp16, fp32"):
        autocast_dtype("fp8", cpu)
    with autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_device_names():
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not one torch knows"):
        choose_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            choose_device("cuda:0")


@pytest.mark.e2e
def test_a_cpu_run_says_where_it_ran(tmp_path, capsys):
    assert main(["train", "vqa", str(tmp_path / "run"), "--no-progress", *sets(TINY + ["train.device=cpu", "train.precision=fp32"])]) == 0
    assert "on cpu, fp32 (train.device=cpu, train.precision=fp32)" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--precision", "bf16"]) == 0
    assert "overall" in json.loads((tmp_path / "run" / "eval.json").read_text())


@needs_gpu
@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_training_evaluation_and_prediction(tmp_path, precision, capsys):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run = tmp_path / "run"
    assert main(["train", "vqa", str(run), "--no-progress", *sets(TINY + ["train.device=cuda", f"train.precision={precision}"])]) == 0
    assert "on cuda:0 (" in capsys.readouterr().out
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in logged if "loss" in r)  # finite, not NaN
    assert (precision == "fp16") == any("loss_scale" in r for r in logged)
    assert main(["eval", str(run), "--device", "cuda", "--precision", precision]) == 0
    gpu = mmt.load(run, device="cuda", dtype=precision)
    cpu = mmt.load(run, device="cpu")
    from mmt.data.worlds import sort_of_clevr

    data = sort_of_clevr.SortOfClevr.generate(2, seed=5)
    questions = [q.text for q in data.questions[:2]]
    answers_gpu = gpu.answer(list(data.images[:1]) * 2, questions)
    answers_cpu = cpu.answer(list(data.images[:1]) * 2, questions)
    for a, b in zip(answers_gpu, answers_cpu):
        assert abs(a["score"] - b["score"]) < 0.05
