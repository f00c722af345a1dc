"""Typed configuration: nested dataclasses, strict loading, dotted overrides.

Every config in mmt is a dataclass. `from_dict` builds one from plain JSON data and
rejects unknown keys and ill-typed values with the dotted path of the offending key,
so a typo in `config.json` or on the command line fails loudly instead of silently
training the wrong model. `apply_overrides` implements `--set a.b=c`.

A numeric setting's range is written beside its type, `steps: Annotated[int, Range(1)]` (or
one of the names below: `Count`, `Fraction`, ...), and checked whenever a config is made (a
config class derives from `Settings`), so an out-of-range value is refused with its dotted
key before any work, whether it came from a file, `--set` or Python.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from mmt.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric setting: low <= value <= high (None: unbounded; `low_open`,
    `high_open`: the bound itself excluded). Used as `Annotated[int, Range(1)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:  # (NaN holds no bound)
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "any number"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


Count = Annotated[int, Range(1)]  # at least 1
Amount = Annotated[int, Range(0)]  # 0 or more
Positive = Annotated[float, Range(0, low_open=True)]  # above 0
NonNegative = Annotated[float, Range(0)]  # 0 or more
Fraction = Annotated[float, Range(0, 1)]  # 0 to 1
Length = Annotated[int, Range(2)]  # a text length counting [BOS] and [EOS]: at least 2
Beta = Annotated[float, Range(0, 1, high_open=True)]  # an averaging factor: 0 up to (not) 1


def _bounds(hint: Any) -> Range | None:
    return next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)), None)


@functools.cache
def _ranges(cls: type) -> tuple[tuple[str, Range | None, Range | None], ...]:
    """(field, its range, its items' range) for each field of `cls` that has either: read from
    the annotations once per class (a config is made on every decoding call)."""
    ranges = []
    for name, hint in get_type_hints(cls, include_extras=True).items():
        inner = get_args(get_args(hint)[0] if get_origin(hint) is Annotated else hint)
        bounds, item_bounds = _bounds(hint), _bounds(inner[0]) if inner else None
        if bounds is not None or item_bounds is not None:
            ranges.append((name, bounds, item_bounds))
    return tuple(ranges)


def out_of_range(cfg: Any) -> str | None:
    """The first field of config `cfg` (not of the configs inside it) whose value or items lie
    outside the range its annotation gives, described with its key; None if none does."""
    for name, bounds, item_bounds in _ranges(type(cfg)):
        value = getattr(cfg, name, None)
        if bounds is not None and isinstance(value, (int, float)) and not bounds.holds(value):
            return f"{name}: {value!r} is out of range (must be {bounds})"
        if item_bounds is not None and isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if isinstance(item, (int, float)) and not item_bounds.holds(item):
                    return f"{name}[{i}]: {item!r} is out of range (must be {item_bounds})"
    return None


class Settings:
    """Base of mmt's config dataclasses: making one checks its fields' ranges (`Range`)."""

    def __post_init__(self) -> None:
        problem = out_of_range(self)
        if problem is not None:
            raise ConfigError(problem)


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass
class TransformerConfig(Settings):
    """One stack of encoder or decoder layers."""

    dim: Count = 256  # model width d_model
    depth: Amount = 4  # number of layers N
    heads: Count = 4  # attention heads h; dim must divide evenly (d_k = dim / heads)
    ffn_dim: Count = 1024  # hidden width of the two-layer feed-forward network
    dropout: Fraction = 0.1  # dropout on attention weights, residual branches and FFN hidden
    activation: Literal["gelu", "relu", "quick_gelu"] = "gelu"  # FFN non-linearity (gelu: exact, erf; quick_gelu: CLIP's x*sigmoid(1.702x))
    norm_first: bool = True  # pre-norm (stable, default) or post-norm (the original formula)
    norm_eps: Annotated[float, Range(0, 1e-2, low_open=True)] = 1e-5  # LayerNorm epsilon (torch's default; BERT and ViT use 1e-12)

    # keys that configs saved by mmt 0.1 may hold: (their old default, whether another value can
    # still be honoured, why they are gone). The attention kernel is a runtime setting now.
    removed: ClassVar[dict[str, tuple[Any, bool, str]]] = {
        "fast_attention": (True, True, "the attention kernel is a runtime setting now (train.attention, mmt.layers.attention_kernel)"),
        "fused_on_bf16_cpu": (False, True, "the attention kernel is a runtime setting now (train.attention, mmt.layers.attention_kernel)"),
    }


@dataclasses.dataclass
class VisionConfig(Settings):
    """Image tower: a stem that turns pixels into a grid of tokens, then an encoder."""

    stem: Literal["conv", "patch"] = "conv"  # convolutional stem (design's example) or ViT patches
    image_size: Count = 64  # input images are fitted to image_size x image_size
    # how: "crop" resizes the shorter side and keeps the centre square; "stretch" resizes both
    # sides (mmt 0.1's way: a config without this key is one of 0.1's)
    image_fit: Literal["crop", "stretch"] = "crop"
    channels: Count = 3  # input colour channels
    patch_size: Count = 8  # patch side for the "patch" stem
    conv_widths: tuple[Count, ...] = (64, 128)  # conv stem: channels of the 7x7 conv, then of each 3x3 block
    conv_strides: tuple[Count, ...] = (2,)  # conv stem: stride of each 3x3 block (one per width after the first)
    conv_norm: Literal["group", "batch"] = "group"  # conv stem normalisation (group: batch-independent)
    # position embedding of the token grid: 2-D (a row's plus a column's), learned or sinusoidal;
    # "flat": one learned row per token of the flattened grid, the class token's first (ViT, CLIP)
    positions: Literal["learned", "sincos", "flat"] = "learned"
    token_norm: bool = False  # LayerNorm on each stem token before positions are added (keeps their scales comparable)
    patch_bias: bool = True  # the patch stem's projection has a bias (CLIP's has none)
    class_token: bool = False  # a learned token put before the grid's (ViT's and CLIP's [CLS]); its mask is never padding
    input_norm: bool = False  # LayerNorm on the tokens, positions added, before the encoder (CLIP's pre-LayerNorm)
    relative_bias: bool = False  # encoder attention adds a learned bias per head for each (row, col) offset between tokens
    encoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))

    # experiments of mmt 0.1 that were not adopted (docs/lab-notes.md): a saved config may hold
    # their off value; a model built with one on cannot be rebuilt (see TransformerConfig.removed)
    removed: ClassVar[dict[str, tuple[Any, bool, str]]] = {
        "coord_channels": (False, False, "coordinate planes on the pixels were an experiment, removed in mmt 0.2"),
        "conv_layout": ("resnet", False, "the plain 3x3 stem was an experiment, removed in mmt 0.2"),
    }
    # keys added after mmt 0.1, with the value a saved config that lacks them had
    added: ClassVar[dict[str, Any]] = {"image_fit": "stretch"}


@dataclasses.dataclass
class TextConfig(Settings):
    """Text tower: token + position embedding, then an encoder."""

    vocab_size: Count = 1000  # rows of the token embedding; set from the tokenizer
    max_len: Count = 64  # longest sequence the 1-D position embedding covers
    positions: Literal["learned", "sincos"] = "learned"  # 1-D position embedding
    pad_id: Amount = 0  # id of [PAD]; its embedding row stays zero and its keys are masked
    # LayerNorm over token + position embeddings before the encoder (BERT's embedding LayerNorm;
    # its epsilon is encoder.norm_eps)
    embed_norm: bool = False
    causal: bool = False  # each token attends only to itself and earlier tokens (CLIP's text tower)
    encoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))


# ----------------------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, saved: bool = False) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, _path=path, saved=saved)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path, saved)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)} ({'; '.join(errors)})")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{path}[{i}]", saved) for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]", saved) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{path}[{i}]", saved) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], _path: str = "", saved: bool = False) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types.

    Keys that `data` leaves out take the dataclass defaults; with `saved` (a config a run or
    model directory wrote, perhaps by an older version), keys added since (`cls.added`) take
    the value that version used instead.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = _without_removed(cls, data, _path)
    if saved:
        data = {**getattr(cls, "added", {}), **data}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{_path}." if _path else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} for {cls.__name__}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{_path}.{name}" if _path else name, saved)
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a range (`Settings`): the key's full path
        raise ConfigError(f"{_path}.{e}" if _path else str(e)) from None


def _without_removed(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """`data` without the keys `cls.removed` lists (keys of older configs): dropped quietly at their
    old default; at another value dropped with a warning where that is harmless, else refused
    (a model that needs a removed module cannot be built)."""
    removed = getattr(cls, "removed", {})
    if not set(data) & set(removed):
        return data
    kept = dict(data)
    for key in sorted(set(data) & set(removed)):
        default, harmless, why = removed[key]
        value = kept.pop(key)
        where = f"{path}.{key}" if path else key
        if value == default:
            continue
        if not harmless:
            raise ConfigError(f"{where}={value!r}: {why}; this config cannot be built any more")
        if (where, repr(value)) not in _warned:  # a config is read more than once per command
            _warned.add((where, repr(value)))
            log.warning("config key %s=%r ignored: %s", where, value, why)
    return kept


_warned: set[tuple[str, str]] = set()


def attention_of_old_model(model: dict[str, Any]) -> str | None:
    """The `train.attention` setting that trains as a model config of mmt 0.1 did, from its
    Transformer stacks' kernel fields (`fast_attention`, `fused_on_bf16_cpu`); None for a config
    without them. Stacks that chose differently cannot all be kept: "auto", with a warning."""
    stacks: list[tuple[bool, bool]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "fast_attention" in node or "fused_on_bf16_cpu" in node:
                stacks.append((node.get("fast_attention", True), node.get("fused_on_bf16_cpu", False)))
            for value in node.values():
                walk(value)

    walk(model)
    if not stacks:
        return None
    if not any(fast for fast, _ in stacks):
        return "literal"
    if all(fast and fused for fast, fused in stacks):
        return "fused"
    if all(fast and not fused for fast, fused in stacks):
        return "auto"
    log.warning("this saved model chose the attention kernel per Transformer stack, which mmt 0.2 does not: training with train.attention=auto")
    return "auto"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def read_data(path: str | Path) -> dict[str, Any]:
    """The mapping in a JSON (or, with PyYAML installed, YAML) file, with errors naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # optional; JSON is the native format

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError or yaml.YAMLError
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'json'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path) -> T:
    """Read a config file into `cls`; keys the file leaves out take the defaults."""
    try:
        return from_dict(cls, read_data(path))
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def merge(cfg: T, data: dict[str, Any]) -> T:
    """A copy of `cfg` with the (nested) keys of `data` replaced, validated like from_dict."""

    def deep(base: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                deep(base[key], value)
            else:
                base[key] = value

    merged = to_dict(cfg)
    deep(merged, data)
    return from_dict(type(cfg), merged)


def _parse_value(text: str) -> Any:
    """`--set` values are JSON when they parse as JSON (numbers, true, [1,2]), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: T, overrides: typing.Iterable[str]) -> T:
    """Return a copy of `cfg` with each `dotted.key=value` applied and validated."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])} in override {item!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"unknown config key {key} in override {item!r}")
        # A string field keeps the text as typed (so `--set name=123` stays "123").
        node[parts[-1]] = raw if isinstance(node[parts[-1]], str) else _parse_value(raw)
    return from_dict(type(cfg), data)
