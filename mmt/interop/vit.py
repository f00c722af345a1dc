"""ViT image towers (`transformers.ViTModel` layout; Dosovitskiy et al. 2021) in mmt's VisionTower.

ViT: patches projected by a strided conv, a class token first, one learned position row per
token, a pre-norm encoder and a final LayerNorm over every token. Its pooler (dense + tanh
over the class token) and a classifier head are not part of a tower and are dropped by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmt.config import TransformerConfig, VisionConfig
from mmt.errors import CheckpointError
from mmt.interop.weights import Mapping, attention, pairs, setting

MODEL_TYPES = ("vit",)
ACTIVATIONS = ("gelu", "relu", "quick_gelu")


def side(config: dict[str, Any], key: str, path: str | Path, default: int) -> int:
    """An image or patch side: an int, or a square [h, w] pair."""
    value = config.get(key, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{path}: {key}={value!r}; mmt reads square images and patches (one integer)")
    return value


def encoder_config(config: dict[str, Any], path: str | Path, eps: float, act: str) -> TransformerConfig:
    """The pre-norm encoder of a ViT or CLIP tower."""
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act={act!r} is not one of {list(ACTIVATIONS)}")
    dim, heads = setting(config, "hidden_size", int, path), setting(config, "num_attention_heads", int, path)
    if dim % heads:
        raise CheckpointError(f"{path}: hidden_size={dim} is not divisible by num_attention_heads={heads}")
    return TransformerConfig(
        dim=dim, depth=setting(config, "num_hidden_layers", int, path), heads=heads,
        ffn_dim=setting(config, "intermediate_size", int, path), dropout=0.0, activation=act, norm_first=True,
        norm_eps=setting(config, "layer_norm_eps", float, path, eps),
    )


def vision_config(config: dict[str, Any], path: str | Path) -> VisionConfig:
    """mmt's VisionConfig for a ViT config.json."""
    encoder = encoder_config(config, path, 1e-12, setting(config, "hidden_act", str, path, "gelu"))
    encoder.dropout = setting(config, "hidden_dropout_prob", float, path, 0.0)
    size, patch = side(config, "image_size", path, 224), side(config, "patch_size", path, 16)
    if size % patch:
        raise CheckpointError(f"{path}: image_size={size} is not a multiple of patch_size={patch}")
    return VisionConfig(
        stem="patch", image_size=size, channels=setting(config, "num_channels", int, path, 3), patch_size=patch,
        positions="flat", class_token=True, patch_bias=True, input_norm=False, encoder=encoder,
    )


def vision_mapping(cfg: VisionConfig, prefix: str = "") -> Mapping:
    """Where each tensor of mmt's VisionTower comes from in a ViTModel file whose names start
    with `prefix` ("" or "vit.")."""
    p = prefix
    tensors: dict = {
        **pairs("stem.proj", f"{p}embeddings.patch_embeddings.projection"),
        "class_token": ((f"{p}embeddings.cls_token",), lambda t: t.reshape(-1)),  # (1, 1, D) -> (D,)
        "positions.table": ((f"{p}embeddings.position_embeddings",), lambda t: t[0]),  # (1, 1 + N, D) -> (1 + N, D)
        **pairs("encoder.norm", f"{p}layernorm"),
    }
    for i in range(cfg.encoder.depth):
        mine, theirs = f"encoder.layers.{i}", f"{p}encoder.layer.{i}"
        tensors.update(attention(f"{mine}.attn", f"{theirs}.attention.", {
            "q_proj": "attention.query", "k_proj": "attention.key", "v_proj": "attention.value", "out_proj": "output.dense",
        }))
        tensors.update(pairs(f"{mine}.norm1", f"{theirs}.layernorm_before"))
        tensors.update(pairs(f"{mine}.ffn.fc1", f"{theirs}.intermediate.dense"))
        tensors.update(pairs(f"{mine}.ffn.fc2", f"{theirs}.output.dense"))
        tensors.update(pairs(f"{mine}.norm2", f"{theirs}.layernorm_after"))
    dropped = {
        f"{p}pooler.": "ViT's pooler (dense + tanh over the class token) is not part of an image tower",
        "classifier.": "a classification head is not part of an image tower",
    }
    return Mapping(tensors, dropped)


def file_prefix(names: list[str]) -> str:
    """"vit." when the file is a ViT with a head (ViTForImageClassification), "" for a bare ViTModel."""
    return "vit." if "vit.embeddings.cls_token" in names else ""
