"""Training checkpoints: everything a resumed run restores, without pickle.

    checkpoints/step-0000500/
      config.json, model.safetensors   the model (`mmt.checkpoint.save_pretrained`)
      optimizer.safetensors            optimizer tensors and every process's torch RNG states
      trainer_state.json               step, scheduler, optimizer settings, Python/numpy RNG
                                       state, the best evaluation so far, the task's own state

A checkpoint is written under a temporary name and renamed into place (each file fsynced),
so a crash mid-save leaves the earlier checkpoints intact; the newest `keep_last` and the best
are kept.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from mmt import checkpoint
from mmt.errors import CheckpointError, ConfigError
from mmt.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{slot}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["plain"].items()):
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in {STATE_NAME}")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(
    run_dir: Path, model, optimizer, scheduler, step: int, extra: dict[str, Any], keep_last: int, best: int | None,
    rng_states: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically (a temporary directory renamed into place).
    `rng_states`: every process's torch RNG states ({"torch": cpu, "cuda": gpu}), by rank
    (default: this process's CPU state)."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save_pretrained(model, tmp)
    tensors, meta = _optimizer_tensors(optimizer)
    rng_states = rng_states or [{"torch": torch.get_rng_state()}]
    for rank, states in enumerate(rng_states):
        for kind, rng in states.items():  # rank 0's CPU state keeps its old name, "rng.torch"
            tensors[f"rng.{kind}" + (f".rank{rank}" if rank else "")] = rng
    atomic_write(tmp / OPTIMIZER_NAME, lambda path: save_file(tensors, path))
    state = {
        "step": step,
        "optimizer": meta,
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(legacy=False)},
        **extra,
    }
    atomic_write_text(tmp / STATE_NAME, json.dumps(state, default=_to_builtin))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # keep the newest `keep_last` checkpoints and the best one
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_NAME).is_file())
    keep = set(done[-keep_last:]) | ({ckpt_root / f"step-{best:07d}"} if best is not None else set())
    for old in done:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


# what a run writes in its directory: files at the top (`mmt eval` adds eval.json and, for
# captioning, eval_captions.json and eval_references.json), checkpoints under checkpoints/
# (step-N, .tmp-step-N while one is written, damaged-step-N set aside by a resume) and the
# final model's files under model/; `mmt.files.atomic_write` leaves .NAME.*.tmp if killed
RUN_FILES = (
    "run_config.json", "metrics.jsonl", checkpoint.TOKENIZER_NAME, "answers.json", "init_report.json", "data_report.json",
    "eval.json", "eval_captions.json", "eval_references.json",
)
MODEL_FILES = (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME, checkpoint.TOKENIZER_NAME, "answers.json", "run_config.json")
CHECKPOINT_NAMES = re.compile(r"(\.tmp-|damaged-)?step-\d+")


def _written_by_a_run(path: Path, names: Sequence[str]) -> bool:
    return path.name in names or any(path.name.startswith(f".{name}.") and path.name.endswith(".tmp") for name in names)


def run_entries(run_dir: Path) -> tuple[list[Path], list[str]]:
    """(what a run wrote in `run_dir`, the names of everything else in it: `foreign/` for a
    folder). A checkpoints/ or model/ folder counts as a run's only as far as its entries do."""
    ours, foreign = [], []
    for path in sorted(run_dir.iterdir()):
        if path.is_dir() and path.name in ("checkpoints", "model"):
            for entry in sorted(path.iterdir()):
                if path.name == "checkpoints":
                    mine = entry.is_dir() and CHECKPOINT_NAMES.fullmatch(entry.name) is not None
                else:
                    mine = entry.is_file() and _written_by_a_run(entry, MODEL_FILES)
                if mine:
                    ours.append(entry)
                else:
                    foreign.append(f"{path.name}/{entry.name}")
        elif path.is_file() and _written_by_a_run(path, RUN_FILES):
            ours.append(path)
        else:
            foreign.append(path.name + ("/" if path.is_dir() else ""))
    return ours, foreign


def check_fresh_start(run_dir: Path, overwrite: bool = False, resume_hint: str = "--resume") -> None:
    """Refuse (ConfigError) to start a run from scratch in `run_dir` where that would destroy
    something: a run with a complete checkpoint (continue it with `resume_hint`), a finished
    run (its final model) unless `overwrite`, or, always, a folder holding things mmt did not
    write unless `overwrite` (they are then left alone). What an attempt that died before its
    first checkpoint left may be replaced."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run directory")
    if overwrite or not run_dir.exists():
        return
    foreign = run_entries(run_dir)[1]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{run_dir} is not empty and holds what mmt did not write ({shown}); choose another "
                          "directory, or pass --overwrite to write the run beside it")
    if (run_dir / "model" / checkpoint.CONFIG_NAME).is_file():
        raise ConfigError(f"{run_dir} holds a finished run; evaluate it with `mmt eval {run_dir}`, or pass --overwrite to train it again")
    last = latest_checkpoint(run_dir)
    if last is not None:
        raise ConfigError(f"{run_dir} already holds a run (newest checkpoint {last.name}); continue it with "
                          f"{resume_hint}, or pass --overwrite to start it again")


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote in `run_dir` (`run_entries`), nothing else; a checkpoints/ or
    model/ folder left empty goes too."""
    if not run_dir.is_dir():
        return
    for path in run_entries(run_dir)[0]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for name in ("checkpoints", "model"):
        if (run_dir / name).is_dir() and not any((run_dir / name).iterdir()):
            (run_dir / name).rmdir()


def set_aside(damaged: Path) -> Path:
    """Rename a checkpoint that cannot be read to damaged-step-N beside it: kept for a look,
    no longer taken for the newest (nor counted among the kept ones)."""
    aside = damaged.with_name(f"damaged-{damaged.name}")
    shutil.rmtree(aside, ignore_errors=True)
    damaged.rename(aside)
    return aside


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints that were written to the end (renamed into place), oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / STATE_NAME).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def read_state(last: Path) -> dict[str, Any]:
    """A checkpoint's trainer state, with an error naming the file if it is damaged."""
    path = last / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e}); it may be truncated or corrupted") from None
    missing = [key for key in ("step", "optimizer", "scheduler", "rng") if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a trainer state (missing {', '.join(missing)})")
    return state


def read_checkpoint(last: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainer state, optimizer and RNG tensors, weights) of checkpoint `last`, each file read
    whole: a damaged one raises a CheckpointError naming it."""
    return read_state(last), checkpoint.read_weights(last / OPTIMIZER_NAME), checkpoint.read_weights(last / checkpoint.WEIGHTS_NAME)


def load_checkpoint(last: Path, model, optimizer, scheduler, rank: int, files=None) -> dict[str, Any]:
    """Restore the model, optimizer, scheduler and every RNG state of this process (`rank`)
    from checkpoint `last` (its `read_checkpoint` files, read here unless given); returns its
    trainer state (step, best, task)."""
    state, tensors, weights = files if files is not None else read_checkpoint(last)
    checkpoint.load_weights(model, last / checkpoint.WEIGHTS_NAME, tensors=weights)
    tensors = dict(tensors)
    rng = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("rng.")]}
    suffix = f".rank{rank}" if rank else ""
    torch.set_rng_state(rng.get(f"rng.torch{suffix}", rng["rng.torch"]))
    if torch.cuda.is_available() and f"rng.cuda{suffix}" in rng:
        torch.cuda.set_rng_state(rng[f"rng.cuda{suffix}"])
    _restore_optimizer(optimizer, tensors, state["optimizer"])
    random.setstate(_tuples(state["rng"]["python"]))
    np.random.set_state(state["rng"]["numpy"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def metrics_up_to(path: Path, step: int) -> list[str]:
    """The lines of `path` logged up to `step` (a resumed run's log must read like an
    uninterrupted one's), read only. A last line cut short (the process died writing it, or
    the disk filled) is left out with a warning; a damaged line before it raises a
    CheckpointError naming it."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            logged = json.loads(line)["step"]
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
            if all(not rest.strip() for rest in lines[number:]):  # the last line: torn
                log.warning(f"{path}: line {number} is cut short ({e}); dropped, the run resumes without it")
                break
            raise CheckpointError(f"{path}: line {number} is not a metrics record ({e}); remove or repair it to resume") from None
        if logged <= step:
            kept.append(line.decode())
    return kept

