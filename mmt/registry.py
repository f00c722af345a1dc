"""Named presets -> configs -> models. Plain dictionaries filled by two decorators.

A model class registers under its `model_type` (the key written into `config.json`,
used by `from_pretrained` to rebuild it); a preset is a function returning a config.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

MODELS: dict[str, type[nn.Module]] = {}
PRESETS: dict[str, Callable[[], Any]] = {}


def register_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator; the class needs `model_type: str` and `config_class` attributes."""
    MODELS[cls.model_type] = cls
    return cls


def register_preset(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Function decorator; the preset's name is the function name with '_' read as '-'."""
    PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


def model_class(model_type: str) -> type[nn.Module]:
    _import_models()
    if model_type not in MODELS:
        raise KeyError(f"unknown model_type {model_type!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[model_type]


def preset(name: str) -> Any:
    """A fresh config for the named preset."""
    _import_models()
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def preset_names() -> list[str]:
    _import_models()
    return sorted(PRESETS)


def build(cfg: Any) -> nn.Module:
    """The model a config describes (its class is found from the config's class)."""
    _import_models()
    for cls in MODELS.values():
        if isinstance(cfg, cls.config_class):
            return cls(cfg)
    raise TypeError(f"no registered model takes a {type(cfg).__name__}")


def _import_models() -> None:
    # Models register themselves on import; importing here keeps `mmt.registry` free of
    # import cycles while guaranteeing the tables are full when asked.
    import mmt.models  # noqa: F401
