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
