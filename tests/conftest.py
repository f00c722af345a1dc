import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_exact_peers():
    torch.manual_seed(0)
    # torch.nn's Transformer layers take a fused "fast path" in eval mode that returns
    # zeros at padded positions; the peer comparisons want the plain formula.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(previous)


@pytest.fixture
def generative_vqa():
    """A small generative VQA model (peaked random weights: decoding choices are not near-ties),
    two images and six questions about them, half of them padded (their fused states are
    padded too): (model, pixels, questions, image_index)."""
    from mmt import registry

    torch.manual_seed(1)
    cfg = registry.preset("vqa-small")
    cfg.head, cfg.text.vocab_size = "generate", 20
    model = registry.build(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    pixels = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    questions = torch.randint(7, 20, (6, 7))
    questions[::2, 4:] = cfg.text.pad_id
    return model, pixels, questions, torch.tensor([0, 0, 0, 1, 1, 1])
