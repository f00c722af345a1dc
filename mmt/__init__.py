"""mmt: one small set of Transformer blocks for vision + language learning.

The names below are imported on first use, so that `import mmt` (and `mmt --help`) stays quick:
torch is loaded only when a model is.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "load": "mmt.api",
    "Predictor": "mmt.api",
    "from_pretrained": "mmt.checkpoint",
    "save_pretrained": "mmt.checkpoint",
    "load_tokenizer": "mmt.checkpoint",
    "TextConfig": "mmt.config",
    "TransformerConfig": "mmt.config",
    "VisionConfig": "mmt.config",
    "CheckpointError": "mmt.errors",
    "ConfigError": "mmt.errors",
    "Tokenizer": "mmt.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
