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
import copy
import dataclasses
import json
import logging
import math
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from mmt import checkpoint
from mmt.config import Amount, Beta, Count, Fraction, NonNegative, Positive, Settings, TextConfig, TransformerConfig, VisionConfig, to_dict
from mmt.data.progress import progress_bars
from mmt.devices import autocast, autocast_dtype, choose_device, describe
from mmt.distributed import Processes, start_processes
from mmt.errors import CheckpointError, TrainingError
from mmt.files import atomic_write_text
from mmt.interop import runs as interop_runs
from mmt.layers.attention import attention_kernel
from mmt.tasks.base import Task
from mmt.trainer_state import (
    check_fresh_start,
    clear_run,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    metrics_up_to,
    read_checkpoint,
    save_checkpoint,
    set_aside,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig(Settings):
    """Optimisation and bookkeeping, shared by every task."""

    steps: Count = 3000  # optimizer steps
    batch_size: Count = 32  # samples per step (for VQA: images, each with all its questions)
    lr: Positive = 1e-3  # peak learning rate
    min_lr_ratio: Fraction = 0.02  # cosine decays to lr * min_lr_ratio
    warmup_steps: Amount = 200  # linear warm-up from 0
    weight_decay: NonNegative = 0.05  # AdamW decay on matrices (not on biases, norms, embeddings' positions)
    betas: tuple[Beta, Beta] = (0.9, 0.98)  # AdamW betas
    grad_clip: NonNegative = 1.0  # clip the global gradient norm (0 disables)
    device: str = "auto"  # auto: this process's GPU when torch sees one, else the CPU; or cpu, cuda, cuda:N, mps
    # auto: bf16 autocast where the CPU/GPU has bf16 units, fp16 (with loss scaling) on a GPU
    # without them, else fp32 (mmt.devices)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the model for training; the first step's time (compiling) is logged
    # attention kernel while training (mmt.layers.attention_kernel): auto takes torch's fused kernel
    # except on a CPU in bf16 without a score bias, where the literal formula is faster
    attention: Literal["auto", "fused", "literal"] = "auto"
    eval_every: Count = 500  # evaluate every N steps (and at the end)
    save_every: Count = 500  # checkpoint every N steps (and at the end)
    keep_last: Count = 2  # checkpoints kept besides the best
    log_every: Count = 50  # write training metrics every N steps
    seed: Amount = 0  # seeds weights, data order and dropout
    threads: Amount = 0  # torch CPU threads (0: torch's default)
    init: str = ""  # run or model directory whose weights start this run (--init); see mmt.train.init_from
    allow_partial: bool = False  # --init: start even if some of the source's weights do not fit (--allow-partial)
    new_words: Literal["stop", "extend", "unk"] = "stop"  # --init: words the source's vocabulary lacks stop the run, extend it, or read as [UNK]
    init_text: str = ""  # Hugging Face BERT-family directory: the text tower's architecture, weights and tokenizer (--init-text)
    init_vision: str = ""  # Hugging Face ViT or CLIP directory: the image tower's architecture and weights (--init-vision)
    accumulate: Count = 1  # micro-steps per optimizer step (gradient accumulation); batch_size counts all of them
    activation_checkpointing: bool = False  # recompute Transformer layer activations in backward: less memory, ~30% more compute
    dist_timeout: Count = 1800  # seconds a process waits for the others (process-group start, collectives) before failing
    max_nonfinite: Count = 3  # a step whose loss or gradients are not finite is skipped; this many in a row stop training
    # BatchNorm layers (if any) evaluate with statistics averaged evenly over the last N training
    # steps before each evaluation instead of torch's exponential average (0: keep torch's)
    batchnorm_average_steps: Amount = 10


MIN_LOSS_SCALE = 2.0**-16  # fp16: a loss scale below this means the gradients are NaN, not overflowing


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
    evaluated about ten points higher with statistics recomputed from 5 training batches
    (docs/lab-notes.md). An even average over the last steps before an
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


def init_architecture(model_cfg: Any, init: str | Path) -> Any:
    """The model config of a run started from `init` (without --preset): the source model's own
    architecture when it is the same kind of model (the training objective, `losses`, stays
    the task's); else `model_cfg` with the sections the two share (vision, text, fusion
    encoder, ...) taken from the source, so that their weights fit."""
    _, source = checkpoint.read_config(checkpoint.model_directory(init))
    if type(source) is type(model_cfg):
        kept = {"losses": model_cfg.losses} if hasattr(model_cfg, "losses") else {}
        return dataclasses.replace(copy.deepcopy(source), **kept)
    shared = {
        field.name: copy.deepcopy(getattr(source, field.name)) for field in dataclasses.fields(model_cfg)
        if isinstance(getattr(model_cfg, field.name), (VisionConfig, TextConfig, TransformerConfig))
        and type(getattr(source, field.name, None)) is type(getattr(model_cfg, field.name))
    }
    return dataclasses.replace(model_cfg, **shared)


def init_from(model: torch.nn.Module, init: str | Path, vocab_rows: tuple[int, int] | None = None) -> checkpoint.LoadReport:
    """Load every weight of the model saved in `init` (a run or model directory) whose name and
    shape match `model`'s; the report says what was loaded, new, skipped and unused. With
    `vocab_rows` (the source's vocabulary size, this run's larger one: `train.new_words=extend`),
    a tensor with one row per word loads into its first rows; the added words' rows keep their
    new initialisation."""
    path = checkpoint.model_directory(init) / checkpoint.WEIGHTS_NAME
    tensors = checkpoint.read_weights(path)
    if vocab_rows is not None:
        old, new = vocab_rows
        own = model.state_dict()
        for key, tensor in tensors.items():
            if key in own and tensor.shape[0] == old and own[key].shape[0] == new and tensor.shape[1:] == own[key].shape[1:]:
                tensors[key] = torch.cat([tensor, own[key][old:].to(tensor.device, tensor.dtype)])
    return checkpoint.load_weights(model, path, strict=False, tensors=tensors)


def init_problems(report: checkpoint.LoadReport, model: torch.nn.Module) -> list[str]:
    """What did not fit when starting from another model: tensors of mismatched shape, tensors of
    the source in a module this model has too that it does not use, and tensors of this model in
    a module the source has that the source lacks (a module only one of them has, such as a new
    answer head or a pretraining head, is expected)."""
    own_modules = {key.split(".")[0] for key in model.state_dict()}
    source_modules = {key.split(".")[0] for key in [*report.loaded, *report.unexpected, *(k for k, _, _ in report.mismatched)]}
    return (
        [f"{key} (source {list(a)}, this model {list(b)})" for key, a, b in report.mismatched]
        + [f"{key} (unused)" for key in report.unexpected if key.split(".")[0] in own_modules]
        + [f"{key} (not in the source)" for key in report.missing if key.split(".")[0] in source_modules]
    )


def micro_step_scales(task: Task, batches: list[dict[str, Any]], procs: Processes) -> list[float]:
    """What each of this process's micro-step losses is multiplied by before its backward,
    so that the step's gradient (DDP averages it over processes) is that of one batch of all
    of them: with a task that says how many terms each batch's loss averages over
    (`loss_terms`: questions, target tokens), each micro-step weighs by its share of the
    terms of every process's micro-steps; otherwise all weigh alike."""
    counts = [task.loss_terms(batch) for batch in batches]
    terms = [float(c) for c in counts] if None not in counts else []
    total = procs.sum([sum(terms)])[0] if terms else 0.0
    if total <= 0:  # no counts, or no terms anywhere (the loss is then undefined whatever the weights)
        return [1.0 / len(batches)] * len(batches)
    return [t * procs.world / total for t in terms]


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Run:
    """What the loop works on: the task, its model (wrapped for DDP where several processes
    run), the optimizer and schedule, and the bookkeeping of the current log window."""

    task: Task
    cfg: TrainConfig
    run_dir: Path
    procs: Processes
    core: torch.nn.Module  # the model itself
    model: torch.nn.Module  # what the steps call: the model, or DDP around it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None: fp32
    scaler: torch.amp.GradScaler  # scales the loss in fp16 (disabled otherwise)
    start_step: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"metric": -math.inf, "step": None})
    window: dict = dataclasses.field(default_factory=dict)
    metrics: Any = None  # the open metrics.jsonl (rank 0)

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def new_window(self) -> None:
        self.window = {"loss": 0.0, "steps": 0, "terms": {}, "correct": 0.0, "count": 0, "samples": 0, "start": time.perf_counter()}


def train(task: Task, run_dir: str | Path, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train `task` (see mmt.tasks) into `run_dir`; returns the final evaluation. A fresh start
    (not `resume`) refuses a directory holding a run or files mmt did not write, unless
    `overwrite` (`mmt.trainer_state.check_fresh_start`)."""
    cfg: TrainConfig = task.cfg.train
    procs = start_processes(cfg.dist_timeout, cfg.device)
    try:
        with progress_bars(progress):  # the data's and evaluation's bars (mmt.data.progress)
            run = _start(task, cfg, Path(run_dir), resume, procs, overwrite)
            with attention_kernel(cfg.attention), warnings.catch_warnings():
                if run.scaler.is_enabled():  # a step the loss scaler skips still moves the schedule on (by design), which torch warns of
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
                final = _loop(run, progress)
        _finish(run)
        return final
    finally:
        task.close()
        if procs.started_group:
            torch.distributed.destroy_process_group()


def _prepare(task: Task, cfg: TrainConfig, run_dir: Path, resume: bool, procs: Processes, overwrite: bool) -> Any:
    """Seed everything, then let the task read its data: rank 0 first, since it writes the
    run's tokenizer and vocabularies, which the other ranks then read instead of racing it.
    Returns the model config the task asks for."""
    parts = procs.world * cfg.accumulate
    if cfg.batch_size % parts:
        raise ValueError(
            f"train.batch_size={cfg.batch_size} does not split evenly over {procs.world} processes x "
            f"train.accumulate={cfg.accumulate}; choose a multiple of {parts}"
        )
    choose_device(cfg.device, procs.local_rank)  # a device that is not here stops the run before its directory is touched
    if not resume:  # every process checks (so that all refuse alike) before rank 0 clears
        check_fresh_start(run_dir, overwrite, f"`mmt train {task.name} {run_dir} --resume`")
        procs.barrier()
    if procs.main:
        if not resume:  # what an earlier attempt (or, with overwrite, run) wrote
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model_cfg = None
    if not resume:  # (a resumed run's config and tokenizer hold the pretrained towers already)
        interop_runs.configure(task.cfg.model, cfg.init_text, cfg.init_vision, cfg.init)  # before the data is read
        if procs.main:
            interop_runs.write_tokenizer(run_dir, cfg.init_text)
    if procs.main:
        model_cfg = task.prepare(run_dir)
    procs.barrier()
    return model_cfg if procs.main else task.prepare(run_dir)


def _init(model: torch.nn.Module, cfg: TrainConfig, run_dir: Path, procs: Processes) -> None:
    """Start `model` from the --init model: its weights (strictly, unless train.allow_partial),
    with the rows of words a grown vocabulary added (train.new_words=extend) left new."""
    source_words = checkpoint.load_tokenizer(checkpoint.model_directory(cfg.init))
    run_words = checkpoint.load_tokenizer(run_dir)
    grown = source_words and run_words and run_words.vocab_size > source_words.vocab_size  # train.new_words=extend
    report = init_from(model, cfg.init, (source_words.vocab_size, run_words.vocab_size) if grown else None)
    problems = init_problems(report, model)
    if procs.main:
        log.info(report.describe_init(cfg.init))
        (run_dir / "init_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    if problems and not cfg.allow_partial:
        listing = "; ".join(problems[:12]) + (f"; ... ({len(problems) - 12} more)" if len(problems) > 12 else "")
        raise CheckpointError(
            f"--init {cfg.init}: {len(problems)} tensors do not fit this model: {listing}. Start from the source's own "
            "architecture (no --preset, no --set model.* that changes shapes), or pass --allow-partial to start "
            "with what fits (the rest keeps its new initialisation)"
        )


def _start(task: Task, cfg: TrainConfig, run_dir: Path, resume: bool, procs: Processes, overwrite: bool) -> _Run:
    """Prepare the data, build the model and optimizer, start from --init or resume; then write
    run_config.json (not before a resume has succeeded: a failed one leaves the run as it was)."""
    model_cfg = _prepare(task, cfg, run_dir, resume, procs, overwrite)
    device = choose_device(cfg.device, procs.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    procs.device = device
    model = task.build_model(model_cfg).to(device)
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):  # the layer stacks' switch
            module.activation_checkpointing = cfg.activation_checkpointing
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    amp_dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = _Run(task, cfg, run_dir, procs, model, model, optimizer, scheduler, device, amp_dtype, scaler)
    if cfg.init and not resume:  # a resumed run's weights come from its own checkpoint
        _init(model, cfg, run_dir, procs)
    if (cfg.init_text or cfg.init_vision) and not resume:
        interop_runs.load_towers(model, cfg.init_text, cfg.init_vision)
    if resume:
        _resume(run)
    if procs.main:
        run_config = {"task": task.name, **to_dict(dataclasses.replace(task.cfg, model=model_cfg))}
        atomic_write_text(run_dir / "run_config.json", json.dumps(run_config, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    if procs.main:
        log.info(f"{task.name}: {n_params / 1e6:.2f}M parameters on {describe(device, amp_dtype)} "
                 f"(train.device={cfg.device}, train.precision={cfg.precision}), {cfg.steps} steps of {cfg.batch_size}")
        parts = procs.world * cfg.accumulate
        if parts > 1:
            log.info(f"batch per optimizer step {cfg.batch_size} = {procs.world} processes x {cfg.accumulate} micro-steps x "
                     f"{cfg.batch_size // parts}; learning rate {cfg.lr:g} (set for the batch of {cfg.batch_size}, whatever the split)")
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # every process built the same weights from the same seed; DDP checks and broadcasts rank 0's
        run.model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(model, "leaves_parameters_unused", False),
        )
        if not resume:  # dropout and sampling differ across processes (a resumed run restored each one's state)
            torch.manual_seed(cfg.seed + 1_000_003 * procs.rank)
    if cfg.compile:
        run.model = torch.compile(run.model)
    if procs.main:
        run.metrics = (run_dir / "metrics.jsonl").open("a")
        data_report = run_dir / "data_report.json"
        if not resume and data_report.is_file():  # own data: what was read, what was skipped
            run.log({"step": 0, "data": json.loads(data_report.read_text())})
    return run


def _resume(run: _Run) -> None:
    """Restore the newest checkpoint that can be read: a damaged one (named in a warning) is set
    aside as damaged-step-N and the one before it used. Every process decides from the same
    files, so all decide alike (or all refuse); rank 0 then renames and trims the log."""
    candidates = complete_checkpoints(run.run_dir)[::-1]
    if not candidates:
        raise FileNotFoundError(
            f"{run.run_dir}: no complete checkpoint to resume from (the run ended before its first one); "
            f"start it again without --resume, which replaces what it left"
        )
    damaged = []
    for last in candidates:
        try:
            files = read_checkpoint(last)
            break
        except CheckpointError as e:
            if last == candidates[-1]:
                raise CheckpointError(f"no checkpoint of {run.run_dir} can be read; the oldest: {e}") from None
            if run.procs.main:
                log.warning(f"{e}: resuming from the checkpoint before it")
            damaged.append(last)
    state = load_checkpoint(last, run.core, run.optimizer, run.scheduler, run.procs.rank, files)
    run.start_step, run.best = state["step"], state["best"]
    run.task.load_state(state.get("task", {}))
    if run.scaler.is_enabled() and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    metrics = metrics_up_to(run.run_dir / "metrics.jsonl", run.start_step)  # (every process: a damaged log stops all)
    run.procs.barrier()  # every process has read its checkpoint before rank 0 renames any
    if run.procs.main:
        for path in damaged:
            log.warning(f"{path} set aside as {set_aside(path).name}")
        atomic_write_text(run.run_dir / "metrics.jsonl", "".join(line + "\n" for line in metrics))
        log.info(f"resumed from {last} at step {run.start_step}")


def _step(run: _Run, step: int) -> tuple[float, dict[str, float], torch.Tensor | None]:
    """Forward and backward over every micro-step of step index `step`, gradients clipped;
    returns (loss, each *_loss term, gradient norm)."""
    cfg, procs = run.cfg, run.procs
    parts = procs.world * cfg.accumulate
    loss_value, step_losses = 0.0, {}
    batches = [run.task.train_batch(step, procs.rank * cfg.accumulate + micro, parts) for micro in range(cfg.accumulate)]
    for micro, (batch, scale) in enumerate(zip(batches, micro_step_scales(run.task, batches, procs))):
        batch = {k: v.to(run.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        # gradients are averaged across processes once per step, on the last micro-step
        last_micro = micro == cfg.accumulate - 1
        sync = contextlib.nullcontext() if last_micro or procs.world == 1 else run.model.no_sync()
        with sync:
            with autocast(run.device, run.amp_dtype):
                out = run.model(**batch)
            losses = {k: v for k, v in out.items() if k.endswith("_loss")}
            loss = sum(losses.values())
            run.scaler.scale(loss * scale).backward()
        loss_value += loss.item() * scale
        for k, v in losses.items():
            step_losses[k] = step_losses.get(k, 0.0) + v.item() * scale
        correct, count = run.task.batch_accuracy(out, batch)
        samples = run.task.batch_samples(batch)
        run.window["correct"] += correct
        run.window["count"] += count
        run.window["samples"] += count if samples is None else samples
    run.scaler.unscale_(run.optimizer)  # (fp16: the true gradients, for clipping and the norm; otherwise nothing)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
    return loss_value, step_losses, grad_norm


def _log_window(run: _Run, done: int, grad_norm: torch.Tensor | None, bar: tqdm) -> None:
    """Write the training record of the steps since the last one: every process's share of the
    batch, losses averaged (over the window too), counts summed."""
    window, procs = run.window, run.procs
    seconds = time.perf_counter() - window["start"]
    steps_in_window = max(1, window["steps"])  # steps taken (skipped ones have no loss to average)
    names = sorted(window["terms"])
    totals = procs.sum([window["loss"], window["correct"], window["count"], window["samples"], *(window["terms"][k] for k in names)])
    record = {
        "step": done,
        "loss": totals[0] / procs.world / steps_in_window,
        **{k: v / procs.world / steps_in_window for k, v in zip(names, totals[4:])},
        "train_accuracy": totals[1] / max(1, totals[2]),
        "lr": run.scheduler.get_last_lr()[0],
        "samples_per_s": totals[3] / seconds,
        "grad_norm": None if grad_norm is None or not math.isfinite(grad_norm.item()) else grad_norm.item(),
        **({"loss_scale": run.scaler.get_scale()} if run.scaler.is_enabled() else {}),  # (fp16: halved on each overflow)
    }
    record.update(run.task.observe(done, record))  # e.g. a curriculum that ends on training accuracy
    run.log(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_accuracy']:.3f}", sps=f"{record['samples_per_s']:.0f}")
    run.new_window()


def _skip(run: _Run, step: int, step_losses: dict[str, float], buffers, running_stats, nonfinite: list[int]) -> None:
    """A step whose loss or gradients were not finite anywhere: every process leaves the weights
    and BatchNorm statistics as they were; too many in a row stop training."""
    done = step + 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.update()  # (fp16: ends the step's unscaling, so the next step can unscale)
    with torch.no_grad():
        for b, saved in zip(running_stats, buffers):
            b.copy_(saved)
    run.scheduler.step()  # the schedule stays tied to the step number
    nonfinite.append(done)
    run.log({"step": done, "skipped": "non-finite loss or gradients", "batch_step": step, **step_losses})
    log.warning(f"step {done}: non-finite loss or gradients (batch of step index {step}); step skipped")
    if len(nonfinite) >= run.cfg.max_nonfinite:
        last = latest_checkpoint(run.run_dir)
        raise TrainingError(
            f"{len(nonfinite)} steps in a row with a non-finite loss or gradients (steps {nonfinite[0]}-{nonfinite[-1]}); "
            f"training stopped. The last good checkpoint is {last or 'none yet'}: lower train.lr, check the data, "
            f"or raise train.max_nonfinite, then continue with --resume {run.run_dir}"
        )


def _evaluate_and_save(run: _Run, done: int, final_eval: dict[str, Any]) -> dict[str, Any]:
    """Evaluate (rank 0) and checkpoint when `done` steps call for it; returns the latest evaluation."""
    cfg, procs, task = run.cfg, run.procs, run.task
    if procs.main and (done % cfg.eval_every == 0 or done == cfg.steps):
        final_eval = task.evaluate(run.core)
        run.log({"step": done, "eval": final_eval})
        log.info(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in task.headline(final_eval).items()))
        if task.score(final_eval) > run.best["metric"]:
            run.best = {"metric": task.score(final_eval), "step": done}
    if done % cfg.save_every == 0 or done == cfg.steps:
        rng_states = procs.rng_states()
        if procs.main:
            extra = {"best": run.best, "task": task.state(), **({"grad_scaler": run.scaler.state_dict()} if run.scaler.is_enabled() else {})}
            save_checkpoint(run.run_dir, run.core, run.optimizer, run.scheduler, done, extra, cfg.keep_last, run.best["step"], rng_states)
        run.window["start"] = time.perf_counter()  # do not count checkpoint time in samples/s
    return final_eval


def _loop(run: _Run, progress: bool) -> dict[str, Any]:
    """The steps from the run's start to train.steps; returns the final evaluation."""
    cfg, procs = run.cfg, run.procs
    bar = tqdm(total=cfg.steps, initial=run.start_step, disable=not (progress and procs.main), dynamic_ncols=True, desc=f"train {run.task.name}")
    run.new_window()
    final_eval: dict[str, Any] = {}
    nonfinite: list[int] = []  # consecutive skipped steps
    # the buffers a forward pass changes: BatchNorm statistics (other buffers, e.g. fixed
    # position tables, never change)
    norms = [m for m in run.core.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    running_stats = [b for m in norms for b in m.buffers()]
    momenta = [m.momentum for m in norms]
    first_start = time.perf_counter()
    for step in range(run.start_step, cfg.steps):
        run.model.train()
        average, restart = batchnorm_averaging(step, cfg)
        for m, momentum in zip(norms, momenta):
            if restart:
                m.reset_running_stats()
            m.momentum = None if average else momentum  # None: torch's even (cumulative) average
        run.optimizer.zero_grad(set_to_none=True)
        buffers = [b.detach().clone() for b in running_stats]  # changed in the forward pass: kept to undo a skipped step
        loss_value, step_losses, grad_norm = _step(run, step)
        # (in fp16, gradients that overflow are the loss scaler's to handle: it skips the update and lowers the scale)
        finite = math.isfinite(loss_value) and (run.scaler.is_enabled() or grad_norm is None or math.isfinite(grad_norm.item()))
        done = step + 1
        bar.update(1)
        if not procs.all_finite(finite):  # any process's loss or gradients: every process skips the step
            _skip(run, step, step_losses, buffers, running_stats, nonfinite)
            continue
        nonfinite.clear()
        run.scaler.step(run.optimizer)  # (optimizer.step(), unless fp16 gradients overflowed)
        run.scaler.update()
        if run.scaler.is_enabled() and run.scaler.get_scale() < MIN_LOSS_SCALE:  # every step skipped: gradients NaN, not large
            raise TrainingError(
                f"step {done}: the fp16 loss scale fell to {run.scaler.get_scale():g}: the gradients are not finite at any "
                f"scale. The last good checkpoint is {latest_checkpoint(run.run_dir) or 'none yet'}; train in bf16 or fp32 "
                f"(train.precision), lower train.lr or check the data, then continue with --resume {run.run_dir}"
            )
        run.scheduler.step()
        if step == run.start_step and cfg.compile and procs.main:
            log.info(f"torch.compile: the first step took {time.perf_counter() - first_start:.1f} s, compiling included")
        run.window["loss"] += loss_value
        run.window["steps"] += 1
        for k, v in step_losses.items():
            run.window["terms"][k] = run.window["terms"].get(k, 0.0) + v
        if done % cfg.log_every == 0 or done == cfg.steps:
            _log_window(run, done, grad_norm, bar)
        final_eval = _evaluate_and_save(run, done, final_eval)
    bar.close()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return final_eval


def _finish(run: _Run) -> None:
    """Rank 0 saves the final model beside a copy of the run config; the others wait for it."""
    if run.procs.main:
        run.metrics.close()
        run.task.save_model(run.core, run.run_dir / "model")
        # the run's data settings travel with the model, so `mmt eval MODEL_DIR` uses the right data
        shutil.copyfile(run.run_dir / "run_config.json", run.run_dir / "model" / "run_config.json")
    run.procs.barrier()  # the other processes end once the model is saved
