"""Several processes through torch.distributed, launched by torchrun: the process group, and the
collectives training needs (sums for the log, RNG states for checkpoints, all-gathers for the
contrastive loss). A single process (WORLD_SIZE unset or 1) needs none of it, and every
function here then works without a process group.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclasses.dataclass
class Processes:
    """Where this process stands in a torchrun launch (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_group: bool = False  # this process initialised the process group (and ends it)
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL takes CUDA tensors only)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_finite(self, finite: bool) -> bool:
        """True when every process's step was finite (a collective under several processes)."""
        if self.world == 1:
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() == 0

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over every process (a collective under several processes)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def rng_states(self) -> list[dict[str, Tensor]]:
        """Every process's torch RNG states (CPU, and its GPU's), by rank (a collective)."""
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        if self.world == 1:
            return [state]
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return [{k: v.cpu() for k, v in s.items()} for s in states]


def start_processes(timeout: int, device: str = "auto") -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
    a single process when WORLD_SIZE is unset or 1. Each process runs on `device`
    (`mmt.devices.choose_device`: "auto" is the GPU of its local rank when there are GPUs):
    NCCL between GPUs, gloo between CPUs. Joining fails after `timeout` seconds instead of
    hanging."""
    from mmt.devices import choose_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    started = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if ":" in str(device):
        raise ValueError(f"train.device={device}: under torchrun each process takes the GPU of its local rank; use auto or cuda")
    target = choose_device(device, local_rank)
    if target.type == "cuda":  # before the group starts, so NCCL binds each process to its own GPU
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        started = True
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, started, target)


def _running() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own
    rows (every rank's loss uses every row). Equal row counts on every rank."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank (rank order), keeping the autograd graph; `x` itself
    when not running distributed. The backward sums each rank's gradient into its slice."""
    return _GatherWithGrad.apply(x) if _running() else x


def gather_plain(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank without gradient (ids, labels)."""
    return _all_gather(x) if _running() else x


def rank_offset(n_local: int) -> int:
    """Index of this rank's first row in the gathered batch (equal batch sizes per rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank() * n_local
