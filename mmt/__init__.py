"""mmt: one small set of Transformer blocks for vision + language learning."""

__version__ = "0.1.0"

from mmt.checkpoint import CheckpointError, from_pretrained, load_tokenizer, save_pretrained  # noqa: E402
from mmt.config import ConfigError, TextConfig, TransformerConfig, VisionConfig  # noqa: E402
from mmt.text import Tokenizer  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "TextConfig",
    "Tokenizer",
    "TransformerConfig",
    "VisionConfig",
    "from_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
