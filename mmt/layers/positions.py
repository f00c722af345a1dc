"""Position embeddings: for a token sequence (1-D) and for an image token grid (2-D)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal embedding of integer `positions` (L,) -> (L, dim) (Vaswani et al. sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (L, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))  # odd dim: one zero channel


class Positions1D(nn.Module):
    """Position embedding for a token sequence: learned table or fixed sinusoids."""

    def __init__(self, max_len: int, dim: int, kind: str = "learned"):
        super().__init__()
        if kind not in ("learned", "sincos"):
            raise ValueError(f"position embedding {kind!r} is not one of learned, sincos")
        self.max_len = max_len
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        else:  # fixed: a buffer that follows the module's device but is not saved
            self.register_buffer("table", sincos_1d(torch.arange(max_len), dim), persistent=False)

    def forward(self, length: int, start: int | Tensor = 0) -> Tensor:
        """Embeddings of positions start..start+length-1, (length, dim). `start` may be a (1,) tensor
        (a static cache's position, read from memory by a recorded step); the caller then keeps
        the positions below max_len."""
        if isinstance(start, Tensor):
            return self.table.index_select(0, start if length == 1 else start + torch.arange(length, device=start.device))
        if start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds max_len={self.max_len}")
        return self.table[start : start + length]


class Positions2D(nn.Module):
    """Position embedding for an image token grid: emb(row) + emb(col), learned or sinusoidal.

    The sinusoidal form spends half the channels on the row and half on the column (as in
    MAE); the learned form keeps one table per axis.
    """

    def __init__(self, max_rows: int, max_cols: int, dim: int, kind: str = "learned"):
        super().__init__()
        if kind not in ("learned", "sincos"):
            raise ValueError(f"position embedding {kind!r} is not one of learned, sincos")
        self.dim = dim
        if kind == "learned":
            self.rows = nn.Parameter(torch.randn(max_rows, dim) * 0.02)
            self.cols = nn.Parameter(torch.randn(max_cols, dim) * 0.02)
        else:  # zero-padded halves, so that row + col concatenates [row code, col code]
            half = dim // 2
            rows = nn.functional.pad(sincos_1d(torch.arange(max_rows), half), (0, dim - half))
            cols = nn.functional.pad(sincos_1d(torch.arange(max_cols), dim - half), (half, 0))
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)

    def forward(self, rows: int, cols: int) -> Tensor:
        """(rows * cols, dim), row-major like a flattened (rows, cols) grid."""
        if rows > self.rows.shape[0] or cols > self.cols.shape[0]:
            raise ValueError(f"token grid {rows}x{cols} exceeds {self.rows.shape[0]}x{self.cols.shape[0]}")
        grid = self.rows[:rows, None, :] + self.cols[None, :cols, :]  # (rows, cols, dim)
        return grid.reshape(rows * cols, self.dim)


class RasterPositions(Positions2D):
    """2-D positions of a token sequence that walks an image grid in raster order (row by row):
    sequence position p is the cell (p // cols, p % cols). What a decoder over image tokens adds
    to its inputs; `max_len` = rows * cols, and `forward` reads like `Positions1D.forward`."""

    def __init__(self, rows: int, cols: int, dim: int, kind: str = "learned"):
        super().__init__(rows, cols, dim, kind)
        self.grid, self.max_len = (rows, cols), rows * cols

    def forward(self, length: int, start: int | Tensor = 0) -> Tensor:
        """Embeddings of sequence positions start..start+length-1, (length, dim)."""
        table = Positions2D.forward(self, *self.grid)  # (named, not super(): a gathered view is no subclass)
        if isinstance(start, Tensor):
            return table.index_select(0, start if length == 1 else start + torch.arange(length, device=start.device))
        if start + length > self.max_len:
            raise ValueError(f"sequence of {start + length} image tokens exceeds the {self.grid[0]}x{self.grid[1]} grid")
        return table[start : start + length]
