"""Multi-process training: 2 gloo processes == 1 process on the whole batch; gradient
accumulation == one big step; activation checkpointing changes nothing but memory."""

import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmt import checkpoint
from mmt import train as train_lib
from mmt.config import apply_overrides
from mmt.tasks.retrieval import RetrievalRunConfig, RetrievalTask
from mmt.tasks.vqa import VQARunConfig, VQATask

# contrastive loss only (matching draws its negatives at random per process), GroupNorm stem,
# fp32 (on a CPU with bf16, autocast would round a split batch differently from a whole one,
# far above the tolerances below)
RETRIEVAL = [
    "data.image_size=32", "data.num_train=32", "data.num_val=4", "data.num_test=1",
    "train.steps=3", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=3", "train.save_every=3",
    "train.log_every=1", "train.threads=1", "train.dist_timeout=60", "train.precision=fp32",
    "model.losses.itm=0", "model.losses.mlm=0", "model.losses.lm=0",
]


def retrieval_cfg(extra=()):
    from mmt import registry

    cfg = RetrievalRunConfig(model=registry.preset("retrieval-tiny"))
    return apply_overrides(cfg, [*RETRIEVAL, *extra])


def _worker(rank: int, world: int, port: int, run_dir: str, task: str = "retrieval") -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    made = RetrievalTask(retrieval_cfg()) if task == "retrieval" else VQATask(apply_overrides(VQARunConfig(), VQA))
    train_lib.train(made, run_dir, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_dir):
    return checkpoint.read_weights(run_dir / "model" / "model.safetensors")


def _train_in_two_processes(run_dir: Path, task: str) -> None:
    context = mp.start_processes(_worker, args=(2, _free_port(), str(run_dir), task), nprocs=2, join=False, start_method="spawn")
    try:
        finished = context.join(timeout=180)  # a broken process group fails the test instead of hanging it
        while not finished:
            finished = context.join(timeout=1)
            if all(p.is_alive() for p in context.processes):
                pytest.fail("the 2-process gloo run did not finish in 180 s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_two_gloo_processes_reach_the_weights_of_one_process(tmp_path):
    together, split = tmp_path / "one", tmp_path / "two"
    train_lib.train(RetrievalTask(retrieval_cfg()), together, progress=False)
    _train_in_two_processes(split, "retrieval")
    a, b = _weights(together), _weights(split)
    assert a.keys() == b.keys()
    # Key biases get a zero gradient in exact arithmetic (softmax ignores a constant added to
    # every score); what they get is rounding noise, which AdamW scales up to full-size
    # steps, so they differ by noise whatever the layout. Every other tensor must agree.
    # Elsewhere AdamW's division by sqrt(v) lets summation-order rounding move an entry whose
    # gradient is near zero by a fraction of a step (one fc1 entry of 16,384 by 1.2e-4 seen);
    # a real difference in the loss moves most entries of every tensor by the size of a step:
    # contrasting each process's half alone moved over 92% of each tensor's entries by more
    # than 3e-5, by up to ~4e-3 (measured). So: at most 0.1% of a tensor's entries may differ
    # by more than 3e-5, and none by more than 5e-4.
    noise_only = [k for k in a if k.endswith("k_proj.bias")]
    start = _initial_weights()
    for key in a.keys() - set(noise_only):
        difference = (b[key] - a[key]).abs()
        assert (difference > 3e-5).float().mean() <= 1e-3, (key, difference.max())
        torch.testing.assert_close(b[key], a[key], atol=5e-4, rtol=0, msg=key)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 5e-4
    # rank 0 alone wrote the log, with the losses of the whole batch
    logs = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    solo = [json.loads(line) for line in (together / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 3]
    for x, y in zip([r for r in logs if "loss" in r], [r for r in solo if "loss" in r]):
        assert x["itc_loss"] == pytest.approx(y["itc_loss"], abs=1e-5)
        assert x["train_accuracy"] == pytest.approx(y["train_accuracy"])
    assert len([p for p in (split / "checkpoints").iterdir()]) == 1


def _initial_weights() -> dict[str, torch.Tensor]:
    """The weights the trainer starts from (same seed, same config as a run)."""

    task = RetrievalTask(retrieval_cfg())
    with tempfile.TemporaryDirectory() as directory:
        model_cfg = task.prepare(Path(directory))
    torch.manual_seed(0)
    return task.build_model(model_cfg).state_dict()


def _assert_same_weights(plain: Path, other: Path) -> None:
    a, b = _weights(plain), _weights(other)
    # key biases get only rounding noise as gradient (softmax ignores a shift shared by all
    # of a query's scores), which AdamW scales up to full steps: see the test above
    for key in [k for k in a if not k.endswith("k_proj.bias")]:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def _shares_differ(task) -> bool:
    """Whether the 2 shares of the first two steps' batches hold different numbers of loss terms."""
    return any(task.loss_terms(task.train_batch(step, 0, 2)) != task.loss_terms(task.train_batch(step, 1, 2)) for step in range(2))


# the default curriculum is on: its count questions vary in number per image, so micro-steps
# hold unequal numbers of questions and must weigh by them to match the plain step
VQA = [
    "data.num_train=8", "data.num_test=2", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
    "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.threads=1", "train.precision=fp32",
    "model.vision.encoder.depth=1", "model.fusion_encoder.depth=1", "model.vision.conv_norm=group",
]


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [["train.accumulate=2"], ["train.accumulate=4"], ["train.activation_checkpointing=true"]])
def test_accumulation_and_activation_checkpointing_match_the_plain_step(tmp_path, extra):
    plain, other = tmp_path / "plain", tmp_path / "other"
    train_lib.train(VQATask(apply_overrides(VQARunConfig(), VQA)), plain, progress=False)
    train_lib.train(VQATask(apply_overrides(VQARunConfig(), [*VQA, *extra])), other, progress=False)
    _assert_same_weights(plain, other)


CAPTION = [
    "data.image_size=32", "data.num_train=16", "data.num_val=4", "data.num_test=1", "train.steps=2", "train.batch_size=4",
    "train.warmup_steps=1", "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.threads=1",
    "train.precision=fp32", "model.vision.conv_norm=group",
]


@pytest.mark.e2e
def test_caption_accumulation_weighs_micro_steps_by_target_tokens(tmp_path):
    # captions differ in length, so micro-steps hold unequal numbers of target tokens
    from mmt import registry
    from mmt.tasks.caption import CaptionRunConfig, CaptionTask

    def task(extra=()):
        return CaptionTask(apply_overrides(CaptionRunConfig(model=registry.preset("caption-tiny")), [*CAPTION, *extra]))

    plain, other = tmp_path / "plain", tmp_path / "other"
    train_lib.train(task(), plain, progress=False)
    split = task(["train.accumulate=2"])
    train_lib.train(split, other, progress=False)
    assert _shares_differ(split)
    _assert_same_weights(plain, other)


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_two_processes_weigh_their_shares_by_questions(tmp_path):
    # during the curriculum each process's share holds its own number of questions: the two
    # processes' step must still be the plain step over all of them
    plain, split = tmp_path / "plain", tmp_path / "two"
    train_lib.train(VQATask(apply_overrides(VQARunConfig(), VQA)), plain, progress=False)
    _train_in_two_processes(split, "vqa")
    _assert_same_weights(plain, split)
    task = VQATask(apply_overrides(VQARunConfig(), VQA))
    (tmp_path / "shares").mkdir()
    task.prepare(tmp_path / "shares")
    assert _shares_differ(task)  # unequal shares, so the weighing is exercised


@pytest.mark.e2e
def test_batch_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="train.accumulate=3"):
        train_lib.train(VQATask(apply_overrides(VQARunConfig(), [*VQA, "train.accumulate=3"])), tmp_path / "r", progress=False)
