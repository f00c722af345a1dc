"""The key/value cache: what a decoder's self-attention keeps between decoding steps.

Decoding one token at a time, each layer's self-attention needs the keys and values of
every earlier position; they are computed once and kept. The cross-attention's keys and
values (of the image) are not part of the cache: they are projected once per decoding
(`Decoder.project_context`) and passed in.

One interface, two kinds:
- `GrowingCache`: each step's keys/values are appended, so the stored tensors hold exactly
  the positions so far. With a capacity it grows inside two preallocated buffers (no
  allocation per step, and the keys stay contiguous, which attention kernels read fastest).
- `StaticCache`: `capacity` slots per layer allocated once and written in place at a
  position held in a tensor; attention is masked to the filled slots. Nothing about it
  changes shape or address between steps, which is what a recorded CUDA graph needs.

A cache `c` of either kind is used as:
    c.layers[i].update(kv) -> (keys/values to attend over, the slots each new query may see or None)
    c.start                -> position of the next token (an int, or a tensor for StaticCache)
    c.advance(t)           -> after every layer has stored t new positions
    c.reorder(index)       -> keep/reorder rows (beam search)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class KV(NamedTuple):
    """Projected keys and values, (B, H, S, Dh) each."""

    k: Tensor
    v: Tensor

    def select(self, index: Tensor) -> "KV":
        """Rows `index` of both, in that order."""
        return KV(self.k.index_select(0, index), self.v.index_select(0, index))


class LayerCache(Protocol):
    def update(self, kv: KV) -> tuple[KV, Tensor | None]:
        """Store the new positions' keys/values (N, H, t, Dh); return every stored position's, and a
        bool mask (t, S) of the slots each new query may see (None: every stored position, under
        the causal rule)."""
        ...


class _TwoBuffers:
    """Keys or values (N, H, length, Dh) that grow along dim 2, always contiguous, without
    allocating per step: each change is written into the other of two preallocated buffers."""

    def __init__(self, rows: int, capacity: int, like: Tensor):
        N, H, _, Dh = like.shape
        self.rows, self.capacity = rows, capacity
        self.buffers = [like.new_empty(rows * H * capacity * Dh), like.new_empty(rows * H * capacity * Dh)]
        self.spare = 0  # the buffer the next change is written into
        self.now: Tensor | None = None

    def _into(self, shape: tuple[int, ...]) -> Tensor:
        if shape[0] > self.rows or shape[2] > self.capacity:
            raise ValueError(
                f"keys/values of {shape[0]} rows x {shape[2]} positions outgrow the cache "
                f"({self.rows} rows x {self.capacity} positions)"
            )
        out = self.buffers[self.spare][: math.prod(shape)].view(shape)
        self.spare = 1 - self.spare
        return out

    def append(self, new: Tensor) -> Tensor:
        if self.now is None:
            self.now = self._into(new.shape).copy_(new)
        else:
            N, H, length, Dh = self.now.shape
            self.now = torch.cat([self.now, new], dim=2, out=self._into((N, H, length + new.shape[2], Dh)))
        return self.now

    def reorder(self, index: Tensor) -> None:
        if self.now is not None:
            self.now = torch.index_select(self.now, 0, index, out=self._into((len(index), *self.now.shape[1:])))


class GrowingKV:
    """One layer's keys/values, appended step by step (see `GrowingCache`)."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.k: Tensor | _TwoBuffers | None = None
        self.v: Tensor | _TwoBuffers | None = None

    def update(self, kv: KV) -> tuple[KV, Tensor | None]:
        if self.k is None and self.capacity is not None and not (torch.is_grad_enabled() and kv.k.requires_grad):
            rows = kv.k.shape[0]  # (in place only where no gradient flows through the cache)
            self.k, self.v = _TwoBuffers(rows, self.capacity, kv.k), _TwoBuffers(rows, self.capacity, kv.v)
        if isinstance(self.k, _TwoBuffers):
            keys, values = self.k.append(kv.k), self.v.append(kv.v)
        else:
            keys = kv.k if self.k is None else torch.cat([self.k, kv.k], dim=2)
            values = kv.v if self.v is None else torch.cat([self.v, kv.v], dim=2)
            self.k, self.v = keys, values
        return KV(keys, values), None

    def reorder(self, index: Tensor) -> None:
        if isinstance(self.k, _TwoBuffers):
            self.k.reorder(index)
            self.v.reorder(index)
        elif self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class GrowingCache:
    """Keys/values of `depth` layers appended step by step; `capacity` (the most positions a
    decoding may reach, e.g. the position table's length) lets them grow in place where no
    gradient flows through them."""

    def __init__(self, depth: int, capacity: int | None = None):
        self.layers = [GrowingKV(capacity) for _ in range(depth)]
        self.length = 0  # positions stored

    @property
    def start(self) -> int:
        return self.length

    def advance(self, steps: int) -> None:
        self.length += steps

    def reorder(self, index: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index)


class SlotKV:
    """One layer's keys/values in `capacity` preallocated slots (see `StaticCache`)."""

    def __init__(self, owner: "StaticCache"):
        self.owner = owner
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, kv: KV) -> tuple[KV, Tensor | None]:
        owner = self.owner
        if self.k is None:  # first use: allocate (as ordinary tensors, refilled in or out of inference mode)
            N, H, _, Dh = kv.k.shape
            with torch.inference_mode(False):
                self.k = kv.k.new_zeros(N, H, owner.capacity, Dh)
                self.v = kv.v.new_zeros(N, H, owner.capacity, Dh)
        if kv.k.shape[2] != 1:
            raise ValueError(f"a static cache stores one position per step, got {kv.k.shape[2]}")
        self.k.index_copy_(2, owner.position, kv.k)
        self.v.index_copy_(2, owner.position, kv.v)
        return KV(self.k, self.v), owner.slots[None, :] <= owner.position[:, None]  # (1, capacity): slots up to the position

    def reorder(self, index: Tensor, filled: int) -> None:
        for buffer in (self.k, self.v):
            if buffer is not None:
                kept = buffer[:, :, :filled]
                kept.copy_(kept.index_select(0, index))


class StaticCache:
    """Keys/values of `depth` layers in `capacity` slots each, allocated on first use, written in
    place at `position` (a (1,) tensor, so that a recorded step reads it from memory); slots
    beyond it are never attended, so old values may stay in them."""

    def __init__(self, depth: int, capacity: int, device: torch.device | str):
        self.capacity = capacity
        with torch.inference_mode(False):
            self.position = torch.zeros(1, dtype=torch.long, device=device)
            self.slots = torch.arange(capacity, device=device)
        self.layers = [SlotKV(self) for _ in range(depth)]
        self.length = 0

    @property
    def start(self) -> Tensor:
        return self.position

    def advance(self, steps: int) -> None:
        """Called outside any recorded region: the new position is written from the host."""
        self.length += steps
        self.position.fill_(self.length)

    def reset(self) -> None:
        """Start a new decoding over the same buffers."""
        self.length = 0
        self.position.fill_(0)

    def reorder(self, index: Tensor) -> None:
        for layer in self.layers:
            layer.reorder(index, self.length)  # the filled slots only
