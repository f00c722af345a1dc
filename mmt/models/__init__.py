"""Task models. Each file holds one task; importing it registers the model and its presets."""

from mmt.models.caption import CaptionConfig, CaptionModel
from mmt.models.retrieval import RetrievalConfig, RetrievalModel
from mmt.models.vqa import VQAConfig, VQAModel

__all__ = ["CaptionConfig", "CaptionModel", "RetrievalConfig", "RetrievalModel", "VQAConfig", "VQAModel"]
