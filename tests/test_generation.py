"""Decoding: cached == uncached, beam width 1 == greedy, exact beam search on a toy
distribution, per-sequence stop at [EOS], reproducible sampling, top-k / top-p filters;
the recorded step (a static cache, replayed as a CUDA graph on GPUs) == the growing cache."""

import itertools

import pytest
import torch

import mmt.cuda_graphs
import mmt.generation
from mmt import registry
from mmt.cuda_graphs import forget_graphs
from mmt.generation import GenerationConfig, _beam_search, filter_logits, generate

PAD, BOS, EOS = 0, 5, 6


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    cfg = registry.preset("caption-tiny")
    cfg.vocab_size = 12  # a small vocabulary makes [EOS] likely enough to end some captions early
    model = registry.build(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked random model: decoding choices are not near-ties
    pixels = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
    return model, pixels


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "decoder modules"])
@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return": 2}, {"num_beams": 4, "length_penalty": 0.6}])
def test_cached_decoding_equals_recomputing_the_prefix(captioner, options, gathered, monkeypatch):
    model, pixels = captioner
    built = []
    gather = mmt.generation.gathered
    monkeypatch.setattr(mmt.generation, "gathered", lambda module: built.append(module) or gather(module))
    cached = model.generate(pixels, max_new_tokens=10, gathered=gathered, **options)
    assert len(built) == 3 * gathered  # embedding, decoder, head: gathered exactly when asked
    full = model.generate(pixels, max_new_tokens=10, use_cache=False, **options)
    assert torch.equal(cached.ids, full.ids)
    assert torch.allclose(cached.scores, full.scores, atol=1e-4)


def test_greedy_token_is_the_argmax_of_a_full_forward_pass_and_rows_stop_at_eos(captioner):
    model, pixels = captioner
    ids = model.generate(pixels, max_new_tokens=10).ids[:, 0]
    tokens, mask = model.encode_images(pixels)
    with torch.no_grad():
        for t in range(1, ids.shape[1]):
            live = (ids[:, :t] == EOS).sum(1) == 0
            logits = model.next_token_logits(ids[:, :t], tokens, mask)[:, -1]
            logits[:, [PAD, BOS]] = float("-inf")
            assert torch.equal(logits[live].argmax(-1), ids[live, t])
            assert (ids[~live, t] == PAD).all()  # finished captions are padded while others go on


def test_each_sequence_stops_at_its_own_eos_and_decoding_ends_when_all_have():
    calls = []

    def step(ids):  # row r says token 7 until it has generated r + 1 tokens, then [EOS]
        calls.append(ids.shape)
        generated = ids.shape[1] - 1
        logits = torch.zeros(ids.shape[0], 9)
        for r in range(ids.shape[0]):
            logits[r, EOS if generated >= r + 1 else 7] = 5.0
        return logits

    out = generate(step, 3, GenerationConfig(max_new_tokens=20), bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out.ids[:, 0].tolist() == [
        [BOS, 7, EOS, PAD, PAD],
        [BOS, 7, 7, EOS, PAD],
        [BOS, 7, 7, 7, EOS],
    ]
    assert len(calls) == 4  # stopped once the last row ended, not at max_new_tokens


def test_beam_search_of_width_one_is_greedy(captioner):
    model, pixels = captioner
    greedy = model.generate(pixels, max_new_tokens=12)
    config = GenerationConfig(max_new_tokens=12)
    step = model.decode_step(*model.encode_images(pixels), config, rows=4)
    beam = _beam_search(step, 4, config, BOS, EOS, PAD, torch.tensor([PAD, BOS]), torch.device("cpu"))
    assert torch.equal(beam.ids, greedy.ids)
    lengths = (greedy.ids[:, :, 1:] != PAD).sum(-1)
    assert torch.allclose(beam.scores, greedy.scores / lengths, atol=1e-5)  # length_penalty 1.0


def test_beams_are_sorted_distinct_and_no_worse_than_greedy(captioner):
    model, pixels = captioner
    greedy = model.generate(pixels, max_new_tokens=12, length_penalty=0.0)
    beams = model.generate(pixels, max_new_tokens=12, num_beams=4, num_return=4, length_penalty=0.0)
    assert beams.ids.shape[:2] == (4, 4)
    assert (beams.scores[:, :-1] >= beams.scores[:, 1:]).all()
    assert (beams.scores[:, 0] >= greedy.scores[:, 0] - 1e-5).all()
    for row in beams.ids:
        assert len({tuple(seq.tolist()) for seq in row}) == 4


def test_sampling_is_reproducible_under_a_seed(captioner):
    model, pixels = captioner
    with torch.no_grad():
        model.lm_head.weight.div_(8.0)  # flatten the distribution so samples vary
    try:
        a = model.generate(pixels, do_sample=True, num_return=3, seed=1, max_new_tokens=10)
        b = model.generate(pixels, do_sample=True, num_return=3, seed=1, max_new_tokens=10)
        c = model.generate(pixels, do_sample=True, num_return=3, seed=2, max_new_tokens=10)
        top1 = model.generate(pixels, do_sample=True, top_k=1, seed=3, max_new_tokens=10)
        greedy = model.generate(pixels, max_new_tokens=10)
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    assert torch.equal(top1.ids, greedy.ids)  # top-k 1 leaves only the argmax


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda filtered: torch.isfinite(filtered)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary must not matter
    assert kept(filter_logits(shuffled, top_p=0.7)) == [False, True, False, True]


def test_bad_generation_options_are_refused(captioner):
    for bad in ({"num_beams": 2, "do_sample": True}, {"num_beams": 2, "num_return": 3}, {"num_return": 2}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            GenerationConfig(**bad).validate()
    model, pixels = captioner
    with pytest.raises(ValueError, match="classifier-free guidance applies to text-to-image models"):
        model.generate(pixels, guidance_scale=2.0)  # a captioner has no input without its image


# ----------------------------------------------------------------------------- exact search on a toy model

T_PAD, T_BOS, T_EOS, T_VOCAB = 0, 1, 2, 5  # tokens 2, 3, 4 can be generated


def toy_step(seed: int):
    """Next-token logits that depend on the whole prefix (fixed random per prefix)."""

    def logits_of(prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed,) + prefix) % (2**31))
        return torch.randn(T_VOCAB, generator=g) * 2.0

    class Step:  # the whole prefix decides, so reordering keeps nothing
        def __call__(self, ids):
            return torch.stack([logits_of(tuple(row.tolist())) for row in ids])

        def reorder(self, index):
            pass

    return Step(), logits_of


def exhaustive_best(logits_of, max_new: int, alpha: float) -> tuple[tuple[int, ...], float]:
    """The best hypothesis over every sequence that ends at its first [EOS] or at the limit."""
    best, best_score = None, float("-inf")
    for length in range(1, max_new + 1):
        for seq in itertools.product([2, 3, 4], repeat=length):
            if T_EOS in seq[:-1] or (length < max_new and seq[-1] != T_EOS):
                continue
            prefix, total = (T_BOS,), 0.0
            for token in seq:
                logits = logits_of(prefix).clone()
                logits[[T_PAD, T_BOS]] = float("-inf")
                total += logits.log_softmax(-1)[token].item()
                prefix += (token,)
            if total / length**alpha > best_score:
                best, best_score = (T_BOS,) + seq, total / length**alpha
    return best, best_score


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_optimum_and_greedy_sometimes_does_not(alpha):
    max_new, greedy_worse = 4, 0
    for seed in range(8):
        step, logits_of = toy_step(seed)
        specials = dict(bos_id=T_BOS, eos_id=T_EOS, pad_id=T_PAD)
        beam = generate(step, 1, GenerationConfig(max_new_tokens=max_new, num_beams=27, length_penalty=alpha), **specials)
        best, best_score = exhaustive_best(logits_of, max_new, alpha)
        assert tuple(t for t in beam.ids[0, 0].tolist() if t != T_PAD) == best
        assert beam.scores[0, 0].item() == pytest.approx(best_score, abs=1e-5)
        greedy = generate(step, 1, GenerationConfig(max_new_tokens=max_new), **specials)
        length = int((greedy.ids[0, 0, 1:] != T_PAD).sum())
        greedy_worse += greedy.scores[0, 0].item() / length**alpha < best_score - 1e-6
    assert greedy_worse > 0


def reference_beam_search(logits_of, K: int, max_new: int, alpha: float) -> tuple[tuple[int, ...], float]:
    """Beam search written plainly, one image, running every step to the limit (no early stop)."""
    running, pool = [((T_BOS,), 0.0)], []
    for t in range(1, max_new + 1):
        candidates = []
        for seq, score in running:
            logits = logits_of(seq).clone()
            logits[[T_PAD, T_BOS]] = float("-inf")
            logp = logits.log_softmax(-1)
            candidates += [(score + logp[v].item(), seq + (v,)) for v in range(T_VOCAB) if v not in (T_PAD, T_BOS)]
        candidates.sort(key=lambda c: -c[0])
        running = []
        for rank, (score, seq) in enumerate(candidates[: 2 * K]):
            if seq[-1] == T_EOS:
                if rank < K:
                    pool.append((score / t**alpha, seq))
            elif len(running) < K:
                running.append((seq, score))
    pool += [(score / max_new**alpha, seq) for seq, score in running]
    best = max(pool)
    return best[1], best[0]


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0])
def test_early_stopping_never_changes_the_beam_result(alpha):
    # an image stops once no running beam can beat its pool at any reachable length; the result
    # must equal a search that always runs to the limit
    for seed in range(40):
        step, logits_of = toy_step(100 + seed)
        cfg = GenerationConfig(max_new_tokens=6, num_beams=2, length_penalty=alpha)
        beam = generate(step, 1, cfg, bos_id=T_BOS, eos_id=T_EOS, pad_id=T_PAD)
        best, best_score = reference_beam_search(logits_of, 2, 6, alpha)
        assert tuple(t for t in beam.ids[0, 0].tolist() if t != T_PAD) == best, seed
        assert beam.scores[0, 0].item() == pytest.approx(best_score, abs=1e-5)


def test_an_empty_batch_decodes_to_nothing(captioner):
    model, pixels = captioner
    for options in ({}, {"num_beams": 2}):
        out = model.generate(pixels[:0], max_new_tokens=5, **options)
        assert out.ids.shape[0] == 0 and out.scores.shape[0] == 0


# ----------------------------------------------------------------------------- recorded steps (CUDA graphs)


class EagerGraph:
    """Stands in for a recorded CUDA graph on the CPU: each replay runs the recorded function."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


def eager_graphs(monkeypatch) -> list:
    """Take the recording paths (warm-up, record once, replay, keep and refill) on the CPU, each
    replay running eagerly; returns the list of recorded functions."""
    recordings = []

    def record(fn):
        fn()  # the warm-up run, as on a GPU
        recordings.append(fn)
        return EagerGraph(fn)

    monkeypatch.setattr(mmt.cuda_graphs, "can_record", lambda t: True)
    monkeypatch.setattr(mmt.cuda_graphs, "record", record)
    return recordings


OPTIONS = [{}, {"num_beams": 3, "num_return": 2}, {"num_beams": 4, "length_penalty": 0.6}, {"do_sample": True, "seed": 4, "num_return": 2}]
# eos_bias > 0 raises [EOS]'s logit until some sequences stop early (chosen per decoding mode)
RECORDED_CASES = [(options, 0.0) for options in OPTIONS] + list(zip(OPTIONS, [3.0, 5.0, 6.5, 4.0]))


@pytest.mark.parametrize("options, eos_bias", RECORDED_CASES)
def test_recorded_decoding_gives_eager_tokens_call_after_call(captioner, monkeypatch, options, eos_bias):
    model, pixels = captioner
    first, second = pixels[:2], pixels[2:]
    with torch.no_grad():
        model.lm_head.bias[EOS] += eos_bias  # > 0: some captions end early
        try:
            expected = [model.generate(x, max_new_tokens=10, gathered=False, **options) for x in (first, second)]
            recordings = eager_graphs(monkeypatch)
            forget_graphs(model)
            got = [model.generate(first, max_new_tokens=10, **options), model.generate(second, max_new_tokens=10, **options)]
            with torch.inference_mode():  # kept buffers are refilled inside inference mode and out of it
                got.append(model.generate(first, max_new_tokens=10, **options))
            got.append(model.generate(second, max_new_tokens=10, **options))
        finally:
            model.lm_head.bias[EOS] -= eos_bias
    assert len(recordings) == 2  # the image encoder and the step, once for all four calls
    assert expected[0].ids.shape[-1] == 11 or eos_bias > 0  # ten tokens decoded
    for result, want in zip(got, expected * 2):  # earlier results are not overwritten by later calls
        assert torch.equal(result.ids, want.ids)
        assert torch.allclose(result.scores, want.scores, atol=1e-5)
    ended = [bool((want.ids == EOS).any()) for want in expected]  # some sequence stopped at [EOS]
    assert any(ended) == (eos_bias > 0)


def test_recorded_steps_are_kept_per_shape(captioner, monkeypatch):
    model, pixels = captioner
    eager_graphs(monkeypatch)
    forget_graphs(model)
    with torch.no_grad():
        model.generate(pixels[:2], max_new_tokens=4, num_beams=3)
        kept = dict(mmt.cuda_graphs.kept_graphs(model, "steps"))
        model.generate(pixels[2:], max_new_tokens=4, num_beams=3)  # same shape: the same step, refilled
        assert mmt.cuda_graphs.kept_graphs(model, "steps") == kept
        for n in (1, 2, 3, 4, 1):  # other shapes add recordings; only the 4 most recent stay
            model.generate(pixels[:n], max_new_tokens=4)
    assert len(mmt.cuda_graphs.kept_graphs(model, "steps")) == 4
    assert len(mmt.cuda_graphs.kept_graphs(model, "functions")) == 4  # the image encoder's, per shape


def test_recorded_step_for_generative_vqa_with_padded_questions(monkeypatch, generative_vqa):
    model, pixels, questions, image_index = generative_vqa
    with torch.no_grad():
        expected = model.generate_answers(pixels, questions, image_index, GenerationConfig(num_beams=2, gathered=False))
        recordings = eager_graphs(monkeypatch)  # as on a GPU, each replay running eagerly here
        got = model.generate_answers(pixels, questions, image_index, GenerationConfig(num_beams=2))
    (step,) = mmt.cuda_graphs.kept_graphs(model, "steps").values()
    assert step.ids.shape == (12, 1) and step.step.context_padding.any()  # 6 questions x 2 beams; padded questions
    assert len(recordings) == 1
    assert torch.equal(got.ids, expected.ids)
    assert torch.allclose(got.scores, expected.scores, atol=1e-5)


def test_recorded_step_refuses_misuse(captioner, monkeypatch):
    eager_graphs(monkeypatch)
    model, pixels = captioner
    tokens, padding = model.encode_images(pixels)
    config = GenerationConfig(max_new_tokens=3)
    with torch.no_grad():
        step = model.decode_step(tokens, padding, config, rows=4)
        with pytest.raises(ValueError, match="one new token"):
            step(torch.full((4, 2), BOS))
        ids = torch.full((4, 1), BOS)
        for _ in range(model.embed.positions.max_len):
            step(ids)
            ids = torch.cat([ids, torch.full((4, 1), 7)], dim=1)
        with pytest.raises(ValueError, match="positions of the decoder are used"):
            step(ids)


def test_kept_graphs_are_dropped_when_the_model_trains_or_moves(captioner, monkeypatch):
    model, pixels = captioner
    eager_graphs(monkeypatch)
    kept = lambda: "_graphs" in model.__dict__
    with torch.no_grad():
        model.generate(pixels[:1], max_new_tokens=3)
        assert kept()
        model.eval()
        assert kept()  # evaluating again keeps them
        model.train()
        assert not kept()
        model.eval()
        model.generate(pixels[:1], max_new_tokens=3)
        model.float()  # moving or re-typing the weights
        assert not kept()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("options", OPTIONS)
def test_cuda_graph_replay_decodes_exactly_as_eager_decoding(captioner, options, monkeypatch):
    recordings = []
    record = mmt.cuda_graphs.record
    monkeypatch.setattr(mmt.cuda_graphs, "record", lambda fn: recordings.append(fn) or record(fn))
    model, pixels = captioner
    model, pixels = model.cuda(), pixels.cuda()
    forget_graphs(model)  # graphs of earlier cases (valid where the weights landed at the same addresses again)
    try:
        eager = model.generate(pixels, max_new_tokens=10, cuda_graph=False, **options)
        assert not recordings
        graphed = model.generate(pixels, max_new_tokens=10, **options)
        assert len(recordings) == 2  # the image encoder and the decoding step
        other = model.generate(pixels.flip(0), max_new_tokens=10, **options)  # replays them, refilled
        twice = model.generate(pixels, max_new_tokens=10, **options)
        other_eager = model.generate(pixels.flip(0), max_new_tokens=10, cuda_graph=False, **options)
    finally:
        model.cpu()
    assert len(recordings) == 2
    assert torch.equal(graphed.ids, eager.ids) and torch.equal(twice.ids, eager.ids)  # graphed: not overwritten
    assert torch.equal(other.ids, other_eager.ids)
    assert torch.allclose(graphed.scores, eager.scores, atol=1e-4)
