"""Task models. Each file holds one task; importing it registers the model and its presets."""

from mmt.models.caption import CaptionConfig, CaptionModel

__all__ = ["CaptionConfig", "CaptionModel"]
