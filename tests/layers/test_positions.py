import pytest
import torch

from mmt.layers.positions import Positions1D, Positions2D

D = 32


def test_position_embeddings():
    learned = Positions1D(10, D)
    assert learned(4, start=3).shape == (4, D)
    assert torch.equal(learned(4, start=3), learned.table[3:7])
    with pytest.raises(ValueError, match="max_len"):
        learned(8, start=4)
    fixed = Positions1D(10, D, "sincos")
    assert "table" not in fixed.state_dict()  # fixed embeddings are not weights
    assert not torch.allclose(fixed(1, 0), fixed(1, 1))
    grid = Positions2D(4, 5, D, "learned")(3, 4)
    assert grid.shape == (12, D)
    sincos = Positions2D(4, 5, D, "sincos")(3, 4).view(3, 4, D)
    # the first half of the channels codes the row only, the second half the column only
    assert torch.equal(sincos[0, 0, : D // 2], sincos[0, 3, : D // 2])
    assert torch.equal(sincos[0, 2, D // 2 :], sincos[2, 2, D // 2 :])
    assert not torch.equal(sincos[0, 0], sincos[1, 0])
    with pytest.raises(ValueError, match="exceeds"):
        Positions2D(4, 5, D)(5, 5)


def test_a_position_held_in_a_tensor_reads_the_same_rows():
    table = Positions1D(10, D)
    assert torch.equal(table(1, torch.tensor([3])), table(1, 3))
    assert torch.equal(table(2, torch.tensor([3])), table(2, 3))


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="'xy' is not one of learned, sincos"):
        Positions2D(4, 4, D, "xy")
    with pytest.raises(ValueError, match="not one of"):
        Positions1D(4, D, "rotary")
