"""Image towers: pixels -> a grid of image tokens (B, N, D) plus a padding mask.

Two stems turn pixels into tokens. `ConvStem` is the design's convolutional encoder
(7x7 stride-2 conv -> ReLU -> 3x3 stride-2 max-pool -> further conv blocks), whose
feature map is read as a grid of tokens. `PatchEmbed` is the ViT stem (Dosovitskiy et
al. 2021): non-overlapping patches, each linearly projected. `VisionTower` adds 2-D
position embeddings and runs a Transformer encoder over the tokens; for ViT and CLIP
checkpoints (`mmt.interop`) it can put a class token first, embed positions as one flat
table and normalise the tokens before the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.config import VisionConfig
from mmt.layers.positions import Positions1D, Positions2D
from mmt.layers.transformer import Encoder


def _norm(channels: int, kind: str) -> nn.Module:
    # GroupNorm by default: a sample's features never depend on the rest of the batch, so
    # padded, single-sample and data-parallel runs compute the same thing.
    return nn.GroupNorm(min(8, channels), channels) if kind == "group" else nn.BatchNorm2d(channels)


class ConvStem(nn.Module):
    """conv 7x7/2 -> norm -> ReLU -> max-pool 3x3/2 -> [conv 3x3/stride -> norm -> ReLU]* -> 1x1 to dim.

    Args:
        widths: channels of the first conv, then of each following 3x3 block.
        dim: token width.
        strides: stride of each 3x3 block after the first conv (len(widths) - 1 of them).
        norm: "group" or "batch".
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], dim: int, strides: tuple[int, ...] = (2,), norm: str = "group"):
        super().__init__()
        if not widths:
            raise ValueError("conv stem needs at least one width (the first conv)")
        if len(strides) != len(widths) - 1:
            raise ValueError(f"conv stem: {len(widths) - 1} blocks after the first conv need as many strides, got {strides}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
            _norm(widths[0], norm),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ]
        for c_in, c_out, stride in zip(widths[:-1], widths[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), _norm(c_out, norm), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(widths[-1], dim, kernel_size=1)  # feature channels -> token width

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> feature map (B, D, h, w)."""
        return self.proj(self.body(pixels))


class PatchEmbed(nn.Module):
    """Split into patch_size x patch_size patches and project each to dim (a strided conv)."""

    def __init__(self, in_channels: int, patch_size: int, dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D, H / patch, W / patch)."""
        return self.proj(pixels)


def token_coordinates(rows: int, cols: int, device: torch.device | None = None) -> Tensor:
    """(rows * cols, 2) long: the (row, col) of each token of a grid flattened row-major."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([r, c], dim=1)


def token_padding_mask(pixel_mask: Tensor, rows: int, cols: int) -> Tensor:
    """(B, H, W) bool, True at padded pixels -> (B, rows * cols) bool, True at padded tokens.

    A token is padding only when every pixel under it is padding.
    """
    valid = F.adaptive_max_pool2d((~pixel_mask.bool()).float()[:, None], (rows, cols))  # (B, 1, rows, cols)
    return valid.flatten(1) < 0.5


class VisionTower(nn.Module):
    """Stem -> tokens + 2-D positions -> Transformer encoder."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder.dim
        if cfg.stem == "conv":
            self.stem: nn.Module = ConvStem(cfg.channels, cfg.conv_widths, dim, cfg.conv_strides, cfg.conv_norm)
        else:
            self.stem = PatchEmbed(cfg.channels, cfg.patch_size, dim, cfg.patch_bias)
        self.token_norm = nn.LayerNorm(dim) if cfg.token_norm else nn.Identity()
        rows, cols = self.grid_size(cfg.image_size)
        if cfg.class_token:
            self.class_token = nn.Parameter(torch.randn(dim) * 0.02)
        if cfg.positions == "flat":  # the class token's row first, then the grid's, row-major
            self.positions: nn.Module = Positions1D(int(cfg.class_token) + rows * cols, dim)
        else:
            self.positions = Positions2D(rows, cols, dim, cfg.positions)
        self.input_norm = nn.LayerNorm(dim, eps=cfg.encoder.norm_eps) if cfg.input_norm else nn.Identity()
        self.encoder = Encoder(cfg.encoder)
        if cfg.relative_bias:
            if cfg.class_token:
                raise ValueError("vision.relative_bias=true has no offset for the class token: set vision.class_token=false")
            if cfg.encoder.depth == 0:
                raise ValueError("vision.relative_bias=true needs vision.encoder.depth >= 1: the bias is added in the encoder's attention")
            # one table shared by the encoder's layers (as T5 shares its relative bias), zero
            # at the start; named "positions" so that weight decay leaves it alone
            self.relative_positions = nn.Parameter(torch.zeros(cfg.encoder.heads, 2 * rows - 1, 2 * cols - 1))

    def relative_position_bias(self, rows: int, cols: int) -> Tensor:
        """(heads, N, N) attention bias between the N = rows * cols tokens: entry (h, i, j) is
        head h's learned value for the offset (row_i - row_j, col_i - col_j) (Liu et al. 2021)."""
        table = self.relative_positions
        max_rows, max_cols = (table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2
        if rows > max_rows or cols > max_cols:
            raise ValueError(f"token grid {rows}x{cols} exceeds the relative bias table's {max_rows}x{max_cols}")
        r, c = token_coordinates(rows, cols, table.device).unbind(1)
        return table[:, r[:, None] - r[None, :] + max_rows - 1, c[:, None] - c[None, :] + max_cols - 1]

    @torch.no_grad()
    def grid_size(self, image_size: int) -> tuple[int, int]:
        """Token grid (rows, cols) the stem makes from a square image of this size."""
        probe = torch.zeros(1, self.cfg.channels, image_size, image_size)
        was_training = self.stem.training
        self.stem.eval()  # a BatchNorm stem must not count the probe in its running statistics
        _, _, rows, cols = self.stem(probe).shape
        self.stem.train(was_training)
        return rows, cols

    def forward(self, pixels: Tensor, pixel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode images.

        Args:
            pixels: (B, C, H, W) normalised images.
            pixel_mask: optional (B, H, W) bool, True where an image was padded to the
                batch size; tokens entirely over padding are masked in attention.
        Returns:
            image_tokens (B, N, D) and image_padding_mask (B, N) bool (True = padding).
        """
        features = self.stem(pixels)  # (B, D, rows, cols)
        B, D, rows, cols = features.shape
        tokens = self.token_norm(features.flatten(2).transpose(1, 2))  # (B, N, D), row-major grid
        if pixel_mask is None:
            padding = torch.zeros(B, rows * cols, dtype=torch.bool, device=pixels.device)
        else:
            padding = token_padding_mask(pixel_mask, rows, cols)
        if self.cfg.class_token:
            tokens = torch.cat([self.class_token.to(tokens.dtype).expand(B, 1, D), tokens], dim=1)  # (B, 1 + N, D)
            padding = torch.cat([padding.new_zeros(B, 1), padding], dim=1)
        if self.cfg.positions == "flat":
            positions = self.positions(tokens.shape[1])
        else:
            positions = self.positions(rows, cols)
        tokens = self.input_norm(tokens + positions.to(tokens.dtype))
        bias = self.relative_position_bias(rows, cols).to(tokens.dtype) if self.cfg.relative_bias else None
        tokens = self.encoder(tokens, key_padding_mask=padding if pixel_mask is not None else None, bias=bias)
        return tokens, padding
