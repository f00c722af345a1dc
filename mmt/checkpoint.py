"""Checkpoints as the ecosystem expects: a directory with config.json + model.safetensors.

    run/model/
      config.json         {"model_type": "caption", "mmt_version": "...", ...the model config...}
      model.safetensors   weights (never pickle: loading a checkpoint cannot run code)
      tokenizer.json      when the model reads or writes text

Every file is written atomically (temporary file, fsync, rename), so a crash mid-save
leaves the previous checkpoint intact. Loading checks every key and shape and says
exactly what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmt import config as config_lib
from mmt.errors import CheckpointError
from mmt.files import atomic_write, atomic_write_text
from mmt.text import Tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without second names of tied tensors (safetensors stores each tensor once)."""
    keep = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    state = model.state_dict()
    return {k: v.detach().contiguous() for k, v in state.items() if k in keep}


@dataclasses.dataclass
class LoadReport:
    """What loading weights into a model found."""

    loaded: list[str]
    missing: list[str]  # in the model, not in the file
    unexpected: list[str]  # in the file, not in the model
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, file shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 10) -> str:
        def listing(keys: list[str]) -> str:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing from the file ({len(self.missing)}): {listing(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected in the file ({len(self.unexpected)}): {listing(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            lines.append(f"shape mismatch ({len(shapes)}): {listing(shapes)}")
        return "; ".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "new": self.missing,
            "skipped_shape_mismatch": [{"key": k, "file": list(a), "model": list(b)} for k, a, b in self.mismatched],
            "unused": self.unexpected,
        }

    def describe_init(self, source: str | Path, limit: int = 12) -> str:
        """Multi-line report of initialising a model from `source`, by module prefix."""

        def grouped(keys: list[str]) -> str:
            prefixes: dict[str, int] = {}
            for key in keys:
                prefix = ".".join(key.split(".")[:2]) if key.split(".")[1:2] and not key.split(".")[1].isdigit() else key.split(".")[0]
                prefixes[prefix] = prefixes.get(prefix, 0) + 1
            items = [f"{p} ({n})" for p, n in sorted(prefixes.items())]
            return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more groups)" if len(items) > limit else "")

        lines = [f"init from {source}:", f"  loaded  {len(self.loaded):4d} tensors: {grouped(self.loaded) or '-'}"]
        lines.append(f"  new     {len(self.missing):4d} tensors (not in the source, kept as initialised): {grouped(self.missing) or '-'}")
        shapes = [f"{k} {list(a)} -> {list(b)}" for k, a, b in self.mismatched]
        lines.append(f"  skipped {len(shapes):4d} tensors (shape mismatch, source -> model): {', '.join(shapes[:limit]) or '-'}")
        lines.append(f"  unused  {len(self.unexpected):4d} tensors (in the source, not in this model): {grouped(self.unexpected) or '-'}")
        return "\n".join(lines)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with an error naming the file if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}); it may be truncated or corrupted — "
            "re-copy it or load an earlier checkpoint"
        ) from None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, tensors: dict[str, torch.Tensor] | None = None) -> LoadReport:
    """Copy weights from `path` (or `tensors` read from it already) into `model` where name and
    shape match.

    With strict=True any missing, unexpected or mis-shaped tensor raises CheckpointError
    (and the model is left untouched); otherwise matching tensors load and the report
    says what did not.
    """
    file_tensors = read_weights(path) if tensors is None else tensors
    expected = _unique_state_dict(model)
    report = LoadReport(loaded=[], missing=[], unexpected=[], mismatched=[])
    to_load = {}
    for key, tensor in file_tensors.items():
        if key not in expected:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(expected[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(expected[key].shape)))
        else:
            to_load[key] = tensor
            report.loaded.append(key)
    report.missing = [k for k in expected if k not in file_tensors]
    if strict and not report.ok:
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__}: {report.describe()}")
    model.load_state_dict(to_load, strict=False)
    return report


def save_pretrained(model: nn.Module, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write config.json, model.safetensors (and tokenizer.json) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"model_type": model.model_type, "mmt_version": _version()}
    atomic_write_text(directory / CONFIG_NAME, json.dumps({**meta, **config_lib.to_dict(model.config)}, indent=2) + "\n")
    weights = {k: v.cpu() for k, v in _unique_state_dict(model).items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        atomic_write(directory / TOKENIZER_NAME, tokenizer.save)
    return directory


def read_config(directory: str | Path) -> tuple[str, Any]:
    """(model_type, typed config) from `directory/config.json`."""
    from mmt import registry

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {directory} a saved mmt model directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"{path}: missing the 'model_type' key")
    model_type = data.pop("model_type")
    data.pop("mmt_version", None)
    try:
        cls = registry.model_class(model_type)
        return model_type, config_lib.from_dict(cls.config_class, data, saved=True)
    except (KeyError, config_lib.ConfigError) as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu", cfg: Any = None) -> nn.Module:
    """Rebuild the model saved in `directory` (a model directory, or a run directory holding one
    in model/) and load its weights (strictly), in eval mode (dropout off: what predicting and
    decoding want; call `.train()` to fine-tune it). `cfg`: the saved config with changes (they
    must leave the weights' names and shapes as they are)."""
    from mmt import registry

    directory = model_directory(directory)
    model_type, saved = read_config(directory)
    cfg = saved if cfg is None else cfg
    model = registry.model_class(model_type)(cfg)
    load_weights(model, Path(directory) / WEIGHTS_NAME, strict=True)
    return model.to(map_location).eval()


class Pretrained:
    """`save_pretrained` and `from_pretrained` as methods of every mmt model:

        model.save_pretrained("my-model", tokenizer)      # config.json, model.safetensors, tokenizer.json
        model = CaptionModel.from_pretrained("runs/caption")  # a model or run directory

    The directory has the Hugging Face layout, so `huggingface_hub.upload_folder` can publish it
    as it is; writes are atomic and loading is strict, as the functions of this module are."""

    def save_pretrained(self, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
        return save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
        model = from_pretrained(directory, map_location)
        if not isinstance(model, cls):
            raise CheckpointError(f"{model_directory(directory)} holds a {model.model_type} model, not a {cls.__name__}")
        return model


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved beside a model, or None when there is none."""
    path = Path(directory) / TOKENIZER_NAME
    return Tokenizer.load(path) if path.is_file() else None


def _version() -> str:
    from mmt import __version__

    return __version__


def model_directory(run_dir: str | Path) -> Path:
    """The saved model of a run (run_dir/model), or `run_dir` itself when it is a model directory."""
    directory = Path(run_dir)
    return directory / "model" if (directory / "model" / CONFIG_NAME).is_file() else directory


def load_for_inference(run_dir: str | Path, cfg: Any = None) -> tuple[nn.Module, Tokenizer | None, Path]:
    """(model in eval mode, its tokenizer, the model directory) of a training run or model
    directory; an image tokenizer (vqvae) reads no text and has no tokenizer (None)."""
    directory = model_directory(run_dir)
    model = from_pretrained(directory, cfg=cfg)
    tokenizer = load_tokenizer(directory)
    if tokenizer is None and model.model_type != "vqvae":
        raise CheckpointError(f"{directory}: no tokenizer.json beside the model")
    return model, tokenizer, directory
