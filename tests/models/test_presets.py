import pytest
import torch

from mmt import registry


def example_inputs(model, n=2):
    """A small random batch for any registered model type."""
    cfg = model.config
    if model.model_type == "vqvae":
        return {"pixels": torch.rand(n, 3, cfg.image_size, cfg.image_size) * 2 - 1}
    if model.model_type == "t2i":
        grid = cfg.image_tokenizer.grid()
        ids = torch.randint(7, cfg.text.vocab_size, (n, 6))
        ids[:, 0] = 2  # [CLS]
        codes = torch.randint(0, cfg.image_tokenizer.codebook_size, (n, grid, grid))
        return {"caption_ids": ids, "codes": codes, "drop_text": torch.arange(n) == 0}  # (one "no text" row: its vector learns too)
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
    if model.model_type == "retrieval":
        ids = torch.randint(7, cfg.text.vocab_size, (n, 6))
        ids[:, 0] = 2  # [CLS]
        captions = torch.randint(7, cfg.text.vocab_size, (n, 6))
        captions[:, 0] = 5  # [BOS]
        return {"pixels": pixels, "text_ids": ids, "caption_ids": captions}
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


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="caption-tiny"):
        registry.preset("nope")
