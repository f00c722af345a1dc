"""Autoregressive decoding shared by every model that writes tokens: greedy, beam search, sampling.

The search code drives a *step*: `step(ids)` takes the sequences so far (N, t) and returns the
logits of each one's next token (N, V); `step.reorder(index)` keeps and reorders rows (beam
search). A model makes its step with `decoder_step`: a `DecoderStep` that embeds the tokens it
has not seen yet, runs its decoder over them with a key/value cache and the context's
keys/values (projected once), and projects the last position to logits. Decoding starts from
[BOS] and stops per sequence at [EOS] or at the length limit; a finished sequence is padded
with [PAD] while the others continue, and the loop ends as soon as every sequence has finished.

Several sequences about one image (beams, or several returned samples) are laid out image by
image, rows g*i .. g*i+g-1 for image i, so cross-attention reads each image's keys/values once
without copying them (see `MultiHeadAttention`'s shared contexts).

Beam search follows the usual formulation (Wu et al. 2016, "Google's NMT system"): keep the
`num_beams` best partial hypotheses by summed log-probability; a hypothesis that emits [EOS]
joins the finished pool with score logp / length ** length_penalty; an image is done when its
pool is full and no running beam can beat the worst pooled hypothesis at any length it could
still reach (a true bound, so stopping early never changes the result; transformers' default
checks only the current length). Sampling draws from one generator for the whole batch: a
seed reproduces a batch, not one row independent of its neighbours.

What makes a step fast wraps it from outside and computes the same functions: on a CPU the
modules' own forward functions over their gathered parameters (`mmt.gathered`), on a GPU the
step recorded once as a CUDA graph over a static cache and replayed per token
(`mmt.cuda_graphs`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Protocol, Sequence

import torch
from torch import Tensor, nn

from mmt import cuda_graphs
from mmt.config import Amount, Count, Positive, Range, Settings, out_of_range
from mmt.gathered import gathered
from mmt.layers import attention
from mmt.layers.cache import KV


@dataclasses.dataclass
class GenerationConfig(Settings):
    """How to decode."""

    max_new_tokens: Count = 30  # tokens generated after [BOS], [EOS] included
    num_beams: Count = 1  # > 1: beam search
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    do_sample: bool = False  # sample instead of taking the most likely token
    temperature: Positive = 1.0  # sampling: logits / temperature
    top_k: Amount = 0  # sampling: keep the k most likely tokens (0: all)
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 1.0  # sampling: keep the smallest set with probability >= top_p (nucleus)
    num_return: Count = 1  # sequences returned per input (<= num_beams for beam search)
    seed: int | None = None  # sampling seed (None: torch's global generator)
    # classifier-free guidance (Ho & Salimans 2022): logits = uncond + scale * (cond - uncond), the
    # unconditional logits from the model's "no condition" input; 1: off (no unconditional rows)
    guidance_scale: Annotated[float, Range(0)] = 1.0
    use_cache: bool = True  # False recomputes the whole prefix each step (for tests)
    # on a GPU, replay the step recorded as a CUDA graph (the same computation, but attention over
    # masked slots of a static cache takes other kernels: a rounding-level near-tie could pick
    # another token)
    cuda_graph: bool = True
    gathered: bool = True  # on a CPU, call the modules' forward functions over their gathered parameters

    removed: ClassVar[dict[str, tuple[Any, bool, str]]] = {
        "lean_step": (True, True, "the CPU step is `gathered` now, the modules' own functions"),
    }

    def validate(self) -> None:
        """Each setting in its range (checked when made, and again here: a field may have been
        set since), and settings that agree with each other."""
        problem = out_of_range(self)
        if problem is not None:
            raise ValueError(problem)
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("choose beam search (num_beams > 1) or sampling (do_sample), not both")
        if self.num_beams > 1 and self.num_return > self.num_beams:
            raise ValueError(f"num_return={self.num_return} cannot exceed num_beams={self.num_beams}")
        if self.num_beams == 1 and not self.do_sample and self.num_return > 1:
            raise ValueError("greedy decoding returns one sequence; use beams or sampling for num_return > 1")

    def rows(self, batch_size: int) -> int:
        """Sequences decoded side by side for `batch_size` inputs (beams or returned samples per input)."""
        return batch_size * (self.num_beams if self.num_beams > 1 else self.num_return)


@dataclasses.dataclass
class Generated:
    """Decoded sequences: ids (B, R, L) starting with [BOS], padded with [PAD] after [EOS];
    scores (B, R): summed log-probabilities (beam search: length-penalised), best first."""

    ids: Tensor
    scores: Tensor


class Step(Protocol):
    def __call__(self, ids: Tensor) -> Tensor: ...

    def reorder(self, index: Tensor) -> None: ...


class GuidedStep:
    """Classifier-free guidance around a step that decodes 2N rows: rows 0..N-1 under their
    condition, rows N..2N-1 the same sequences without it. Returns the N guided rows' logits,
    uncond + scale * (cond - uncond); the search code sees N rows."""

    def __init__(self, step: Step, scale: float):
        self.step, self.scale, self.rows = step, scale, 0

    def __call__(self, ids: Tensor) -> Tensor:
        self.rows = ids.shape[0]
        cond, uncond = self.step(torch.cat([ids, ids])).float().chunk(2)
        return uncond + self.scale * (cond - uncond)

    def reorder(self, index: Tensor) -> None:
        self.step.reorder(torch.cat([index, index + self.rows]))


# ----------------------------------------------------------------------------- the step


class DecoderStep:
    """Embedding -> decoder (over a context and a key/value cache) -> output head, for the newest
    tokens of each row. `embed`, `decoder` and `head` are the model's modules, or callables that
    compute what they compute (`mmt.gathered`)."""

    def __init__(
        self, embed: nn.Module, decoder: nn.Module, head: nn.Module, context: Sequence[KV], context_padding: Tensor | None,
        cache=None,
    ):
        self.embed, self.decoder, self.head = embed, decoder, head
        self.context, self.context_padding, self.cache = list(context), context_padding, cache

    def logits(self, new: Tensor) -> Tensor:
        """Logits (N, V) of the token after `new` (N, t), the positions after those in the cache,
        whose keys/values the decoder stores (the caller advances the cache)."""
        start = 0 if self.cache is None else self.cache.start
        hidden = self.decoder(
            self.embed(new, start), self.context, context_padding_mask=self.context_padding, cache=self.cache
        )
        return self.head(hidden[:, -1])

    def __call__(self, ids: Tensor) -> Tensor:
        """Logits (N, V) of the token after `ids` (N, t), the sequences so far: only the tokens the
        cache has not seen are fed (without a cache, all of them)."""
        if self.cache is None:
            return self.logits(ids)
        new = ids[:, self.cache.length :]
        logits = self.logits(new)
        self.cache.advance(new.shape[1])
        return logits

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search); the context is shared by each image's rows and stays."""
        if self.cache is not None:
            self.cache.reorder(index)


def graphs_apply(cfg: GenerationConfig, context: Tensor, decoder: nn.Module) -> bool:
    """Whether decoding replays a CUDA graph: a cached decoding on a GPU, in eval mode, without
    autocast (its weight-cast cache does not mix with recording)."""
    return (
        cfg.cuda_graph and cfg.use_cache and cuda_graphs.can_record(context) and not decoder.training
        and not torch.is_autocast_enabled(context.device.type)
    )


def decoder_step(
    owner: nn.Module, embed: nn.Module, decoder: nn.Module, head: nn.Module, context: Tensor, context_padding: Tensor | None,
    cfg: GenerationConfig, rows: int,
) -> Step:
    """The step for decoding `rows` sequences over `context` (C, S, Dc) (rows / C per context):
    on a GPU a recorded step kept on `owner` per shape (see `graphs_apply`), on a CPU the
    modules' forward functions over their gathered parameters (`cfg.gathered`), else the
    modules themselves. The context's keys/values are projected once."""
    capacity = embed.positions.max_len
    projected = decoder.project_context(context)
    if rows and graphs_apply(cfg, context, decoder):
        padded = context_padding is not None
        kernel = attention.current_kernel()  # (a recording keeps the kernel it was made with)
        key = (rows, tuple(context.shape), context.dtype, str(context.device), padded, kernel, cuda_graphs.addresses(owner))
        graphs = cuda_graphs.kept_graphs(owner, "steps")
        step = graphs.get(key)
        if step is None:
            with torch.inference_mode(False):  # buffers the recording reads, refilled by later calls
                fixed = [KV(kv.k.clone(), kv.v.clone()) for kv in projected]
                padding = None if context_padding is None else context_padding.clone()
            cache = decoder.new_cache(capacity, static=True, device=context.device)
            step = cuda_graphs.GraphedStep(DecoderStep(embed, decoder, head, fixed, padding, cache))
        cuda_graphs.keep_recent(graphs, key, step, 4)
        return step.refill(projected, context_padding)
    cache = decoder.new_cache(capacity) if cfg.use_cache else None
    if cfg.gathered and context.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        embed, decoder, head = gathered(embed), gathered(decoder), gathered(head)
    return DecoderStep(embed, decoder, head, projected, context_padding, cache)


# ----------------------------------------------------------------------------- the search


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


@torch.no_grad()
def generate(
    step: Step, batch_size: int, cfg: GenerationConfig, *, bos_id: int, eos_id: int, pad_id: int,
    device: torch.device | str = "cpu",
) -> Generated:
    """Decode `batch_size` inputs with `step` (see the module docstring); its rows are
    `cfg.rows(batch_size)` sequences, each input's consecutive."""
    cfg.validate()
    if cfg.guidance_scale != 1.0 and not isinstance(step, GuidedStep):
        raise ValueError(f"guidance_scale={cfg.guidance_scale}: this model has no input without its condition; "
                         "classifier-free guidance applies to text-to-image models (1: off)")
    if batch_size == 0:  # nothing to decode (e.g. an evaluation batch without questions)
        R = cfg.num_return
        return Generated(torch.full((0, R, 1), bos_id, dtype=torch.long, device=device), torch.zeros(0, R, device=device))
    never = torch.tensor([pad_id, bos_id], device=device)
    if cfg.num_beams > 1:
        return _beam_search(step, batch_size, cfg, bos_id, eos_id, pad_id, never, torch.device(device))
    R = cfg.num_return
    N = batch_size * R
    ids = torch.full((N, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(N, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for _ in range(cfg.max_new_tokens):
        logp = _log_probs(step(ids), never)
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


def _beam_search(
    step: Step, B: int, cfg: GenerationConfig, bos_id: int, eos_id: int, pad_id: int, never: Tensor, device: torch.device
) -> Generated:
    K, L, alpha = cfg.num_beams, cfg.max_new_tokens + 1, cfg.length_penalty
    ids = torch.full((B * K, L), pad_id, dtype=torch.long, device=device)  # running hypotheses: [BOS], tokens, [PAD] beyond
    ids[:, 0] = bos_id
    # every beam starts as the same [BOS]; only the first may expand, so step 1 yields K distinct tokens
    scores = torch.full((B, K), float("-inf"), device=device)  # their summed log-probabilities
    scores[:, 0] = 0.0
    pool_ids = torch.full((B, K, L), pad_id, dtype=torch.long, device=device)  # finished hypotheses, best first
    pool_scores = torch.full((B, K), float("-inf"), device=device)  # their length-penalised scores (-inf: empty place)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # images whose result can no longer change
    offsets = (torch.arange(B, device=device) * K)[:, None]  # (B, 1) first row of each image
    rank = torch.arange(2 * K, device=device)[None, :]
    worst_length = float((L - 1) ** alpha)  # for alpha > 0, the length every running beam may still reach
    for t in range(1, L):  # t: tokens generated after this step
        logp = _log_probs(step(ids[:, :t]), never)
        V = logp.shape[-1]
        candidates = (scores[..., None] + logp.view(B, K, V)).view(B, K * V)
        top_scores, top_index = candidates.topk(2 * K, dim=-1)  # (B, 2K), best first
        source, token = top_index // V, top_index % V  # which beam, which token
        is_eos = token == eos_id
        length = torch.tensor(float(t), device=device)
        # hypotheses ending here join the pool (only those ranked within the beam, as usual); its K best stay
        finish = is_eos & (rank < K) & ~done[:, None] & (top_scores > float("-inf"))
        finished_ids = ids.view(B, K, L).gather(1, source[..., None].expand(-1, -1, L))  # (B, 2K, L)
        finished_ids[:, :, t] = token
        finished_scores = torch.where(finish, top_scores / length**alpha, torch.full_like(top_scores, float("-inf")))
        pool_scores, keep = torch.cat([pool_scores, finished_scores], dim=1).topk(K, dim=-1)
        pool_ids = torch.cat([pool_ids, finished_ids], dim=1).gather(1, keep[..., None].expand(-1, -1, L))
        # the K best continuations that did not end become the running beams
        order = torch.where(is_eos, rank + 2 * K, rank).argsort(dim=-1)[:, :K]  # non-[EOS] first, by score
        scores = top_scores.gather(1, order)
        rows = (offsets + source.gather(1, order)).view(-1)
        ids = ids.index_select(0, rows)
        ids[:, t] = token.gather(1, order).view(-1)
        step.reorder(rows)
        # an image is done once its pool is full and its best running beam cannot beat the pool's
        # worst: its log p only falls, so its best possible score is log p / (longest length) ** alpha
        # for alpha > 0 (a longer hypothesis is divided by more), log p / t ** alpha otherwise
        best_possible = scores[:, 0] / (worst_length if alpha > 0 else length**alpha)
        done |= (pool_scores[:, -1] > float("-inf")) & (best_possible <= pool_scores[:, -1])
        if done.all():
            break
    else:
        # the length limit: running beams of unfinished images compete with the pool as they are
        running = torch.where(done[:, None], torch.full_like(scores, float("-inf")), scores / (L - 1) ** alpha)
        pool_scores, keep = torch.cat([pool_scores, running], dim=1).topk(K, dim=-1)
        pool_ids = torch.cat([pool_ids, ids.view(B, K, L)], dim=1).gather(1, keep[..., None].expand(-1, -1, L))
    R = cfg.num_return
    out = pool_ids[:, :R]
    longest = int((out != pad_id).sum(-1).max())
    return Generated(out[..., :longest], pool_scores[:, :R])
