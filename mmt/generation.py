"""Autoregressive decoding shared by every text-generating model: greedy, beam search, sampling.

A model hands `generate` a step function: given the newest token ids (N, t) and the
decoder's key/value cache, return the logits of the next token (N, V) and the updated
cache. Decoding starts from [BOS] and stops per sequence at [EOS] or at the length limit;
a finished sequence is padded with [PAD] while the others continue, and the loop ends
as soon as every sequence has finished.

Several sequences about one image (beams, or several returned samples) are laid out
image by image, rows g*i .. g*i+g-1 for image i, so cross-attention reads each image's
keys/values once without copying them (see `MultiHeadAttention`'s grouped queries).

Beam search follows the usual formulation (Wu et al. 2016, "Google's NMT system"): keep
the `num_beams` best partial hypotheses by summed log-probability; a hypothesis that
emits [EOS] joins the finished pool with score logp / length ** length_penalty; an image
is done when its pool is full and no running beam can beat the worst pooled hypothesis at
any length it could still reach (a true bound, so stopping early never changes the result;
transformers' default checks only the current length). Sampling draws from one generator
for the whole batch: a seed reproduces a batch, not one row independent of its neighbours.

On a GPU a small decoder's step is mostly kernel launches: a few hundred small kernels,
each costing microseconds of Python and driver time, around little arithmetic. `SlotStep`
keeps every tensor a step touches at a fixed address and shape (a preallocated cache of
slots, the newest ids, the position as a tensor), records the step once as a CUDA graph and
replays it for each token (`GenerationConfig.cuda_graph`, on by default). The step is the
same code as the eager one (the decoder layers with a `SlotKV` cache), only launched once.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch
from torch import Tensor, nn

from mmt.layers.attention import KV, SlotKV
from mmt.layers.transformer import Decoder, DecoderCache
from mmt.lean_step import LeanStep, lean_applies
from mmt.text import TokenEmbedding

StepFn = Callable[[Tensor, "DecoderCache | None"], "tuple[Tensor, DecoderCache | None]"]


@dataclasses.dataclass
class GenerationConfig:
    """How to decode."""

    max_new_tokens: int = 30  # tokens generated after [BOS], [EOS] included
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    do_sample: bool = False  # sample instead of taking the most likely token
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int = 0  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: keep the smallest set with probability >= top_p (nucleus)
    num_return: int = 1  # sequences returned per input (<= num_beams for beam search)
    seed: int | None = None  # sampling seed (None: torch's global generator)
    use_cache: bool = True  # False recomputes the whole prefix each step (for tests)
    cuda_graph: bool = True  # on a GPU, replay recorded CUDA graphs (the same computation, but attention
    # over masked slots takes other kernels: a rounding-level near-tie could pick another token)
    lean_step: bool = True  # on a CPU, decode through `LeanStep` (the decoder's arithmetic as tensor operations,
    # without module calls: the same operations on the same weights, but for a large head's product taken as
    # W x^T, which sums in another order: a rounding-level near-tie could pick another token)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1 or self.num_return < 1:
            raise ValueError("num_beams and num_return must be >= 1")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("choose beam search (num_beams > 1) or sampling (do_sample), not both")
        if self.num_beams > 1 and self.num_return > self.num_beams:
            raise ValueError(f"num_return={self.num_return} cannot exceed num_beams={self.num_beams}")
        if self.num_beams == 1 and not self.do_sample and self.num_return > 1:
            raise ValueError("greedy decoding returns one sequence; use beams or sampling for num_return > 1")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1 and top_k >= 0")


    def rows(self, batch_size: int) -> int:
        """Sequences decoded side by side for `batch_size` inputs (beams or returned samples per input)."""
        return batch_size * (self.num_beams if self.num_beams > 1 else self.num_return)


@dataclasses.dataclass
class Generated:
    """Decoded sequences: ids (B, R, L) starting with [BOS], padded with [PAD] after [EOS];
    scores (B, R): summed log-probabilities (beam search: length-penalised), best first."""

    ids: Tensor
    scores: Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (Holtzman et al. 2020) to -inf. logits: (N, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass of the tokens ranked above each
        drop_sorted = before >= top_p  # the most likely token always stays (before = 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _log_probs(logits: Tensor, never: Tensor) -> Tensor:
    """Next-token log-probabilities (N, V) in float32; tokens in `never` ([PAD], [BOS]) are
    never generated. Overwrites `logits` where they are float32 already."""
    logits = logits.float()
    logits.index_fill_(1, never, float("-inf"))  # (indexed assignment would copy the value from the host)
    return logits.log_softmax(-1)


def _step(
    step: StepFn, ids: Tensor, cache: DecoderCache | None, use_cache: bool, never: Tensor
) -> tuple[Tensor, DecoderCache | None]:
    """Next-token log-probabilities (N, V), feeding only the newest token when cached."""
    logits, cache = step(ids[:, -1:] if use_cache and cache.length else ids, cache if use_cache else None)
    return _log_probs(logits, never), cache


def _never(pad_id: int, bos_id: int, device) -> Tensor:
    """Ids of the tokens never generated."""
    return torch.tensor([pad_id, bos_id], device=device)


class SlotStep:
    """A decoder step over preallocated buffers, replayed as a CUDA graph on a GPU.

    Everything the step reads or writes has a fixed address and shape: the newest ids
    (rows, 1), the position (1,), per layer a self-attention cache of `capacity` slots
    (`SlotKV`) and the context's keys/values. So on a GPU the step is recorded once as a
    CUDA graph and each token replays it (one launch instead of hundreds); with graph=False
    the same step runs eagerly. The decoder, embedding and head are the model's own modules:
    the recorded step computes exactly what they compute.

    A SlotStep is both the step function and the cache that `generate` hands back to it:
    `length` counts the positions fed so far and `select` reorders beams in place. Start each
    decoding with `reset(context, context_padding)`.
    """

    def __init__(self, embed: TokenEmbedding, decoder: Decoder, head: nn.Module, rows: int, capacity: int, graph: bool):
        self.embed, self.decoder, self.head = embed, decoder, head
        self.rows, self.capacity, self.graph = rows, capacity, graph
        self.length = 0
        self._cross: list[KV] | None = None
        self._recorded: torch.cuda.CUDAGraph | None = None
        self.beam_graphs: dict = {}  # beam search's own recorded steps over these buffers, by search shape

    def keep_beam_graph(self, key: tuple, entry: tuple) -> None:
        """Keep a beam search's recorded step (the 4 most recent search shapes)."""
        _keep_recent(self.beam_graphs, key, entry, 4)

    def reset(self, context: Tensor, context_padding: Tensor | None) -> "SlotStep":
        """Begin decoding `rows` sequences over `context` (C, S, Dc), rows / C per context.
        Every reset must give a context of the first one's shape, padded or not alike."""
        cross = [layer.cross_attn.project_kv(context) for layer in self.decoder.layers]
        if self._cross is None:  # first use: allocate every buffer (as ordinary tensors, which
            with torch.inference_mode(False):  # later calls in or out of inference mode may refill)
                attn = self.decoder.layers[0].self_attn
                shape, like = (self.rows, attn.heads, self.capacity, attn.head_dim), cross[0].k
                self._context_shape = (tuple(context.shape), context_padding is not None)
                self._cross = [KV(kv.k.clone(), kv.v.clone()) for kv in cross]
                self._padding = None if context_padding is None else context_padding.clone()
                self._self_kv = [KV(like.new_zeros(shape), like.new_zeros(shape)) for _ in self.decoder.layers]
                self._ids = torch.zeros(self.rows, 1, dtype=torch.long, device=context.device)
                self._position = torch.zeros(1, dtype=torch.long, device=context.device)
                self._slots = torch.arange(self.capacity, device=context.device)
        else:  # same shapes (the caller's key): refill in place, where a recorded graph reads them
            given = (tuple(context.shape), context_padding is not None)
            if given != self._context_shape:
                raise ValueError(
                    f"this SlotStep decodes over contexts of shape {self._context_shape[0]} "
                    f"({'with' if self._context_shape[1] else 'without'} padding), got {given[0]} "
                    f"({'with' if given[1] else 'without'} padding)"
                )
            for mine, new in zip(self._cross, cross):
                mine.k.copy_(new.k)
                mine.v.copy_(new.v)
            if context_padding is not None:
                self._padding.copy_(context_padding)
        self.length = 0  # slots beyond the position are never attended, so old values may stay
        return self

    def _forward(self) -> Tensor:
        """Logits (rows, V) of the token after `_ids` at `_position`, writing its keys/values."""
        allowed = self._slots[None, :] <= self._position[:, None]  # (1, capacity): slots up to the position
        cache = DecoderCache([SlotKV(kv.k, kv.v, self._position, allowed) for kv in self._self_kv], self._cross)
        x = self.embed.embed_at(self._ids, self._position)
        hidden, _ = self.decoder(x, None, context_padding_mask=self._padding, cache=cache)
        return self.head(hidden[:, -1])

    def run_at(self, ids: Tensor, position: Tensor) -> Tensor:
        """Logits (rows, V) after `ids` (rows, 1) at `position` (1,), in tensor operations only,
        for a caller that records a larger step around it (beam search). `length` is not kept."""
        self._ids.copy_(ids)
        self._position.copy_(position)
        return self._forward()

    def reorder(self, index: Tensor, slots: int | None = None) -> None:
        """Reorder rows in place over the first `slots` slots (all: a fixed shape, for a
        caller that records it)."""
        for kv in self._self_kv:
            for buffer in kv:
                kept = buffer[:, :, :slots]
                kept.copy_(kept.index_select(0, index))

    def __call__(self, ids: Tensor, cache: "SlotStep") -> tuple[Tensor, "SlotStep"]:
        if cache is not self:
            raise ValueError("a SlotStep is its own cache: pass it to generate as cache=")
        if self._cross is None:
            raise ValueError("SlotStep.reset(context, padding) must come before the first step")
        if tuple(ids.shape) != (self.rows, 1):
            raise ValueError(f"a SlotStep takes one new token for each of {self.rows} rows, got ids of shape {tuple(ids.shape)}")
        if self.length >= self.capacity:
            raise ValueError(f"all {self.capacity} positions of the decoder are used")
        self._ids.copy_(ids)
        self._position.fill_(self.length)
        if self.graph and self._recorded is None:
            # the warm-up writes this position's keys/values, which the replay rewrites identically;
            # its logits give the shape of the buffer each replay writes into
            warm = _on_side_stream(self._forward)
            with torch.inference_mode(False):
                self._logits = warm.clone()
            self._recorded = _record(lambda: self._logits.copy_(self._forward()))
        if self._recorded is not None:
            self._recorded.replay()
            logits = self._logits.clone()  # the graph overwrites its output at the next replay
        else:
            logits = self._forward()
        self.length += 1
        return logits, self

    def select(self, index: Tensor, cross: bool = True) -> "SlotStep":
        """Reorder rows (beam search) in place; the context keys/values are per context and
        shared by its rows, so `cross` must be False."""
        if cross:
            raise ValueError("a SlotStep's context keys/values are shared by each context's rows and are never reordered")
        self.reorder(index, self.length)  # the filled slots only
        return self


def _on_side_stream(fn: Callable[[], object]) -> object:
    """Run `fn` on a side stream and wait for it: the warm-up before recording a CUDA graph
    (libraries set up per-stream state, such as workspaces, on first use)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _record(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """Record `fn` as a CUDA graph (nothing runs yet); each `replay()` runs it again on the
    same memory, so `fn` leaves its results in tensors the caller holds."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _can_record(t: Tensor) -> bool:
    """Whether work on `t` can be recorded as a CUDA graph (tests stand in an eager one)."""
    return t.is_cuda


def forget_graphs(owner: nn.Module) -> None:
    """Drop the graphs and fixed buffers kept on `owner` for decoding (their GPU memory)."""
    for name in ("_slot_steps", "_replayed"):
        owner.__dict__.pop(name, None)


class DecodesWithGraphs(nn.Module):
    """Base of the models that keep recorded decoding graphs (`slot_step`, `replayed`): they
    are dropped when the model returns to training (they would only hold GPU memory) and
    when it moves or changes dtype (they would read the old weights)."""

    def train(self, mode: bool = True):
        if mode:
            forget_graphs(self)
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        forget_graphs(self)
        return super()._apply(fn, *args, **kwargs)


def _keep_recent(store: dict, key: object, value: object, keep: int) -> None:
    """store[key] = value as the most recent entry, dropping the oldest beyond `keep`."""
    store.pop(key, None)
    store[key] = value
    while len(store) > keep:
        store.pop(next(iter(store)))


def _addresses(module: nn.Module) -> tuple[int, ...]:
    """Where every weight and buffer of `module` lives. A recorded graph reads them at these
    addresses, so it stays valid exactly while they hold (moving or re-typing the model
    changes them; loading weights in place does not, and the graph then reads the new ones)."""
    return tuple(t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers()))


def replayed(owner: nn.Module, fn: Callable[..., object], *inputs: Tensor, keep: int = 4) -> object:
    """`fn(*inputs)` replayed from a CUDA graph recorded once per input shape and kept on
    `owner` (the `keep` most recent shapes); the inputs are copied into the graph's own.

    The outputs live in the graph's memory: the next call of the same shape overwrites
    them, so the caller uses them (or copies them) before that. `fn` returns a tensor or a
    tuple of tensors and Nones. Off a GPU, `fn` just runs.
    """
    if not _can_record(inputs[0]):
        return fn(*inputs)
    key = (fn.__name__, tuple((tuple(x.shape), x.dtype, str(x.device)) for x in inputs), _addresses(owner))
    graphs = owner.__dict__.setdefault("_replayed", {})
    entry = graphs.get(key)
    if entry is None:
        with torch.inference_mode(False):  # ordinary tensors: refilled in and out of inference mode
            fixed = [x.clone() for x in inputs]
        warm = _on_side_stream(lambda: fn(*fixed))
        with torch.inference_mode(False):
            out = tuple(None if o is None else o.clone() for o in _as_tuple(warm))

        def run() -> None:
            for mine, new in zip(out, _as_tuple(fn(*fixed))):
                if mine is not None:
                    mine.copy_(new)

        entry = (_record(run), fixed, out if isinstance(warm, tuple) else out[0])
    _keep_recent(graphs, key, entry, keep)
    graph, fixed, out = entry
    for mine, x in zip(fixed, inputs):
        mine.copy_(x)
    graph.replay()
    return out


def _as_tuple(out: object) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def slot_step(
    owner: nn.Module, embed: TokenEmbedding, decoder: Decoder, head: nn.Module, context: Tensor,
    context_padding: Tensor | None, rows: int, graph: bool = True, keep: int = 4,
) -> SlotStep:
    """`owner`'s SlotStep for this shape of decoding, reset to `context`; kept on `owner` (the
    `keep` most recent shapes) so that a graph is recorded once, not per call. Graphs are
    recorded only for a context on a GPU; elsewhere the step runs eagerly."""
    graph = graph and _can_record(context)
    key = (rows, tuple(context.shape), context.dtype, str(context.device), context_padding is not None, graph, _addresses(owner))
    steps = owner.__dict__.setdefault("_slot_steps", {})
    step = steps.get(key) or SlotStep(embed, decoder, head, rows, embed.positions.max_len, graph)
    _keep_recent(steps, key, step, keep)
    return step.reset(context, context_padding)


def graphs_apply(cfg: GenerationConfig, device: torch.device, decoder: nn.Module) -> bool:
    """Whether decoding replays a CUDA graph: a cached decoding on a GPU, in eval mode, without
    autocast (its weight-cast cache does not mix with recording)."""
    return (
        cfg.cuda_graph and cfg.use_cache and device.type == "cuda" and not decoder.training
        and not torch.is_autocast_enabled(device.type)
    )


def own_step(
    owner: nn.Module, embed: TokenEmbedding, decoder: Decoder, head: nn.Module, context: Tensor, context_padding: Tensor | None,
    cfg: GenerationConfig, rows: int, graphs: bool,
) -> "SlotStep | LeanStep | None":
    """The fastest step here that is its own cache: a SlotStep replayed as a CUDA graph where
    `graphs` apply (see `graphs_apply`), a LeanStep for a cached decoding on a CPU without
    autocast where it computes what the modules do (`lean_applies`); None where neither
    applies (`generate` then drives the model's step over a `DecoderCache`)."""
    if not rows:
        return None
    if graphs:
        return slot_step(owner, embed, decoder, head, context, context_padding, rows)
    if (
        cfg.lean_step and cfg.use_cache and context.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        and lean_applies(embed, decoder, head)
    ):
        return LeanStep(embed, decoder, head, context, context_padding, rows)
    return None


@torch.no_grad()
def generate(
    step: StepFn, batch_size: int, num_layers: int, cfg: GenerationConfig, *, bos_id: int, eos_id: int, pad_id: int,
    device: torch.device | str = "cpu", cache=None,
) -> Generated:
    """Decode `batch_size` inputs with `step` (see the module docstring). `cache`: the cache
    the first step receives (default an empty `DecoderCache`; a `SlotStep` passes itself)."""
    cfg.validate()
    if batch_size == 0:  # nothing to decode (e.g. an evaluation batch without questions)
        R = cfg.num_return
        return Generated(torch.full((0, R, 1), bos_id, dtype=torch.long, device=device), torch.zeros(0, R, device=device))
    if cfg.num_beams > 1:
        return _beam_search(step, batch_size, num_layers, cfg, bos_id, eos_id, pad_id, torch.device(device), cache)
    R = cfg.num_return
    N = batch_size * R
    never = _never(pad_id, bos_id, device)
    ids = torch.full((N, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(N, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    cache = cache if cache is not None else DecoderCache.empty(num_layers)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for _ in range(cfg.max_new_tokens):
        logp, cache = _step(step, ids, cache, cfg.use_cache, never)
        if cfg.do_sample:
            filtered = filter_logits(logp / cfg.temperature, cfg.top_k, cfg.top_p)
            next_id = torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]
        else:
            next_id = logp.argmax(-1)
        token_logp = logp.gather(1, next_id[:, None])[:, 0]
        scores += torch.where(done, torch.zeros_like(token_logp), token_logp)
        next_id = torch.where(done, torch.full_like(next_id, pad_id), next_id)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        done |= next_id == eos_id
        if done.all():
            break
    return Generated(ids.view(batch_size, R, -1), scores.view(batch_size, R))


@dataclasses.dataclass
class _Beams:
    """Everything beam search updates, in place and at fixed shapes (so that on a GPU one step
    of it can be recorded as a CUDA graph and replayed)."""

    ids: Tensor  # (B * K, L) running hypotheses: [BOS], tokens so far, [PAD] beyond
    scores: Tensor  # (B, K) their summed log-probabilities
    pool_ids: Tensor  # (B, K, L) finished hypotheses, best first
    pool_scores: Tensor  # (B, K) their length-penalised scores (-inf: empty place)
    done: Tensor  # (B,) images whose result can no longer change
    t: Tensor  # () tokens generated after the coming step (1 at the start)


def _beam_search(
    step: StepFn, B: int, num_layers: int, cfg: GenerationConfig, bos_id: int, eos_id: int, pad_id: int, device: torch.device,
    cache=None,
) -> Generated:
    K, L, alpha = cfg.num_beams, cfg.max_new_tokens + 1, cfg.length_penalty
    never = _never(pad_id, bos_id, device)
    cache = cache if cache is not None else DecoderCache.empty(num_layers)
    slots = cache if isinstance(cache, SlotStep) and cfg.use_cache else None
    graphed = slots is not None and slots.graph
    key = (B, K, L, alpha, bos_id, eos_id, pad_id)
    # a search of this shape recorded before replays its graph over the same state tensors
    s, recorded, constants = slots.beam_graphs[key] if graphed and key in slots.beam_graphs else (None, None, None)
    if s is None:
        with torch.inference_mode(False):  # kept state is refilled by later calls, in or out of inference mode
            s = _Beams(
                torch.empty(B * K, L, dtype=torch.long, device=device), torch.empty(B, K, device=device),
                torch.empty(B, K, L, dtype=torch.long, device=device), torch.empty(B, K, device=device),
                torch.empty(B, dtype=torch.bool, device=device), torch.empty((), dtype=torch.long, device=device),
            )
        offsets = (torch.arange(B, device=device) * K)[:, None]  # (B, 1) first row of each image
        rank = torch.arange(2 * K, device=device)[None, :]
    else:
        offsets, rank, never = constants
    s.ids.fill_(pad_id)
    s.ids[:, 0] = bos_id
    # every beam starts as the same [BOS]; only the first may expand, so step 1 yields K distinct tokens
    s.scores.fill_(float("-inf"))
    s.scores[:, 0] = 0.0
    s.pool_ids.fill_(pad_id)
    s.pool_scores.fill_(float("-inf"))
    s.done.zero_()
    s.t.fill_(1)
    worst_length = float((L - 1) ** alpha)  # for alpha > 0, the length every running beam may still reach

    def advance(t: int) -> None:
        """One token for every beam. `t` (a Python int) is read only by the eager paths; the
        slot path uses `s.t`, so that a recording of it stays right at every later step."""
        nonlocal cache
        if slots is not None:
            logits = slots.run_at(s.ids.index_select(1, s.t - 1), (s.t - 1).view(1))
        else:
            logits, cache = step(s.ids[:, t - 1 : t] if cfg.use_cache else s.ids[:, :t], cache if cfg.use_cache else None)
        logp = _log_probs(logits, never)
        V = logp.shape[-1]
        candidates = (s.scores[..., None] + logp.view(B, K, V)).view(B, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=-1)  # (B, 2K), best first
        source, token = top_index // V, top_index % V  # which beam, which token
        is_eos = token == eos_id
        length = s.t.float()
        # hypotheses ending here join the pool (only those ranked within the beam, as usual); its
        # K best stay. Merging every step, even when none ended, avoids asking the device.
        finish = is_eos & (rank < K) & ~s.done[:, None] & (top_scores > float("-inf"))
        finished_ids = s.ids.view(B, K, L).gather(1, source[..., None].expand(-1, -1, L))  # (B, 2K, L)
        finished_ids.index_copy_(2, s.t.view(1), token[..., None])
        finished_scores = torch.where(finish, top_scores / length**alpha, torch.full_like(top_scores, float("-inf")))
        pool_scores, keep = torch.cat([s.pool_scores, finished_scores], dim=1).topk(K, dim=-1)
        s.pool_ids.copy_(torch.cat([s.pool_ids, finished_ids], dim=1).gather(1, keep[..., None].expand(-1, -1, L)))
        s.pool_scores.copy_(pool_scores)
        # the K best continuations that did not end become the running beams
        order = torch.where(is_eos, rank + 2 * K, rank).argsort(dim=-1)[:, :K]  # non-[EOS] first, by score
        s.scores.copy_(top_scores.gather(1, order))
        rows = (offsets + source.gather(1, order)).view(-1)
        running = s.ids.index_select(0, rows)
        running.index_copy_(1, s.t.view(1), token.gather(1, order).view(-1, 1))
        s.ids.copy_(running)
        if slots is not None:
            slots.reorder(rows)
        elif cfg.use_cache:
            cache = cache.select(rows, cross=False)
        # an image is done once its pool is full and its best running beam cannot beat the pool's
        # worst: its log p only falls, so its best possible score is log p / (longest length) ** alpha
        # for alpha > 0 (a longer hypothesis is divided by more), log p / t ** alpha otherwise
        best_possible = s.scores[:, 0] / (worst_length if alpha > 0 else length**alpha)
        s.done |= (s.pool_scores[:, -1] > float("-inf")) & (best_possible <= s.pool_scores[:, -1])
        s.t += 1

    for t in range(1, L):  # t: tokens generated after this step
        if recorded is not None:
            recorded.replay()
        elif graphed and t == 1:  # the first step is the warm-up before recording
            _on_side_stream(lambda: advance(t))
        elif graphed:  # record the whole step (model, search, cache reordering) once; replay it after
            recorded = _record(lambda: advance(t))
            slots.keep_beam_graph(key, (s, recorded, (offsets, rank, never)))  # (the graph reads those tensors)
            recorded.replay()
        else:
            advance(t)
        # whether every image is done is a question to the device: on a GPU ask every 4th step
        # (later steps of done images change nothing that is returned)
        if (not graphed or t % 4 == 0) and s.done.all():
            break
    else:
        # the length limit: running beams of unfinished images compete with the pool as they are
        running = torch.where(s.done[:, None], torch.full_like(s.scores, float("-inf")), s.scores / (L - 1) ** alpha)
        pool_scores, keep = torch.cat([s.pool_scores, running], dim=1).topk(K, dim=-1)
        s.pool_ids.copy_(torch.cat([s.pool_ids, s.ids.view(B, K, L)], dim=1).gather(1, keep[..., None].expand(-1, -1, L)))
        s.pool_scores.copy_(pool_scores)
    R = cfg.num_return
    ids = s.pool_ids[:, :R]
    longest = int((ids != pad_id).sum(-1).max())
    # copies: a recorded search keeps its state and refills it at the next call
    return Generated(ids[..., :longest].clone(), s.pool_scores[:, :R].clone())
