"""A discrete image tokenizer: a small VQ-VAE (van den Oord et al. 2017, "Neural discrete
representation learning") that turns a 64x64 image into a grid of codebook indices and back.

    pixels (B, 3, H, W) -> encoder (convolutions, stride 2 `downsample` times) -> z (B, D, h, w)
      -> nearest codebook row per cell -> codes (B, h, w) -> decoder (the mirror image) -> pixels

The encoder is local: its kernels are as wide as their strides (then 1x1), so the code of a
cell is a function of that cell's pixels alone. The decoder's 3x3 and 4x4 kernels read
neighbouring codes. Why: a generator writes codes one cell at a time in raster order, and an
encoder that sees past its cell gives a cell a code that depends on what lies beside it (on the
shapes world, a 4x4-kernel encoder spread plain white cells over 327 codes, 4.9 nats): codes
the generator would have to guess before drawing the neighbours. A local encoder gives every
white cell one code.

Training minimises the reconstruction error (mean squared, on pixels in [-1, 1]) plus the
commitment term beta * ||z - sg(e)||^2; gradients pass the quantiser unchanged (straight-through).
The codebook itself is not learned by gradient: each row is an exponential moving average of the
encoder outputs assigned to it (the paper's appendix; Razavi et al. 2019), which trains faster and
more stably. A row that has gone unused (its average count below `dead_below`) is restarted at a
random encoder output of the current batch, so the whole codebook stays in use. The averages are
buffers: saved with the weights and restored on resume, and updated only in training mode.

The text-to-image model (`mmt.models.t2i`) reads images as these codes and writes them back.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from mmt.checkpoint import Pretrained
from mmt.config import Amount, Beta, Count, NonNegative, Settings
from mmt.registry import register_model, register_preset


@dataclasses.dataclass
class VQVAEConfig(Settings):
    """Convolutional encoder / decoder around an EMA codebook."""

    image_size: Count = 64  # input images are image_size x image_size
    width: Count = 32  # channels after the first stride-2 convolution; doubled at each further one
    downsample: Count = 3  # stride-2 steps: the code grid is image_size / 2**downsample per side (64 -> 8)
    res_blocks: Amount = 2  # residual blocks at the code resolution, in the encoder and in the decoder
    codebook_size: Count = 512  # K codes
    code_dim: Count = 64  # D, the width of a code
    beta: NonNegative = 0.25  # commitment weight
    decay: Beta = 0.99  # EMA decay of the codebook averages
    dead_below: NonNegative = 0.03  # a code whose average count per batch falls below this is restarted

    def grid(self) -> int:
        """Codes per side of the grid."""
        side = self.image_size >> self.downsample
        if side << self.downsample != self.image_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by 2**downsample={2 ** self.downsample}")
        return side


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Codebook(nn.Module):
    """K code vectors kept as exponential moving averages (buffers, not parameters)."""

    def __init__(self, size: int, dim: int, decay: float, dead_below: float):
        super().__init__()
        self.decay, self.dead_below = decay, dead_below
        embed = torch.randn(size, dim) / math.sqrt(dim)
        self.register_buffer("embed", embed)
        self.register_buffer("count", torch.full((size,), 0.1))  # average assignments per batch (unused for ~120 steps: restarted)
        self.register_buffer("total", embed * 0.1)  # average sum of assigned vectors
        self.register_buffer("started", torch.tensor(False))  # set from the first training batch

    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest code (Euclidean) of each row of z (N, D)."""
        z = z.float()
        distance = z.pow(2).sum(1, keepdim=True) - 2 * z @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return distance.argmin(1)

    @torch.no_grad()
    def update(self, z: Tensor, codes: Tensor) -> None:
        """One EMA step from encoder outputs z (N, D) assigned to `codes` (N,), then restart dead codes."""
        z = z.float()
        if not self.started:  # rows start at encoder outputs, not at random points far from them
            self.embed.copy_(z[torch.randint(len(z), (len(self.embed),), device=z.device)])
            self.total.copy_(self.embed * self.count[:, None])
            self.started.fill_(True)
            codes = self.nearest(z)
        onehot = nn.functional.one_hot(codes, self.embed.shape[0]).float()
        self.count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.total.mul_(self.decay).add_(onehot.t() @ z, alpha=1 - self.decay)
        n = self.count.sum()  # Laplace smoothing keeps rare codes away from a division by ~0
        smoothed = (self.count + 1e-5) / (n + self.embed.shape[0] * 1e-5) * n
        self.embed.copy_(self.total / smoothed[:, None])
        dead = (self.count < self.dead_below).nonzero()[:, 0]
        if len(dead):
            picks = z[torch.randint(len(z), (len(dead),), device=z.device)]
            self.embed[dead] = picks
            self.total[dead] = picks
            self.count[dead] = 1.0


@register_model
class VQVAE(Pretrained, nn.Module):
    model_type = "vqvae"
    config_class = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.config = cfg
        cfg.grid()  # checks the sizes
        widths = [cfg.width * 2**k for k in range(cfg.downsample)]  # after each stride-2 step
        # the encoder is local: every kernel is as wide as its stride, so a code sees its own cell only
        down: list[nn.Module] = [nn.Conv2d(3, widths[0], 2, stride=2)]
        for a, b in zip(widths, widths[1:]):
            down += [nn.ReLU(), nn.Conv2d(a, b, 2, stride=2)]
        down += [ResBlock(widths[-1], kernel=1) for _ in range(cfg.res_blocks)] + [nn.ReLU(), nn.Conv2d(widths[-1], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*down)
        up: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[-1], 3, padding=1)]
        up += [ResBlock(widths[-1]) for _ in range(cfg.res_blocks)]
        for a, b in zip(widths[::-1], widths[-2::-1]):
            up += [nn.ReLU(), nn.ConvTranspose2d(a, b, 4, stride=2, padding=1)]
        up += [nn.ReLU(), nn.ConvTranspose2d(widths[0], 3, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*up)
        self.codebook = Codebook(cfg.codebook_size, cfg.code_dim, cfg.decay, cfg.dead_below)

    def _quantise(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(encoder output z (B, D, h, w), codes (B, h, w))."""
        z = self.encoder(pixels)
        B, D, h, w = z.shape
        codes = self.codebook.nearest(z.permute(0, 2, 3, 1).reshape(-1, D))
        return z, codes.view(B, h, w)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> codes (B, h, w), long."""
        return self._quantise(pixels)[1]

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> pixels (B, 3, H, W), clamped to [-1, 1]."""
        return self.decoder(self.codebook.embed[codes].permute(0, 3, 1, 2)).clamp(-1, 1)

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """Losses of a batch: reconstruction and commitment; the codes' use for the log."""
        z, codes = self._quantise(pixels)
        quantised = self.codebook.embed[codes].permute(0, 3, 1, 2).to(z.dtype)
        if self.training:
            self.codebook.update(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), codes.view(-1))
        commitment = (z.float() - quantised.detach().float()).pow(2).mean()
        straight = z + (quantised - z).detach()  # the decoder's gradient reaches the encoder unchanged
        redrawn = self.decoder(straight).float()
        reconstruction = (redrawn - pixels.float()).pow(2).mean()
        with torch.no_grad():
            right = ((redrawn - pixels.float()).abs() <= 8 / 127.5).all(1)  # every channel within 8/255
            use = torch.bincount(codes.view(-1), minlength=self.config.codebook_size).float()
            p = use / use.sum()
            perplexity = torch.exp(-(p * p.clamp_min(1e-10).log()).sum())
        return {
            "reconstruction_loss": reconstruction,
            "commitment_loss": self.config.beta * commitment,
            "perplexity": perplexity,
            "codes_used": (use > 0).sum(),
            "pixels_right": right.sum(),
            "pixels": torch.tensor(right.numel()),
        }


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of pixels in [-1, 1] (peak-to-peak 2), per image (B,)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


@register_preset
def vqvae_small() -> VQVAEConfig:
    """64x64 shapes-world images to 8x8 codes of 512."""
    return VQVAEConfig()


@register_preset
def vqvae_tiny() -> VQVAEConfig:
    """A few-second CPU tokenizer for tests: 32x32 images, 8x8 codes of 64."""
    return VQVAEConfig(image_size=32, width=16, downsample=2, res_blocks=1, codebook_size=64, code_dim=16)
