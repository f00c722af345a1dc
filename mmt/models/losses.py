"""Losses more than one task model uses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def next_token_loss(logits: Tensor, targets: Tensor, pad_id: int, label_smoothing: float = 0.0) -> Tensor:
    """The causal language-modelling loss (teacher forcing): mean cross-entropy of `logits`
    (B, T, V), the predictions for each next token, against `targets` (B, T), the sequence
    shifted by one ([PAD] targets ignored), with optional label smoothing (Szegedy et al. 2016).
    Computed in fp32 whatever the logits' precision."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_id, label_smoothing=label_smoothing
    )
