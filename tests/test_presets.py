import pytest
import torch

from mmt import registry


def example_inputs(model, n=2):
    """A small random batch for any registered model type."""
    cfg = model.config
    size = cfg.vision.image_size
    pixels = torch.randn(n, cfg.vision.channels, size, size)
    if model.model_type == "caption":
        ids = torch.randint(7, cfg.vocab_size, (n, 5))
        ids[:, 0] = cfg.bos_id
        return {"pixels": pixels, "caption_ids": ids}
    if model.model_type == "vqa":
        ids = torch.randint(7, cfg.text.vocab_size, (2 * n, 6))
        ids[:, 0] = 2  # [CLS]
        # two questions per image, as the trainer batches them
        return {
            "pixels": pixels,
            "question_ids": ids,
            "answers": torch.randint(0, cfg.num_answers, (2 * n,)),
            "image_index": torch.arange(n).repeat_interleave(2),
        }
    raise AssertionError(f"add example inputs for model type {model.model_type}")


@pytest.mark.parametrize("name", registry.preset_names())
def test_every_preset_trains_one_step(name):
    model = registry.build(registry.preset(name))
    losses = model(**example_inputs(model))
    loss = sum(v for k, v in losses.items() if k.endswith("_loss"))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_greedy_generation_with_cache_matches_recomputing_everything():
    cfg = registry.preset("caption-tiny")
    model = registry.build(cfg).eval()
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    generated = model.generate(pixels, max_len=8)
    assert generated.shape[0] == 3 and (generated[:, 0] == cfg.bos_id).all()
    # re-derive each token with a full, uncached forward pass over the prefix
    tokens, mask = model.encode_images(pixels)
    with torch.no_grad():
        for t in range(1, generated.shape[1]):
            full, _ = model.next_token_logits(generated[:, :t], tokens, mask)
            live = generated[:, t - 1] != cfg.pad_id
            live &= generated[:, :t].eq(cfg.eos_id).sum(1) == 0
            assert torch.equal(full[live, -1].argmax(-1), generated[live, t])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="caption-tiny"):
        registry.preset("nope")
