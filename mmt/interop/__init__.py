"""Pretrained towers from the Hugging Face layout: a model directory (config.json +
model.safetensors, and for text its tokenizer.json or vocab.txt) read into mmt's own
TextTower, VisionTower and RetrievalModel, strictly (`mmt.interop.weights`).

    text_tower, tokenizer = load_text_tower("all-MiniLM-L6-v2/")     # BERT family
    vision_tower = load_vision_tower("vit-base/")                     # ViT, or CLIP's image tower
    model = load_clip("clip-vit-b32/")                                # CLIP: both towers, projections, scale

Which architecture a directory holds is read from config.json's model_type: "bert" (text),
"vit" (vision), "clip" (either tower, or both). `transformers` is never imported: the
layouts are mapped by name (`bert.py`, `vit.py`, `clip.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmt.config import TextConfig, VisionConfig
from mmt.errors import CheckpointError
from mmt.interop import bert, clip, vit
from mmt.interop.weights import (
    CONFIG_NAME,
    Mapping,
    fold_pixel_normalisation,
    load_mapped,
    read_config,
    read_json,
    read_weights,
    setting,
)


def _model_type(config: dict[str, Any], directory: str | Path, accepted: tuple[str, ...], what: str) -> str:
    kind = config.get("model_type")
    if kind not in accepted:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_NAME}: model_type={kind!r}; a {what} tower is read from {', '.join(accepted)} checkpoints"
        )
    return kind


def text_config(directory: str | Path) -> TextConfig:
    """The TextConfig of the text tower in a BERT-family or CLIP directory."""
    config = read_config(directory)
    path = Path(directory) / CONFIG_NAME
    kind = _model_type(config, directory, bert.MODEL_TYPES + clip.MODEL_TYPES, "text")
    return bert.text_config(config, path) if kind in bert.MODEL_TYPES else clip.text_config(config, path)


# what the image processors of these checkpoints normalise with when preprocessor_config.json is absent
# (ViT's 0.5, 0.5 are mmt's own; CLIP's are its training set's statistics)
PIXEL_STATISTICS = {
    "vit": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
}


def pixel_statistics(directory: str | Path) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of the pixels the directory's image tower was trained on, from
    preprocessor_config.json (pixels rescaled by 1/255 first), else its kind's defaults."""
    kind = read_config(directory).get("model_type")
    path = Path(directory) / "preprocessor_config.json"
    if not path.is_file():
        return PIXEL_STATISTICS[kind]
    config = read_json(path)
    if not setting(config, "do_rescale", bool, path, True) or abs(setting(config, "rescale_factor", float, path, 1 / 255) - 1 / 255) > 1e-9:
        raise CheckpointError(f"{path}: mmt reads towers trained on pixels rescaled by 1/255 (do_rescale, rescale_factor)")
    if not setting(config, "do_normalize", bool, path, True):
        return [0.0] * 3, [1.0] * 3
    mean, std = config.get("image_mean", PIXEL_STATISTICS[kind][0]), config.get("image_std", PIXEL_STATISTICS[kind][1])
    for key, value in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise CheckpointError(f"{path}: {key} should be 3 numbers, got {value!r}")
    if min(std) <= 0:
        raise CheckpointError(f"{path}: image_std {std} has a value <= 0")
    return [float(v) for v in mean], [float(v) for v in std]


def vision_config(directory: str | Path, mmt_pixels: bool = False) -> VisionConfig:
    """The VisionConfig of the image tower in a ViT or CLIP directory.

    Args:
        mmt_pixels: the tower will read mmt's pixels (in [-1, 1]) rather than the image
            processor's: its patch stem then has a bias, into which the difference is folded
            (`load_vision_weights`).
    """
    config = read_config(directory)
    path = Path(directory) / CONFIG_NAME
    kind = _model_type(config, directory, vit.MODEL_TYPES + clip.MODEL_TYPES, "vision")
    cfg = vit.vision_config(config, path) if kind in vit.MODEL_TYPES else clip.vision_config(config, path)
    if mmt_pixels:
        cfg.patch_bias = True
    return cfg


def load_text_weights(tower: Any, directory: str | Path) -> None:
    """Copy a BERT-family or CLIP directory's text tower into `tower` (an mmt TextTower built
    from `text_config(directory)`), strictly."""
    kind = read_config(directory).get("model_type")
    tensors, path = read_weights(directory)
    if kind in bert.MODEL_TYPES:
        mapping: Mapping = bert.text_mapping(tower.cfg, bert.file_prefix(list(tensors)))
    else:
        mapping = clip.text_mapping(tower.cfg)
    load_mapped(tower, tensors, mapping, path)


def load_vision_weights(tower: Any, directory: str | Path, mmt_pixels: bool = False) -> None:
    """Copy a ViT or CLIP directory's image tower into `tower` (an mmt VisionTower built from
    `vision_config(directory, mmt_pixels)`), strictly. With `mmt_pixels`, the tower reads mmt's
    pixels as the original read its image processor's (`fold_pixel_normalisation`)."""
    kind = read_config(directory).get("model_type")
    tensors, path = read_weights(directory)
    if kind in vit.MODEL_TYPES:
        mapping: Mapping = vit.vision_mapping(tower.cfg, vit.file_prefix(list(tensors)))
    else:
        mapping = clip.vision_mapping(tower.cfg)
    if mmt_pixels:
        fold_pixel_normalisation(mapping, *pixel_statistics(directory))
    load_mapped(tower, tensors, mapping, path)


def load_tokenizer(directory: str | Path):
    """The directory's tokenizer as an mmt Tokenizer (BERT family: WordPiece). CLIP's byte-level
    BPE tokenizer has no [PAD]/[CLS]/[SEP]/[MASK] and is not read yet."""
    kind = read_config(directory).get("model_type")
    if kind not in bert.MODEL_TYPES:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_NAME}: model_type={kind!r}; mmt reads the tokenizers of BERT-family checkpoints only "
            "(CLIP's byte-level BPE has no [PAD], [CLS], [SEP], [MASK])"
        )
    return bert.tokenizer(directory)


def load_text_tower(directory: str | Path):
    """(TextTower, Tokenizer) of a BERT-family directory, in eval mode."""
    from mmt.text import TextTower

    tower = TextTower(text_config(directory))
    load_text_weights(tower, directory)
    return tower.eval(), load_tokenizer(directory)


def load_vision_tower(directory: str | Path, mmt_pixels: bool = False):
    """VisionTower of a ViT or CLIP directory, in eval mode; `mmt_pixels` as in `vision_config`."""
    from mmt.vision import VisionTower

    tower = VisionTower(vision_config(directory, mmt_pixels))
    load_vision_weights(tower, directory, mmt_pixels)
    return tower.eval()


def clip_config(directory: str | Path):
    """The RetrievalConfig of a CLIP directory: its towers, projection width and scale; the
    contrastive term only (CLIP has no matching head); pooling as CLIP pools."""
    from mmt.models.retrieval import LossWeights, RetrievalConfig

    config = read_config(directory)
    path = Path(directory) / CONFIG_NAME
    _model_type(config, directory, clip.MODEL_TYPES, "CLIP")
    return RetrievalConfig(
        vision=clip.vision_config(config, path), text=clip.text_config(config, path), embed_dim=clip.projection_dim(config, path),
        losses=LossWeights(itc=1.0, itm=0.0), text_pool="last", image_pool="first", projection_bias=False,
    )


def load_clip(directory: str | Path):
    """RetrievalModel of a CLIP directory (towers, projections, logit scale), in eval mode."""
    from mmt.models.retrieval import RetrievalModel

    cfg = clip_config(directory)
    model = RetrievalModel(cfg)
    tensors, path = read_weights(directory)
    load_mapped(model, tensors, clip.retrieval_mapping(cfg.vision, cfg.text), path)
    return model.eval()
