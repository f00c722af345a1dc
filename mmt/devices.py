"""Where a model runs and in which precision: one rule for training, evaluation and prediction.

    device     "auto" (a GPU when torch sees one, else the CPU), "cpu", "cuda", "cuda:1", "mps"
    precision  "auto": bf16 autocast where the hardware has bf16 units (GPUs since Ampere, CPUs
               with AVX512-BF16 or AMX), fp16 autocast on a GPU without them, fp32 elsewhere;
               or "bf16", "fp16", "fp32" as asked. Weights stay fp32 either way (autocast runs
               matrix products in the lower precision); training in fp16 scales the loss
               (`torch.amp.GradScaler`), as fp16 gradients underflow without it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs with bf16 and CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_device(spec: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device `spec` names; "auto" is this process's GPU (`local_rank` under torchrun) when
    torch sees one, else the CPU. A GPU that is asked for but absent is a ValueError."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is not one torch knows (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: torch sees no CUDA GPU here (torch {torch.__version__}); use device auto or cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA GPU(s) here")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {spec!r}: the MPS backend is not available here; use device auto or cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device` (None: fp32, no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if bf16_supported(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    return DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(device: torch.device, dtype: torch.dtype | None) -> str:
    """E.g. "cuda:0 (NVIDIA H100), bf16 autocast" or "cpu, fp32"."""
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return f"{where}, {({torch.bfloat16: 'bf16', torch.float16: 'fp16'})[dtype]} autocast" if dtype else f"{where}, fp32"
