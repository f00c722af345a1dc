"""The one training loop: every task trains through `train()`.

A task (see `mmt.tasks`) supplies the model, a deterministic batch for each step and an
evaluation; this loop owns the rest: AdamW, warm-up + cosine schedule, gradient
clipping, bf16 autocast where the hardware has it, progress bar, periodic evaluation,
`metrics.jsonl`, and checkpoints that resume exactly.

Run directory:
    run_config.json            the full configuration of the run
    tokenizer.json, ...        task artefacts (answer vocabulary, ...)
    metrics.jsonl              one JSON object per log / evaluation line
    checkpoints/step-000500/   model.safetensors, config.json, optimizer.safetensors, trainer_state.json
    model/                     the final model (+ a copy of run_config.json), ready for `mmt eval` / `mmt predict`

Batches are a pure function of (seed, step), so the position in the data stream is the
step number, and a resumed run sees exactly the batches the uninterrupted run would. A task
whose batches also follow the training itself (a VQA curriculum that ends on training
accuracy) sees each training log record (`observe`) and keeps what it decided in the
checkpoint (`state` / `load_state`).

Several processes (`torchrun --nproc_per_node=N -m mmt train ...`): data-parallel training
with DDP, NCCL on GPUs and gloo on CPU. `train.batch_size` stays the batch of one optimizer
step over all processes: each process trains on its own equal share of every step's batch
(and with `train.accumulate=K` splits that share into K micro-steps, synchronising gradients
only on the last), so a run's batches, learning rate and schedule do not depend on how many
processes run it. Shares may hold unequal numbers of loss terms (questions per image vary,
captions vary in length): each share's loss then weighs by its number of terms, as in one
batch of all of them. Rank 0 alone logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mmt import checkpoint
from mmt.config import to_dict


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and bookkeeping, shared by every task."""

    steps: int = 3000  # optimizer steps
    batch_size: int = 32  # samples per step (for VQA: images, each with all its questions)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.02  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200  # linear warm-up from 0
    weight_decay: float = 0.05  # AdamW decay on matrices (not on biases, norms, embeddings' positions)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm (0 disables)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the CPU/GPU supports it
    eval_every: int = 500  # evaluate every N steps (and at the end)
    save_every: int = 500  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept besides the best
    log_every: int = 50  # write training metrics every N steps
    seed: int = 0  # seeds weights, data order and dropout
    threads: int = 0  # torch CPU threads (0: torch's default)
    init: str = ""  # run or model directory whose weights start this run where names and shapes match (--init)
    accumulate: int = 1  # micro-steps per optimizer step (gradient accumulation); batch_size counts all of them
    activation_checkpointing: bool = False  # recompute Transformer layer activations in backward: less memory, ~30% more compute
    dist_timeout: int = 1800  # seconds a process waits for the others (process-group start, collectives) before failing
    max_nonfinite: int = 3  # a step whose loss or gradients are not finite is skipped; this many in a row stop training
    # BatchNorm layers (if any) evaluate with statistics averaged evenly over the last N training
    # steps before each evaluation instead of torch's exponential average (0: keep torch's)
    batchnorm_average_steps: int = 10


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs with bf16 and CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio (Loshchilov & Hutter 2017)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batchnorm_averaging(step: int, cfg: TrainConfig) -> tuple[bool, bool]:
    """(average, restart) for step index `step`: whether its forward passes go into an even
    average of BatchNorm statistics for the next evaluation, and whether that average starts
    afresh with it.

    torch's running statistics are an exponential average over about the last 10 batches,
    computed with weights that have since moved on. On Sort-of-CLEVR a checkpoint
    evaluated at 79.5% with them and at 89.5% with statistics recomputed from 5 training
    batches (count questions 38% vs 98%). An even average over the last steps before an
    evaluation is that recomputation without extra forward passes. A pure function of the
    step, so a resumed run averages the same batches.
    """
    n = min(cfg.batchnorm_average_steps, cfg.eval_every)
    if n <= 0:
        return False, False
    done = step + 1
    next_eval = min(-(-done // cfg.eval_every) * cfg.eval_every, cfg.steps)
    start = max(next_eval - n, 0)
    return step >= start, step == start


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "positions" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# ----------------------------------------------------------------------------- trainer state


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
    checkpoint.atomic_write(tmp / "optimizer.safetensors", lambda path: save_file(tensors, path))
    state = {
        "step": step,
        "optimizer": meta,
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(legacy=False)},
        **extra,
    }
    checkpoint.atomic_write_text(tmp / "trainer_state.json", json.dumps(state, default=_to_builtin))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    # keep the newest `keep_last` checkpoints and the best one
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "trainer_state.json").is_file())
    keep = set(done[-keep_last:]) | ({ckpt_root / f"step-{best:07d}"} if best is not None else set())
    for old in done:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return complete[-1] if complete else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (by a run that then died), so a resumed run's log
    reads exactly like an uninterrupted one."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in trainer_state.json")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def init_from(model: torch.nn.Module, init: str | Path) -> checkpoint.LoadReport:
    """Load every weight of the model saved in `init` (a run or model directory) whose name
    and shape match `model`'s; the report says what was loaded, new, skipped and unused."""
    directory = checkpoint.model_directory(init)
    return checkpoint.load_weights(model, directory / checkpoint.WEIGHTS_NAME, strict=False)


# files a run writes before its first checkpoint; a fresh (not resumed) run in the same
# directory must not append to the log or reuse a vocabulary built from other data or for
# other --init weights
STALE_ON_FRESH_START = ("metrics.jsonl", checkpoint.TOKENIZER_NAME, "answers.json", "init_report.json", "data_report.json")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss keeps coming out NaN); the message says what to do."""


# ----------------------------------------------------------------------------- processes


@dataclasses.dataclass
class Processes:
    """Where this process stands in a torchrun launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_group: bool = False  # this trainer initialised the process group (and ends it)
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL takes CUDA tensors only)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def start_processes(cfg: TrainConfig) -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
    a single process when WORLD_SIZE is unset or 1. Joining fails after cfg.dist_timeout
    seconds instead of hanging."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    started = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():  # before the group starts, so NCCL binds each process to its own GPU
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        started = True
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, started, device)


def _all_finite(finite: bool, procs: Processes) -> bool:
    """True when every process's step was finite (a collective under several processes)."""
    if procs.world == 1:
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=procs.device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0


def _gather_rng(procs: Processes) -> list[dict[str, torch.Tensor]]:
    """Every process's torch RNG states (CPU, and its GPU's), by rank (a collective: all processes call it)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if procs.world == 1:
        return [state]
    states: list[Any] = [None] * procs.world
    torch.distributed.all_gather_object(states, state)
    return [{k: v.cpu() for k, v in s.items()} for s in states]


def _sum_across(values: list[float], procs: Processes) -> list[float]:
    if procs.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=procs.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def micro_step_scales(task, batches: list[dict[str, Any]], procs: Processes) -> list[float]:
    """What each of this process's micro-step losses is multiplied by before its backward,
    so that the step's gradient (DDP averages it over processes) is that of one batch of all
    of them: with a task that says how many terms each batch's loss averages over
    (`loss_terms`: questions, target tokens), each micro-step weighs by its share of the
    terms of every process's micro-steps; otherwise all weigh alike."""
    terms = [float(task.loss_terms(batch)) for batch in batches] if hasattr(task, "loss_terms") else []
    total = _sum_across([sum(terms)], procs)[0] if terms else 0.0
    if total <= 0:  # no counts, or no terms anywhere (the loss is then undefined whatever the weights)
        return [1.0 / len(batches)] * len(batches)
    return [t * procs.world / total for t in terms]


# ----------------------------------------------------------------------------- the loop


def train(task, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train `task` (see mmt.tasks) into `run_dir`; returns the final evaluation."""
    cfg: TrainConfig = task.cfg.train
    run_dir = Path(run_dir)
    if cfg.accumulate < 1:
        raise ValueError(f"train.accumulate={cfg.accumulate}: must be at least 1")
    procs = start_processes(cfg)
    try:
        return _train(task, cfg, run_dir, resume, progress, procs)
    finally:
        if procs.started_group:
            torch.distributed.destroy_process_group()


def _train(task, cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool, procs: Processes) -> dict[str, Any]:
    say = print if procs.main else (lambda *a, **k: None)
    parts = procs.world * cfg.accumulate
    if cfg.batch_size % parts:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} does not split evenly over {procs.world} processes x "
            f"train.accumulate={cfg.accumulate}; choose a multiple of {parts}"
        )
    if procs.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # what an attempt that died before its first checkpoint left: start clean
            for name in STALE_ON_FRESH_START:
                (run_dir / name).unlink(missing_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # data, tokenizer, vocabularies; fills model config sizes. Rank 0 first: it writes the
    # run's tokenizer and vocabularies, which the other ranks then read instead of racing it.
    if procs.main:
        task.prepare(run_dir)
        (run_dir / "run_config.json").write_text(json.dumps({"task": task.name, **to_dict(task.cfg)}, indent=2) + "\n")
    procs.barrier()
    if not procs.main:
        task.prepare(run_dir)
    if torch.cuda.is_available():
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    procs.device = device
    model = task.build_model().to(device)
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = cfg.activation_checkpointing
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device))

    start_step, best = 0, {"metric": -math.inf, "step": None}
    if cfg.init and not resume:  # a resumed run's weights come from its own checkpoint
        report = init_from(model, cfg.init)
        say(report.describe_init(cfg.init))
        if procs.main:
            (run_dir / "init_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if resume:
        last = latest_checkpoint(run_dir)
        if last is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint to resume from")
        checkpoint.load_weights(model, last / checkpoint.WEIGHTS_NAME)
        tensors = load_file(str(last / "optimizer.safetensors"))
        state = json.loads((last / "trainer_state.json").read_text())
        rng = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("rng.")]}
        suffix = f".rank{procs.rank}" if procs.rank else ""
        torch.set_rng_state(rng.get(f"rng.torch{suffix}", rng["rng.torch"]))
        if torch.cuda.is_available() and f"rng.cuda{suffix}" in rng:
            torch.cuda.set_rng_state(rng[f"rng.cuda{suffix}"])
        _restore_optimizer(optimizer, tensors, state["optimizer"])
        random.setstate(_tuples(state["rng"]["python"]))
        np.random.set_state(state["rng"]["numpy"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, best = state["step"], state["best"]
        if hasattr(task, "load_state"):
            task.load_state(state.get("task", {}))
        if procs.main:
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
        say(f"resumed from {last} at step {start_step}")

    n_params = sum(p.numel() for p in model.parameters())
    say(f"{task.name}: {n_params / 1e6:.2f}M parameters, {'bf16 autocast' if use_bf16 else 'fp32'} on {device}, "
        f"{cfg.steps} steps of {cfg.batch_size}")
    if parts > 1:
        say(f"batch per optimizer step {cfg.batch_size} = {procs.world} processes x {cfg.accumulate} micro-steps x "
            f"{cfg.batch_size // parts}; learning rate {cfg.lr:g} (set for the batch of {cfg.batch_size}, whatever the split)")
    core = model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # every process built the same weights from the same seed; DDP checks and broadcasts rank 0's
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(core, "leaves_parameters_unused", False),
        )
        if not resume:  # dropout and sampling differ across processes (a resumed run restored each one's state)
            torch.manual_seed(cfg.seed + 1_000_003 * procs.rank)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if procs.main else None
    data_report = run_dir / "data_report.json"
    if metrics_file is not None and not resume and data_report.is_file():  # own data: what was read, what was skipped
        metrics_file.write(json.dumps({"step": 0, "data": json.loads(data_report.read_text())}) + "\n")

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (progress and procs.main), dynamic_ncols=True, desc=f"train {task.name}")
    window = {"loss": 0.0, "steps": 0, "terms": {}, "correct": 0.0, "count": 0, "samples": 0, "start": time.perf_counter()}
    final_eval: dict[str, Any] = {}
    nonfinite: list[int] = []  # consecutive skipped steps
    # the buffers a forward pass changes: BatchNorm statistics (other buffers, e.g. fixed
    # position tables, never change)
    norms = [m for m in core.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    running_stats = [b for m in norms for b in m.buffers()]
    momenta = [m.momentum for m in norms]
    for step in range(start_step, cfg.steps):
        model.train()
        average, restart = batchnorm_averaging(step, cfg)
        for m, momentum in zip(norms, momenta):
            if restart:
                m.reset_running_stats()
            m.momentum = None if average else momentum  # None: torch's even (cumulative) average
        optimizer.zero_grad(set_to_none=True)
        # running statistics change in the forward pass: kept to undo a skipped step
        buffers = [b.detach().clone() for b in running_stats]
        loss_value, step_losses = 0.0, {}
        batches = [task.train_batch(step, procs.rank * cfg.accumulate + micro, parts) for micro in range(cfg.accumulate)]
        for micro, (batch, scale) in enumerate(zip(batches, micro_step_scales(task, batches, procs))):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            last_micro = micro == cfg.accumulate - 1
            # gradients are averaged across processes once per step, on the last micro-step
            sync = contextlib.nullcontext() if last_micro or procs.world == 1 else model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(**batch)
                losses = {k: v for k, v in out.items() if k.endswith("_loss")}
                loss = sum(losses.values())
                (loss * scale).backward()
            loss_value += loss.item() * scale
            for k, v in losses.items():
                step_losses[k] = step_losses.get(k, 0.0) + v.item() * scale
            correct, count = task.batch_accuracy(out, batch)
            window["correct"] += correct
            window["count"] += count
            window["samples"] += task.batch_samples(batch) if hasattr(task, "batch_samples") else count
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm.item()))
        done = step + 1
        if not _all_finite(finite, procs):  # any process's loss or gradients: every process skips the step
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(running_stats, buffers):
                    b.copy_(saved)
            scheduler.step()  # the schedule stays tied to the step number
            nonfinite.append(done)
            log({"step": done, "skipped": "non-finite loss or gradients", "batch_step": step, **step_losses})
            bar.write(f"step {done}: non-finite loss or gradients (batch of step index {step}); step skipped")
            bar.update(1)
            if len(nonfinite) >= cfg.max_nonfinite:
                last = latest_checkpoint(run_dir)
                raise TrainingError(
                    f"{len(nonfinite)} steps in a row with a non-finite loss or gradients (steps {nonfinite[0]}-{nonfinite[-1]}); "
                    f"training stopped. The last good checkpoint is {last or 'none yet'}: lower train.lr, check the data, "
                    f"or raise train.max_nonfinite, then continue with --resume {run_dir}"
                )
            continue
        nonfinite.clear()
        optimizer.step()
        scheduler.step()

        window["loss"] += loss_value
        window["steps"] += 1
        for k, v in step_losses.items():
            window["terms"][k] = window["terms"].get(k, 0.0) + v
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.steps:
            seconds = time.perf_counter() - window["start"]
            steps_in_window = max(1, window["steps"])  # steps taken (skipped ones have no loss to average)
            terms = window["terms"]
            names = sorted(terms)
            # every process's share of the batch: losses averaged (over the window too), counts summed
            totals = _sum_across([window["loss"], window["correct"], window["count"], window["samples"], *(terms[k] for k in names)], procs)
            record = {
                "step": done,
                "loss": totals[0] / procs.world / steps_in_window,
                **{k: v / procs.world / steps_in_window for k, v in zip(names, totals[4:])},
                "train_accuracy": totals[1] / max(1, totals[2]),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": totals[3] / seconds,
                "grad_norm": None if grad_norm is None else grad_norm.item(),
            }
            if hasattr(task, "observe"):  # e.g. a curriculum that ends on training accuracy
                record.update(task.observe(done, record))
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            window = {"loss": 0.0, "steps": 0, "terms": {}, "correct": 0.0, "count": 0, "samples": 0, "start": time.perf_counter()}
        if procs.main and (done % cfg.eval_every == 0 or done == cfg.steps):
            final_eval = task.evaluate(core)
            log({"step": done, "eval": final_eval})
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in task.headline(final_eval).items()))
            if task.score(final_eval) > best["metric"]:
                best = {"metric": task.score(final_eval), "step": done}
        if done % cfg.save_every == 0 or done == cfg.steps:
            rng_states = _gather_rng(procs)
            if procs.main:
                extra = {"best": best, **({"task": task.state()} if hasattr(task, "state") else {})}
                save_checkpoint(run_dir, core, optimizer, scheduler, done, extra, cfg.keep_last, best["step"], rng_states)
            window["start"] = time.perf_counter()  # do not count checkpoint time in samples/s
    bar.close()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    if procs.main:
        metrics_file.close()
        task.save_model(core, run_dir / "model")
        # the run's data settings travel with the model, so `mmt eval MODEL_DIR` uses the right data
        shutil.copyfile(run_dir / "run_config.json", run_dir / "model" / "run_config.json")
    procs.barrier()  # the other processes end once the model is saved
    return final_eval
