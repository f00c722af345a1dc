"""Nothing lost: a training process killed with SIGKILL, mid-run or mid-checkpoint, resumes
to the weights and logged losses of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmt import checkpoint
from mmt.cli import main
from mmt.train import latest_checkpoint

TINY = [
    "data.num_train=8", "data.num_test=2", "train.steps=6", "train.batch_size=2", "train.warmup_steps=1",
    "train.eval_every=6", "train.save_every=2", "train.log_every=1", "train.threads=1",
    "model.vision.encoder.depth=1", "model.fusion_encoder.depth=1",
]

# Runs `mmt train vqa` in a child process that stops (and says so in a flag file) at a chosen
# point, so the test can SIGKILL it exactly there.
DRIVER = """
import sys, time
from pathlib import Path
import mmt.tasks.vqa, mmt.trainer_state
from mmt.cli import main

where, flag, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def stop_here():
    flag.write_text("stopped")
    time.sleep(600)

if where == "step":  # before training step 3 (index 3), after checkpoint step-2
    real = mmt.tasks.vqa.VQATask.train_batch
    def train_batch(self, step, part=0, parts=1):
        if step == 3:
            stop_here()
        return real(self, step, part, parts)
    mmt.tasks.vqa.VQATask.train_batch = train_batch
else:  # half-way through writing checkpoint step-4's optimizer file
    real_write = mmt.trainer_state.atomic_write
    def atomic_write(path, write):
        if ".tmp-step-0000004" in str(path) and Path(path).name == "optimizer.safetensors":
            Path(path).with_name(".optimizer.safetensors.partial").write_bytes(b"half a file")
            stop_here()
        return real_write(path, write)
    mmt.trainer_state.atomic_write = atomic_write
main(argv)
"""


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


def kill_at(where: str, run_dir: Path, tmp_path: Path) -> None:
    flag = tmp_path / f"stopped-{where}"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [sys.executable, str(driver), where, str(flag), "train", "vqa", str(run_dir), "--no-progress", *sets(TINY)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, f"the run ended before the kill point: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL


def assert_same_run(a: Path, b: Path) -> None:
    wa = checkpoint.read_weights(a / "model" / "model.safetensors")
    wb = checkpoint.read_weights(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) <= 1e-6
    logged = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    losses = [[(r["step"], r["answer_loss"]) for r in log if "answer_loss" in r] for log in logged]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == [1, 2, 3, 4, 5, 6]
    evals = [[r["eval"] for r in log if "eval" in r] for log in logged]
    assert evals[0] == evals[1]


def straight_run(tmp_path: Path) -> Path:
    run = tmp_path / "straight"
    assert main(["train", "vqa", str(run), "--no-progress", *sets(TINY)]) == 0
    return run


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    kill_at("step", killed, tmp_path)
    assert latest_checkpoint(killed).name == "step-0000002"
    assert main(["train", "vqa", str(killed), "--resume", "--no-progress"]) == 0
    assert_same_run(straight_run(tmp_path), killed)


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path):
    killed = tmp_path / "killed"
    kill_at("checkpoint", killed, tmp_path)
    ckpts = killed / "checkpoints"
    assert (ckpts / ".tmp-step-0000004").is_dir() and not (ckpts / "step-0000004").exists()  # the half-written one
    assert latest_checkpoint(killed).name == "step-0000002"
    # the previous good checkpoint is whole: its files parse (read_weights raises on damage)
    assert checkpoint.read_weights(ckpts / "step-0000002" / "optimizer.safetensors")
    assert json.loads((ckpts / "step-0000002" / "trainer_state.json").read_text())["step"] == 2
    assert main(["train", "vqa", str(killed), "--resume", "--no-progress"]) == 0
    assert not (ckpts / ".tmp-step-0000004").exists()  # cleaned up when step 4 was written again
    assert_same_run(straight_run(tmp_path), killed)


def _nan_at(task, steps):
    """Make the batches of these step indices produce a NaN loss (NaN pixels)."""
    real = task.train_batch

    def train_batch(step, part=0, parts=1):
        batch = real(step, part, parts)
        if step in steps:
            batch["pixels"] = torch.full_like(batch["pixels"], float("nan"))
        return batch

    task.train_batch = train_batch
    return task


@pytest.mark.e2e
def test_a_non_finite_step_is_skipped_and_logged(tmp_path):
    from mmt import train as train_lib
    from mmt.config import apply_overrides
    from mmt.tasks.vqa import VQARunConfig, VQATask

    task = _nan_at(VQATask(apply_overrides(VQARunConfig(), TINY)), {2})
    train_lib.train(task, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped" in r]
    assert [(r["step"], r["batch_step"]) for r in skipped] == [(3, 2)]
    weights = checkpoint.read_weights(tmp_path / "run" / "model" / "model.safetensors")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())  # the NaN step never reached the weights


@pytest.mark.e2e
def test_non_finite_steps_in_a_row_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    from mmt import train as train_lib
    from mmt.config import apply_overrides
    from mmt.tasks.vqa import VQARunConfig, VQATask

    task = _nan_at(VQATask(apply_overrides(VQARunConfig(), [*TINY, "train.max_nonfinite=2"])), {2, 3, 4, 5})
    with pytest.raises(train_lib.TrainingError, match=r"2 steps in a row .*steps 3-4.*step-0000002"):
        train_lib.train(task, tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step-0000002"
    weights = checkpoint.read_weights(tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.mark.e2e
def test_a_fresh_run_ignores_what_a_dead_attempt_left(tmp_path):
    """An attempt that died before its first checkpoint leaves a log and a vocabulary behind;
    starting again (not --resume) must neither append to that log nor reuse that vocabulary."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 123.0}) + "\n")
    from mmt.text import Tokenizer

    Tokenizer.train(["completely different words"], kind="word").save(run / "tokenizer.json")
    assert main(["train", "vqa", str(run), "--no-progress", *sets(TINY)]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6] and records[0]["loss"] != 123.0
    assert "closest" in (run / "tokenizer.json").read_text()  # rebuilt from the Sort-of-CLEVR questions


@pytest.mark.e2e
def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(tmp_path, caplog):
    import shutil

    straight = straight_run(tmp_path)
    for name, damage in (("trainer_state.json", lambda p: p.write_text('{"step": 6, "optim')),
                         ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]))):
        run = tmp_path / name
        shutil.copytree(straight, run)
        newest = latest_checkpoint(run)
        assert newest.name == "step-0000006"
        damage(newest / name)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mmt"):
            assert main(["train", "vqa", str(run), "--resume", "--no-progress"]) == 0
        assert f"{newest / name}: " in caplog.text and "resuming from the checkpoint before it" in caplog.text
        assert (run / "checkpoints" / "damaged-step-0000006" / name).is_file()  # set aside, for a look
        assert latest_checkpoint(run).name == "step-0000006"  # written again
        assert_same_run(straight, run)  # steps 5 and 6 trained again, as they were


@pytest.mark.e2e
def test_a_torn_last_metrics_line_does_not_block_resuming(tmp_path, caplog):
    import shutil

    straight = straight_run(tmp_path)
    run = tmp_path / "torn"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-0000006")  # as if the run died writing step 5's log line
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"step": 5, "answer_lo')
    with caplog.at_level("WARNING", logger="mmt"):
        assert main(["train", "vqa", str(run), "--resume", "--no-progress"]) == 0
    assert "metrics.jsonl: line" in caplog.text and "cut short" in caplog.text
    assert_same_run(straight, run)


def test_a_damaged_metrics_line_before_the_last_is_named(tmp_path):
    from mmt.errors import CheckpointError
    from mmt.trainer_state import metrics_up_to

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: line 2 is not a metrics record"):
        metrics_up_to(path, 3)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert metrics_up_to(path, 2) == ['{"step": 1}', '{"step": 2}']


@pytest.mark.e2e
def test_ctrl_c_says_how_to_continue_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    import mmt.tasks.vqa

    real = mmt.tasks.vqa.VQATask.train_batch

    def interrupted_at_step_3(self, step, part=0, parts=1):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, part, parts)

    monkeypatch.setattr(mmt.tasks.vqa.VQATask, "train_batch", interrupted_at_step_3)
    run = tmp_path / "run"
    assert main(["train", "vqa", str(run), "--no-progress", *sets(TINY)]) == 130
    err = capsys.readouterr().err
    assert f"mmt train: interrupted; continue from {run / 'checkpoints' / 'step-0000002'} with `mmt train vqa {run} --resume`" in err
    assert "Traceback" not in err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.e2e
def test_a_run_directory_is_never_destroyed_by_accident(tmp_path, capsys):
    import shutil

    train = lambda run, *more: main(["train", "vqa", str(run), "--no-progress", *sets(TINY), *more])
    # a folder that is not an mmt run: refused, untouched; --overwrite writes beside what is there
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert train(mine) == 2
    assert "is not empty and holds what mmt did not write (notes.txt)" in capsys.readouterr().err
    assert _tree(mine) == {"notes.txt": b"my notes"}
    assert train(mine, "--overwrite") == 0
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "model").is_dir()
    # a finished run with its checkpoints pruned, and a run with checkpoints but no final model:
    # refused, untouched
    for removed, message in (("checkpoints", "holds a finished run"), ("model", "already holds a run (newest checkpoint step-0000006)")):
        run = tmp_path / f"without-{removed}"
        shutil.copytree(mine, run)
        shutil.rmtree(run / removed)
        (run / "notes.txt").unlink()
        before = _tree(run)
        assert train(run) == 2
        assert message in capsys.readouterr().err and _tree(run) == before


@pytest.mark.e2e
def test_an_attempt_killed_in_its_first_checkpoint_starts_again(tmp_path, capsys):
    from mmt.config import apply_overrides, to_dict
    from mmt.tasks.vqa import VQARunConfig

    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-0000002").mkdir(parents=True)  # what a kill inside the first checkpoint leaves
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (run / "run_config.json").write_text(json.dumps({"task": "vqa", **to_dict(apply_overrides(VQARunConfig(), TINY))}))
    assert main(["train", "vqa", str(run), "--resume", "--no-progress"]) == 2  # nothing to resume: say what to do
    assert "start it again without --resume" in capsys.readouterr().err
    assert main(["train", "vqa", str(run), "--no-progress", *sets(TINY)]) == 0
    assert not (run / "checkpoints" / ".tmp-step-0000002").exists()


@pytest.mark.e2e
def test_a_resume_that_fails_leaves_the_run_as_it_was(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "vqa", str(run), "--no-progress", *sets([*TINY, "train.steps=4"])]) == 0
    import shutil

    shutil.rmtree(run / "model")  # as if it had stopped before the end
    saved = (run / "run_config.json").read_bytes()
    assert main(["train", "vqa", str(run), "--resume", "--no-progress", "--set", "model.fusion_encoder.depth=2"]) == 2
    assert "weights do not fit" in capsys.readouterr().err
    assert (run / "run_config.json").read_bytes() == saved  # not rewritten by the failed attempt
    assert main(["train", "vqa", str(run), "--resume", "--no-progress", "--set", "train.steps=6"]) == 0


def test_what_a_run_did_not_write_is_never_removed_even_inside_its_folders(tmp_path):
    from mmt.errors import ConfigError
    from mmt.trainer_state import check_fresh_start, clear_run

    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)  # an attempt's (incomplete) checkpoint
    (run / "checkpoints" / "my-notes").mkdir()
    (run / "model").mkdir()
    (run / "model" / "weights-from-elsewhere.bin").write_bytes(b"x")
    (run / "model" / "config.json.bak").write_text("{}")
    (run / ".metrics.jsonl.abc123.tmp").write_text("")  # left by a killed atomic write
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"checkpoints/my-notes, model/config\.json\.bak, model/weights-from-elsewhere\.bin\)"):
        check_fresh_start(run)
    check_fresh_start(run, overwrite=True)
    clear_run(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == ["checkpoints", "checkpoints/my-notes", "model", "model/config.json.bak", "model/weights-from-elsewhere.bin"]


@pytest.mark.e2e
def test_fp16_training_scales_the_loss_and_resumes_exactly(tmp_path):
    fp16 = TINY + ["train.precision=fp16"]
    straight = tmp_path / "straight"
    assert main(["train", "vqa", str(straight), "--no-progress", *sets(fp16)]) == 0
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in logged if "loss_scale" in r]
    assert len(scales) == 6 and all(s > 0 for s in scales)
    # resume from step 4's checkpoint (its loss scale included) and end where the straight run did
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("answers.json", "tokenizer.json", "run_config.json", "metrics.jsonl"):
        (resumed / name).write_bytes((straight / name).read_bytes())
    (resumed / "checkpoints").mkdir()
    step4 = straight / "checkpoints" / "step-0000004"
    assert json.loads((step4 / "trainer_state.json").read_text())["grad_scaler"]["scale"] == scales[3]
    os.symlink(step4, resumed / "checkpoints" / "step-0000004")
    assert main(["train", "vqa", str(resumed), "--resume", "--no-progress", *sets(fp16)]) == 0
    assert_same_run(straight, resumed)
