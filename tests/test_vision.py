import pytest
import torch

from mmt.config import TransformerConfig, VisionConfig
from mmt.vision import ConvStem, PatchEmbed, VisionTower, token_padding_mask

SMALL = TransformerConfig(dim=32, depth=1, heads=4, ffn_dim=64, dropout=0.0)


def test_conv_stem_follows_the_design():
    stem = ConvStem(3, (16, 32), dim=48)
    first = stem.body[0]
    assert first.kernel_size == (7, 7) and first.stride == (2, 2)
    assert isinstance(stem.body[2], torch.nn.ReLU) and isinstance(stem.body[3], torch.nn.MaxPool2d)
    assert stem(torch.randn(2, 3, 64, 64)).shape == (2, 48, 8, 8)  # 64 -conv-> 32 -pool-> 16 -block-> 8


def test_patch_embed_grid():
    assert PatchEmbed(3, 8, 48)(torch.randn(2, 3, 64, 64)).shape == (2, 48, 8, 8)


@pytest.mark.parametrize("stem", ["conv", "patch"])
@pytest.mark.parametrize("positions", ["learned", "sincos"])
def test_vision_tower_tokens_and_mask(stem, positions):
    tower = VisionTower(VisionConfig(stem=stem, image_size=64, conv_widths=(16, 32), positions=positions, encoder=SMALL))
    tokens, mask = tower(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 64, 32) and mask.shape == (2, 64) and not mask.any()
    tokens.sum().backward()
    assert all(p.grad is not None for p in tower.parameters())


def test_padded_pixels_become_padded_tokens():
    pixel_mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    pixel_mask[:, :, 40:] = True  # right part of the canvas is padding
    mask = token_padding_mask(pixel_mask, 8, 8).view(8, 8)
    assert not mask[:, :5].any() and mask[:, 5:].all()  # tokens over columns 40..63 are padding
    tower = VisionTower(VisionConfig(stem="patch", image_size=64, encoder=SMALL)).eval()
    tokens, token_mask = tower(torch.randn(1, 3, 64, 64), pixel_mask)
    assert token_mask.sum() == 24 and torch.isfinite(tokens).all()


def test_batchnorm_stem_is_not_polluted_by_the_grid_probe():
    tower = VisionTower(VisionConfig(stem="conv", conv_norm="batch", conv_widths=(16, 32), encoder=SMALL))
    norms = [m for m in tower.stem.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)
    assert tower.stem.training


def test_conv_strides_must_match_blocks():
    with pytest.raises(ValueError, match="need as many strides"):
        ConvStem(3, (16, 32, 64), dim=32, strides=(2,))
    assert ConvStem(3, (16, 32, 64), dim=32, strides=(1, 2))(torch.randn(1, 3, 64, 64)).shape == (1, 32, 8, 8)


def test_relative_position_bias_depends_only_on_the_offset():
    cfg = VisionConfig(stem="patch", image_size=24, patch_size=8, relative_bias=True, encoder=SMALL)
    tower = VisionTower(cfg)  # a 3x3 grid: offsets -2..2 on each axis
    assert tower.relative_positions.shape == (4, 5, 5) and (tower.relative_positions == 0).all()
    with torch.no_grad():
        tower.relative_positions.copy_(torch.randn(4, 5, 5))
    bias = tower.relative_position_bias(3, 3)
    assert bias.shape == (4, 9, 9)
    for i in range(9):
        for j in range(9):
            dr, dc = i // 3 - j // 3, i % 3 - j % 3
            assert torch.equal(bias[:, i, j], tower.relative_positions[:, dr + 2, dc + 2])
    # the encoder uses it: the output changes with the table, and the table gets gradients
    pixels = torch.randn(2, 3, 24, 24)
    tokens, _ = tower(pixels)
    tokens.sum().backward()
    assert tower.relative_positions.grad.abs().sum() > 0
    with torch.no_grad():
        tower.relative_positions.zero_()
        assert (tower(pixels)[0] - tokens).abs().max() > 1e-4
    with pytest.raises(ValueError, match="exceeds"):
        tower.relative_position_bias(4, 3)
    no_encoder = TransformerConfig(dim=32, depth=0, heads=4, ffn_dim=64, dropout=0.0)
    with pytest.raises(ValueError, match="encoder.depth"):
        VisionTower(VisionConfig(stem="patch", image_size=24, patch_size=8, relative_bias=True, encoder=no_encoder))
