"""The Task protocol: what the one training loop (`mmt.train.train`) asks of a task.

A task turns a run config into data, batches, a model and an evaluation. The trainer calls,
in this order:

    model_cfg = task.prepare(run_dir)     read data; build or reuse tokenizer and vocabularies
    model = task.build_model(model_cfg)
    for each step:  batch = task.train_batch(step, part, parts); out = model(**batch)
                    task.loss_terms(batch), task.batch_accuracy(out, batch), task.batch_samples(batch)
    each log:       task.observe(step, record)
    each eval:      result = task.evaluate(model); task.headline(result); task.score(result)
    each checkpoint: task.state()  (and task.load_state(...) when resuming)
    at the end:     task.save_model(model, run_dir / "model")

`mmt eval` calls `task.test(model, tokenizer, directory, out)` on the saved model.

Batches are a pure function of (seed, step, part): a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn


class Task:
    """Base class of every task, the built-in ones and yours: subclasses set `name` and
    `run_config` and implement the methods that raise NotImplementedError. The others have
    defaults that suit most tasks. The trainer calls all of them and probes for nothing."""

    name: str = ""
    run_config: ClassVar[type]  # the dataclass of the task's run config (model, data, train, ...)

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the run config (model, data, train, ...); never changed by the task
        # what reads the training data of own files or shards while training, when `prepare`
        # makes one (`mmt.data.loader.StepImages`, `mmt.tasks.common.StreamedShards`)
        self.train_images = None
        self.stream = None

    def prepare(self, run_dir: Path) -> Any:
        """Read the data and build (or, resuming or from --init, reuse) the tokenizer and
        vocabularies, saving them in `run_dir`. Returns the model config the data calls for:
        the run's model config with its data-dependent sizes set (vocabulary, longest text)."""
        raise NotImplementedError

    def build_model(self, model_cfg: Any) -> nn.Module:
        """A new model of `model_cfg` (what `prepare` returned)."""
        raise NotImplementedError

    def train_batch(self, step: int, part: int = 0, parts: int = 1) -> dict[str, Tensor]:
        """The keyword arguments of the model's forward for share `part` of `parts` (processes x
        accumulation micro-steps) of step `step`'s batch."""
        raise NotImplementedError

    def batch_accuracy(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[float, int]:
        """(right, counted) of a batch, for the training accuracy in the log."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Scores of `model` on the validation data."""
        raise NotImplementedError

    def headline(self, result: dict[str, float]) -> dict[str, float]:
        """The few scores printed at each evaluation."""
        raise NotImplementedError

    def score(self, result: dict[str, float]) -> float:
        """The one number that picks the best checkpoint (higher is better)."""
        raise NotImplementedError

    def format_result(self, result: dict[str, Any]) -> str:
        """An evaluation as a text table (what `mmt train` prints at the end)."""
        raise NotImplementedError

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write the final model and what predicting needs beside it (tokenizer, answers)."""
        raise NotImplementedError

    def test(self, model: nn.Module, tokenizer: Any, directory: Path, out: Path) -> tuple[dict[str, Any], str]:
        """Score a saved model (from `directory`) on the run's test data: (scores, a report to
        print). Files besides the scores (e.g. the captions written) go beside `out`."""
        raise NotImplementedError

    def loss_terms(self, batch: dict[str, Tensor]) -> int | None:
        """How many terms the batch's loss is the mean of (questions, target tokens), so that
        micro-steps and processes holding unequal numbers of them weigh by it; None: all alike."""
        return None

    def batch_samples(self, batch: dict[str, Tensor]) -> int | None:
        """What `samples_per_s` counts in a batch; None: what batch_accuracy counts."""
        return None

    def observe(self, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """Called with each training log record (`step` steps done, counts summed over all
        processes); returns what to add to it. For tasks whose batches follow the training."""
        return {}

    def state(self) -> dict[str, Any]:
        """What a resumed run must restore beyond weights and RNG (saved with each checkpoint)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore `state()` from a checkpoint."""

    def close(self) -> None:
        """Stop what reading the training data started (DataLoader processes decoding ahead)
        now, not when a garbage collection finds it; the trainer calls it when training ends,
        however it ends."""
        for reader in (self.train_images, self.stream):
            if reader is not None:
                reader.close()
