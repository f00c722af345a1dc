"""CLIP checkpoints (`transformers.CLIPModel` layout; Radford et al. 2021): both towers, the
projections into the shared space and the logit scale, in mmt's RetrievalModel.

Image tower: patches (a conv without bias), a class token first, one learned position row per
token, LayerNorm before the encoder ("pre_layrnorm", Hugging Face's spelling), a pre-norm
encoder with quick GELU, LayerNorm on the class token ("post_layernorm": mmt's encoder's
final norm, applied to every token), projection without bias. Text tower: token + position
embedding, a causal pre-norm encoder, final LayerNorm, the state at the end-of-text token
(the last real one) projected without bias. logit_scale is log(1 / temperature), as mmt's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmt.config import TextConfig, VisionConfig
from mmt.errors import CheckpointError
from mmt.interop.vit import encoder_config, side
from mmt.interop.weights import Mapping, attention, pairs, setting

MODEL_TYPES = ("clip",)
ATTENTION = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "out_proj": "self_attn.out_proj"}


def part(config: dict[str, Any], key: str, path: str | Path) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {key} should be a mapping, got {value!r}")
    return value


def vision_config(config: dict[str, Any], path: str | Path) -> VisionConfig:
    """mmt's VisionConfig for the image tower of a CLIP config.json."""
    vision = part(config, "vision_config", path)
    where = f"{path} (vision_config)"
    size, patch = side(vision, "image_size", where, 224), side(vision, "patch_size", where, 32)
    if size % patch:
        raise CheckpointError(f"{where}: image_size={size} is not a multiple of patch_size={patch}")
    return VisionConfig(
        stem="patch", image_size=size, channels=setting(vision, "num_channels", int, where, 3), patch_size=patch,
        positions="flat", class_token=True, patch_bias=False, input_norm=True,
        encoder=encoder_config(vision, where, 1e-5, setting(vision, "hidden_act", str, where, "quick_gelu")),
    )


def text_config(config: dict[str, Any], path: str | Path) -> TextConfig:
    """mmt's TextConfig for the text tower of a CLIP config.json."""
    text = part(config, "text_config", path)
    where = f"{path} (text_config)"
    return TextConfig(
        vocab_size=setting(text, "vocab_size", int, where, 49408), max_len=setting(text, "max_position_embeddings", int, where, 77),
        positions="learned", pad_id=setting(text, "pad_token_id", int, where, 1), embed_norm=False, causal=True,
        encoder=encoder_config(text, where, 1e-5, setting(text, "hidden_act", str, where, "quick_gelu")),
    )


def projection_dim(config: dict[str, Any], path: str | Path) -> int:
    return setting(config, "projection_dim", int, path, 512)


def _layers(tensors: dict, depth: int, mine: str, theirs: str) -> None:
    for i in range(depth):
        m, t = f"{mine}.{i}", f"{theirs}.{i}"
        tensors.update(attention(f"{m}.attn", f"{t}.", ATTENTION))
        tensors.update(pairs(f"{m}.norm1", f"{t}.layer_norm1"))
        tensors.update(pairs(f"{m}.ffn.fc1", f"{t}.mlp.fc1"))
        tensors.update(pairs(f"{m}.ffn.fc2", f"{t}.mlp.fc2"))
        tensors.update(pairs(f"{m}.norm2", f"{t}.layer_norm2"))


def vision_tensors(cfg: VisionConfig, mine: str = "", theirs: str = "vision_model.") -> dict:
    tensors: dict = {
        f"{mine}stem.proj.weight": f"{theirs}embeddings.patch_embedding.weight",
        f"{mine}class_token": f"{theirs}embeddings.class_embedding",
        f"{mine}positions.table": f"{theirs}embeddings.position_embedding.weight",
        **pairs(f"{mine}input_norm", f"{theirs}pre_layrnorm"),
        **pairs(f"{mine}encoder.norm", f"{theirs}post_layernorm"),
    }
    _layers(tensors, cfg.encoder.depth, f"{mine}encoder.layers", f"{theirs}encoder.layers")
    return tensors


def text_tensors(cfg: TextConfig, mine: str = "", theirs: str = "text_model.") -> dict:
    tensors: dict = {
        f"{mine}embed.tokens.weight": f"{theirs}embeddings.token_embedding.weight",
        f"{mine}embed.positions.table": f"{theirs}embeddings.position_embedding.weight",
        **pairs(f"{mine}encoder.norm", f"{theirs}final_layer_norm"),
    }
    _layers(tensors, cfg.encoder.depth, f"{mine}encoder.layers", f"{theirs}encoder.layers")
    return tensors


POSITION_BUFFERS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
BUFFERS_WHY = "a buffer of 0, 1, 2, ... (checked), which mmt's positions always are"


def vision_mapping(cfg: VisionConfig) -> Mapping:
    """The image tower alone (mmt's VisionTower) from a CLIPModel file: the text tower, the
    projections and the logit scale are dropped by name."""
    dropped = {"text_model.": "the text tower (loaded by --init-text)", "text_projection.": "the text tower's projection",
               "visual_projection.": "a retrieval model's projection, not part of an image tower", "logit_scale": "a retrieval model's"}
    return Mapping(vision_tensors(cfg), {**dropped, **dict.fromkeys(POSITION_BUFFERS, BUFFERS_WHY)})


def text_mapping(cfg: TextConfig) -> Mapping:
    """The text tower alone (mmt's TextTower) from a CLIPModel file."""
    dropped = {"vision_model.": "the image tower (loaded by --init-vision)", "visual_projection.": "the image tower's projection",
               "text_projection.": "a retrieval model's projection, not part of a text tower", "logit_scale": "a retrieval model's"}
    return Mapping(text_tensors(cfg), {**dropped, **dict.fromkeys(POSITION_BUFFERS, BUFFERS_WHY)})


def retrieval_mapping(vision: VisionConfig, text: TextConfig) -> Mapping:
    """mmt's RetrievalModel (contrastive term only: towers, projections, logit scale) from a CLIPModel file."""
    tensors = {
        **vision_tensors(vision, "vision."), **text_tensors(text, "text."),
        "image_proj.weight": "visual_projection.weight", "text_proj.weight": "text_projection.weight",
        "logit_scale": (("logit_scale",), lambda t: t.reshape(())),
    }
    return Mapping(tensors, dict.fromkeys(POSITION_BUFFERS, BUFFERS_WHY))
