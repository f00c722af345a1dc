"""Task models. Each file holds one task; importing it registers the model and its presets."""

from mmt.models.caption import CaptionConfig, CaptionModel
from mmt.models.retrieval import RetrievalConfig, RetrievalModel
from mmt.models.t2i import T2IConfig, T2IModel
from mmt.models.vqa import VQAConfig, VQAModel
from mmt.models.vqvae import VQVAE, VQVAEConfig

__all__ = [
    "CaptionConfig", "CaptionModel", "RetrievalConfig", "RetrievalModel", "T2IConfig", "T2IModel", "VQAConfig", "VQAModel",
    "VQVAE", "VQVAEConfig",
]
