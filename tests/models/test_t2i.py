"""Text to image: the VQ-VAE tokenizer's round trip and codebook, and the generator's decoding:
cached == uncached, guidance off == plain sampling, guidance 0 == sampling without the text,
teacher forcing == the step the search drives."""

import numpy as np
import pytest
import torch

from mmt import registry
from mmt.data.images import to_pixels
from mmt.data.worlds.shapes_t2i import T2ISplit
from mmt.generation import GenerationConfig, GuidedStep, decoder_step, generate
from mmt.models.vqvae import VQVAE, psnr


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    cfg = registry.preset("t2i-tiny")
    cfg.text.vocab_size = 20
    model = registry.build(cfg).eval()
    with torch.no_grad():
        model.head.weight.mul_(6.0)  # a peaked random model: sampling and argmax choices are not near-ties
    ids = torch.randint(7, 20, (3, 6))
    ids[:, 0], ids[2, 4:] = 2, 0  # [CLS] ...; one caption padded
    return model, ids


@pytest.fixture(scope="module")
def trained_tokenizer():
    """vqvae-tiny after 150 steps on 32x32 images of the text-to-image world, and test images."""
    torch.manual_seed(0)
    model = registry.build(registry.preset("vqvae-tiny"))
    pixels = to_pixels(T2ISplit.generate(600, seed=0, image_size=32).images)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = pixels[torch.randint(len(pixels), (32,))]
        out = model(batch)
        optimizer.zero_grad()
        (out["reconstruction_loss"] + out["commitment_loss"]).backward()
        optimizer.step()
    test = to_pixels(T2ISplit.generate(64, seed=0, image_size=32, stream=2).images)
    return model.eval(), test


def test_tokenizer_round_trip(trained_tokenizer):
    model, pixels = trained_tokenizer
    codes = model.encode(pixels)
    assert codes.shape == (64, 8, 8) and codes.dtype == torch.long
    redrawn = model.decode(codes)
    assert redrawn.shape == pixels.shape and redrawn.abs().max() <= 1
    blank = torch.ones_like(pixels)  # a white canvas: the floor any redrawing must beat
    quality, floor = psnr(redrawn, pixels).mean().item(), psnr(blank, pixels).mean().item()
    assert quality > floor + 2.5, f"reconstruction PSNR {quality:.2f} dB vs a blank canvas's {floor:.2f} dB"
    # a redrawing redrawn again changes little: codes -> pixels -> codes -> pixels is near a fixed point
    again = psnr(model.decode(model.encode(redrawn)), redrawn).mean().item()
    print(f"round trip: PSNR {quality:.2f} dB (blank {floor:.2f}), again {again:.2f} dB")
    assert again > quality + 3, f"redrawing a redrawing: {again:.2f} dB, the first redrawing {quality:.2f} dB"
    assert torch.equal(model.decode(codes), redrawn)  # decoding is deterministic


def test_codebook_starts_from_data_and_restarts_dead_codes():
    torch.manual_seed(0)
    model = VQVAE(registry.preset("vqvae-tiny")).train()
    book = model.codebook
    pixels = torch.rand(8, 3, 32, 32) * 2 - 1
    assert not book.started
    model(pixels)
    assert book.started
    z = model.encoder(pixels).permute(0, 2, 3, 1).reshape(-1, book.embed.shape[1])
    # every code began as an encoder output of the first batch (then moved 1 - decay toward its mean)
    assert torch.cdist(book.embed, z).min(1).values.max() < 0.5
    book.count[:5], book.embed[:5], book.total[:5] = 0.0, 100.0, 0.0  # five codes unused for long, far from every input
    model(pixels)
    assert (book.count[:5] == 1.0).all(), "dead codes were not restarted"
    assert torch.cdist(book.embed[:5], z).min(1).values.max() < 1e-3  # each at an encoder output of the batch (cdist rounds)
    model.eval()
    frozen = book.embed.clone()
    model(pixels)
    assert torch.equal(book.embed, frozen), "the codebook moved in eval mode"


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 3, "top_k": 5}, {"do_sample": True, "seed": 1, "guidance_scale": 2.5}])
def test_cached_sampling_equals_recomputing_the_prefix(generator, options):
    model, ids = generator
    cached = model.generate_codes(ids, **options)
    full = model.generate_codes(ids, use_cache=False, gathered=False, **options)
    assert cached.shape == (3, 1, 8, 8)
    assert torch.equal(cached, full)


def test_guidance_off_is_plain_sampling(generator):
    """Scale 1 decodes without unconditional rows; the guided step at scale 1
    (uncond + 1 * (cond - uncond), over twice the rows) draws the same codes."""
    model, ids = generator
    options = {"do_sample": True, "seed": 7, "num_return": 2}
    plain = model.generate_codes(ids, **options)
    assert torch.equal(model.generate_codes(ids, guidance_scale=1.0, **options), plain)
    config = GenerationConfig(max_new_tokens=64, **options)
    text, padding = model.encode_text(ids)
    null, null_padding = model.encode_text(ids, torch.ones(len(ids), dtype=torch.bool))
    step = decoder_step(model, model.embed, model.decoder, model.head, torch.cat([text, null]), torch.cat([padding, null_padding]),
                        config, 2 * config.rows(len(ids)))
    guided = generate(GuidedStep(step, 1.0), len(ids), config, bos_id=model.bos_id, eos_id=-1, pad_id=model.bos_id)
    assert torch.equal(guided.ids[:, :, 1:].reshape(plain.shape), plain)


def test_guidance_zero_samples_as_if_there_were_no_text(generator):
    """Scale 0 keeps only the unconditional logits: the same draws as a model whose every
    caption is replaced by the "no text" context."""
    model, ids = generator
    options = {"do_sample": True, "seed": 11}
    guided = model.generate_codes(ids, guidance_scale=0.0, **options)
    original = model.encode_text
    model.encode_text = lambda caption_ids, drop=None: original(caption_ids, torch.ones(len(caption_ids), dtype=torch.bool))
    try:
        unconditional = model.generate_codes(ids, **options)
    finally:
        del model.encode_text
    assert torch.equal(guided, unconditional)
    assert not torch.equal(guided, model.generate_codes(ids, **options))  # (and the text matters)


def test_greedy_codes_are_the_argmax_of_teacher_forcing(generator):
    model, ids = generator
    codes = model.generate_codes(ids)[:, 0]
    text, padding = model.encode_text(ids)
    targets = codes.flatten(1)
    inputs = torch.cat([torch.full_like(targets[:, :1], model.bos_id), targets[:, :-1]], 1)
    logits = model.head(model.decoder(model.embed(inputs), text, context_padding_mask=padding))
    logits[..., model.bos_id] = float("-inf")
    assert torch.equal(logits.argmax(-1), targets)


def test_generated_pixels_are_the_tokenizers_drawing_of_the_codes(generator):
    model, ids = generator
    pixels = model.generate(ids, do_sample=True, seed=2, num_return=2)
    codes = model.generate_codes(ids, do_sample=True, seed=2, num_return=2)
    assert pixels.shape == (3, 2, 3, 32, 32)
    assert torch.equal(pixels.flatten(0, 1), model.image_tokenizer.decode(codes.flatten(0, 1)))
    assert np.isfinite(pixels.numpy()).all()


def test_the_tokenizer_stays_frozen_when_the_generator_trains(generator):
    model, _ = generator
    model.train()
    try:
        assert not model.image_tokenizer.training
        assert not any(p.requires_grad for p in model.image_tokenizer.parameters())
    finally:
        model.eval()
