"""CUDA graphs: record a function once, replay it per call (decoding on a GPU).

On a GPU a small decoder's step is mostly kernel launches: a few hundred small kernels, each
costing microseconds of Python and driver time around little arithmetic. A CUDA graph
records the kernels of one call and replays them with one launch. A replay reads and writes
the same memory as the recording, so everything the recorded function touches must live at
a fixed address with a fixed shape: its inputs are copied into the graph's own tensors, the
decoder keeps its keys/values in a `StaticCache`, and outputs are read (or copied) before
the next replay overwrites them.

Nothing here computes anything of its own: `GraphedStep` records a `DecoderStep`'s
`logits`, and `replayed` records any function, from outside.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor, nn


def can_record(t: Tensor) -> bool:
    """Whether work on `t` can be recorded as a CUDA graph (tests stand in an eager one)."""
    return t.is_cuda


def _on_side_stream(fn: Callable[[], object]) -> object:
    """Run `fn` on a side stream and wait for it: the warm-up before recording (libraries set
    up per-stream state, such as workspaces, on first use)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def record(fn: Callable[[], object]) -> "torch.cuda.CUDAGraph":
    """`fn` recorded as a CUDA graph, after a warm-up run (nothing runs at recording); each
    `replay()` runs it again on the same memory, so `fn` leaves its results in tensors the
    caller holds."""
    _on_side_stream(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def keep_recent(store: dict, key: object, value: object, keep: int) -> None:
    """store[key] = value as the most recent entry, dropping the oldest beyond `keep`."""
    store.pop(key, None)
    store[key] = value
    while len(store) > keep:
        store.pop(next(iter(store)))


def addresses(module: nn.Module) -> tuple[int, ...]:
    """Where every weight and buffer of `module` lives. A recorded graph reads them at these
    addresses, so it stays valid exactly while they hold (moving or re-typing the model
    changes them; loading weights in place does not, and the graph then reads the new ones)."""
    return tuple(t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers()))


def forget_graphs(owner: nn.Module) -> None:
    """Drop the graphs and fixed buffers kept on `owner` (their GPU memory)."""
    owner.__dict__.pop("_graphs", None)


def kept_graphs(owner: nn.Module, kind: str) -> dict:
    """The graphs of one kind ("steps", "functions") kept on `owner`, by what they were recorded for."""
    return owner.__dict__.setdefault("_graphs", {}).setdefault(kind, {})


class DecodesWithGraphs(nn.Module):
    """Base of the models that keep recorded graphs: they are dropped when the model returns to
    training (they would only hold GPU memory) and when it moves or changes dtype (they would
    read the old weights)."""

    def train(self, mode: bool = True):
        if mode:
            forget_graphs(self)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        forget_graphs(self)
        return super()._apply(fn, *args, **kwargs)


def replayed(owner: nn.Module, fn: Callable[..., object], *inputs: Tensor, keep: int = 4) -> object:
    """`fn(*inputs)` replayed from a CUDA graph recorded once per input shape and kept on
    `owner` (the `keep` most recent shapes); the inputs are copied into the graph's own.

    The outputs live in the graph's memory: the next call of the same shape overwrites them,
    so the caller uses them (or copies them) before that. `fn` returns a tensor or a tuple of
    tensors and Nones. Off a GPU, `fn` just runs.
    """
    if not can_record(inputs[0]):
        return fn(*inputs)
    from mmt.layers.attention import current_kernel  # (a recording keeps the kernel it was made with)

    key = (fn.__name__, tuple((tuple(x.shape), x.dtype, str(x.device)) for x in inputs), current_kernel(), addresses(owner))
    graphs = kept_graphs(owner, "functions")
    entry = graphs.get(key)
    if entry is None:
        with torch.inference_mode(False):  # ordinary tensors: refilled in and out of inference mode
            fixed = [x.clone() for x in inputs]
        outputs: list = []
        tupled: list[bool] = []

        def run() -> None:
            results = fn(*fixed)
            if not tupled:  # the warm-up run: allocate where the replays write
                tupled.append(isinstance(results, tuple))
                with torch.inference_mode(False):
                    outputs.extend(None if r is None else r.clone() for r in (results if tupled[0] else (results,)))
            for mine, new in zip(outputs, results if tupled[0] else (results,)):
                if mine is not None:
                    mine.copy_(new)

        entry = (record(run), fixed, outputs, tupled)
    keep_recent(graphs, key, entry, keep)
    graph, fixed, outputs, tupled = entry
    for mine, x in zip(fixed, inputs):
        mine.copy_(x)
    graph.replay()
    return tuple(outputs) if tupled[0] else outputs[0]


class GraphedStep:
    """A `DecoderStep` over a `StaticCache`, its `logits` recorded once and replayed per token.

    Kept on the model per shape of decoding (`graphed_step`), so that a shape is recorded
    once: each decoding refills the context's keys/values in place (`refill`), where the
    recording reads them.
    """

    def __init__(self, step):
        self.step = step
        self.graph = None
        self.ids: Tensor | None = None  # (rows, 1): the newest token, where the recording reads it
        self.logits: Tensor | None = None

    def refill(self, context: list, context_padding: Tensor | None) -> "GraphedStep":
        """Begin a decoding over new context keys/values of the recorded shapes."""
        for mine, new in zip(self.step.context, context):
            mine.k.copy_(new.k)
            mine.v.copy_(new.v)
        if context_padding is not None:
            self.step.context_padding.copy_(context_padding)
        self.step.cache.reset()
        return self

    @property
    def cache(self):
        return self.step.cache

    def reorder(self, index: Tensor) -> None:
        self.step.reorder(index)

    def __call__(self, ids: Tensor) -> Tensor:
        cache = self.step.cache
        new = ids[:, cache.length :]
        if new.shape[1] != 1:
            raise ValueError(f"a recorded step takes one new token per row, got {new.shape[1]}")
        if cache.length >= cache.capacity:
            raise ValueError(f"all {cache.capacity} positions of the decoder are used")
        if self.graph is None:
            with torch.inference_mode(False):
                self.ids = new.clone()
            out: list[Tensor] = []

            def run() -> None:
                logits = self.step.logits(self.ids)
                if not out:  # the warm-up run: allocate where the replays write
                    with torch.inference_mode(False):
                        out.append(logits.clone())
                out[0].copy_(logits)

            self.graph = record(run)
            self.logits = out[0]
        self.ids.copy_(new)
        self.graph.replay()
        cache.advance(1)
        return self.logits.clone()  # the graph overwrites its output at the next replay
