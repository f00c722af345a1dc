"""Reading a Hugging Face model directory and mapping its tensors onto an mmt module, strictly.

A mapping names, for every tensor of the mmt module, the tensor of the file it comes from
(or the tensors and the function that combine them), and lists the file's tensors it drops
on purpose, each with the reason. Loading refuses a file tensor that is neither used nor
listed, an mmt tensor the file lacks, and a shape that differs, naming the file and keys:
no weight is skipped silently.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from mmt.errors import CheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")


def read_json(path: Path) -> dict[str, Any]:
    """The mapping in a JSON file; errors name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a Hugging Face model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    return data


def read_config(directory: str | Path) -> dict[str, Any]:
    """The directory's config.json as a mapping; errors name the file."""
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (a Hugging Face model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    return read_json(Path(directory) / CONFIG_NAME)


def setting(config: dict[str, Any], key: str, kind: type, path: str | Path, default: Any = ...) -> Any:
    """config[key] checked against `kind` (int accepted for float); `default` where the file
    leaves it out (Hugging Face writes only what differs from its defaults in older files),
    else an error naming the file and key."""
    if key not in config:
        if default is ...:
            raise CheckpointError(f"{path}: no {key!r}, which mmt needs to build the tower")
        return default
    value = config[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise CheckpointError(f"{path}: {key!r} should be {kind.__name__}, got {value!r}")
    return value


def read_weights(directory: str | Path) -> tuple[dict[str, Tensor], Path]:
    """Every tensor of the directory's model.safetensors, and the file's path. A directory with
    only pickled weights is refused: unpickling runs code the file brings."""
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [name for name in PICKLE_NAMES if (directory / name).is_file()]
        if pickled:
            raise CheckpointError(
                f"{directory / pickled[0]}: mmt reads only {WEIGHTS_NAME}, never pickled weights (loading a pickle can run "
                f"any code); convert it once where you trust it, e.g. transformers' save_pretrained(..., safe_serialization=True)"
            )
        if (directory / (WEIGHTS_NAME + ".index.json")).is_file():
            raise CheckpointError(f"{directory}: weights sharded over several files are not supported; save them as one {WEIGHTS_NAME}")
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, path
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


@dataclasses.dataclass
class Mapping:
    """mmt tensor name -> the file's tensor name, or (the file's names, how to combine them);
    `dropped`: file tensor names (or prefixes ending in ".") deliberately not used -> why."""

    tensors: dict[str, str | tuple[tuple[str, ...], Callable[..., Tensor]]]
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)

    def sources(self, mmt_name: str) -> tuple[str, ...]:
        source = self.tensors[mmt_name]
        return (source,) if isinstance(source, str) else source[0]

    def is_dropped(self, file_name: str) -> bool:
        return any(file_name == d or (d.endswith(".") and file_name.startswith(d)) for d in self.dropped)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_mapped(module: nn.Module, tensors: dict[str, Tensor], mapping: Mapping, path: str | Path) -> None:
    """Copy the file's tensors into `module` as `mapping` says, refusing anything left over,
    missing or misshapen (see the module docstring)."""
    own = module.state_dict()
    unmapped = sorted(set(own) - set(mapping.tensors))
    if unmapped:  # a mapping that does not cover the module it was made for: mmt's bug, not the file's
        raise CheckpointError(f"{path}: the mapping leaves mmt tensors {_listing(unmapped)} without a source")
    used = {name for mmt_name in mapping.tensors for name in mapping.sources(mmt_name)}
    missing = sorted(name for name in used if name not in tensors)
    if missing:
        raise CheckpointError(f"{path}: lacks tensors {_listing(missing)}, which the mmt tower needs")
    unused = sorted(name for name in tensors if name not in used and not mapping.is_dropped(name))
    if unused:
        raise CheckpointError(
            f"{path}: tensors {_listing(unused)} have no place in the mmt tower (is this the architecture config.json names?)"
        )
    for name in tensors:
        if name.endswith("position_ids") and mapping.is_dropped(name):
            check_positions(tensors[name], path, name)
    state = {}
    for mmt_name, source in mapping.tensors.items():
        if isinstance(source, str):
            value = tensors[source]
        else:
            names, combine = source
            value = combine(*(tensors[name] for name in names))
        if tuple(value.shape) != tuple(own[mmt_name].shape):
            raise CheckpointError(
                f"{path}: {' + '.join(mapping.sources(mmt_name))} has shape {tuple(value.shape)}, "
                f"mmt's {mmt_name} needs {tuple(own[mmt_name].shape)} (does config.json match the weights?)"
            )
        state[mmt_name] = value.to(own[mmt_name].dtype)
    with torch.no_grad():
        module.load_state_dict(state, strict=True)


def check_positions(ids: Tensor, path: str | Path, key: str) -> Tensor:
    """A saved `position_ids` buffer must be 0, 1, 2, ...: mmt's positions are always that."""
    if not torch.equal(ids.flatten(), torch.arange(ids.numel(), dtype=ids.dtype)):
        raise CheckpointError(f"{path}: {key} is not 0, 1, 2, ...; mmt numbers positions from 0")
    return ids


def attention(mmt_prefix: str, file_prefix: str, names: dict[str, str]) -> dict[str, str]:
    """weight and bias of mmt's q/k/v/out projections from the file's names for them."""
    return {
        f"{mmt_prefix}.{mine}.{kind}": f"{file_prefix}{names[mine]}.{kind}"
        for mine in ("q_proj", "k_proj", "v_proj", "out_proj")
        for kind in ("weight", "bias")
    }


def pairs(mmt_name: str, file_name: str) -> dict[str, str]:
    """weight and bias of one layer."""
    return {f"{mmt_name}.weight": f"{file_name}.weight", f"{mmt_name}.bias": f"{file_name}.bias"}


def entry(mapping: Mapping, mmt_name: str) -> tuple[tuple[str, ...], Callable[..., Tensor]]:
    """A mapping's entry as (the file's names, how to combine them), a plain copy included."""
    source = mapping.tensors[mmt_name]
    return ((source,), lambda t: t) if isinstance(source, str) else source


def fold_pixel_normalisation(mapping: Mapping, mean: list[float], std: list[float], stem: str = "stem.proj") -> None:
    """Make a patch stem trained on pixels (raw / 255 - mean) / std read mmt's pixels, raw / 127.5 - 1
    (`mmt.data.images.to_pixels`), by changing its weights: with x mmt's pixel, the stem's
    input is x * 0.5 / std + (0.5 - mean) / std, and a strided conv without padding is linear
    in it, so W' = W * 0.5 / std per input channel and b' = b + sum of W * (0.5 - mean) / std.
    The mapping must give the stem a bias (`vision.patch_bias`)."""
    scale = torch.tensor([0.5 / s for s in std])[None, :, None, None]  # (1, C, 1, 1)
    shift = torch.tensor([(0.5 - m) / s for m, s in zip(mean, std)])[None, :, None, None]
    weight_names, weight_of = entry(mapping, f"{stem}.weight")
    mapping.tensors[f"{stem}.weight"] = (weight_names, lambda *t: weight_of(*t) * scale.to(t[0].dtype))
    n = len(weight_names)
    if f"{stem}.bias" in mapping.tensors:
        bias_names, bias_of = entry(mapping, f"{stem}.bias")
        combine = lambda *t: bias_of(*t[n:]) + (weight_of(*t[:n]) * shift.to(t[0].dtype)).sum((1, 2, 3))  # noqa: E731
        mapping.tensors[f"{stem}.bias"] = (weight_names + bias_names, combine)
    else:
        mapping.tensors[f"{stem}.bias"] = (weight_names, lambda *t: (weight_of(*t) * shift.to(t[0].dtype)).sum((1, 2, 3)))
