"""Text-to-image generation: text tower -> Transformer decoder over image tokens -> VQ-VAE pixels.

The design's cross-modal generation in the other direction. An image is the raster-order
sequence of its VQ-VAE codes (`mmt.models.vqvae`, 8x8 = 64 codes for a 64x64 image); the
decoder's masked self-attention reads the codes so far, its cross-attention reads the encoded
text, and training is teacher-forced: [BOS] c_0 .. c_{L-2} predicts c_0 .. c_{L-1}. Input p
carries the 2-D position of the cell it predicts (`RasterPositions`).

Classifier-free guidance (Ho & Salimans 2022): in training, a share of the captions is replaced
by the "no text" context, one learned vector; sampling then runs each image twice, with its
text and without, and extrapolates the logits (`mmt.generation.GuidedStep`). Decoding is the
shared search code: sampling with temperature / top-k / top-p, the key/value cache, greedy.

The VQ-VAE is part of the model (frozen, its weights saved with the generator's), so a saved
run turns text into pixels by itself.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from mmt.checkpoint import Pretrained
from mmt.config import Fraction, Settings, TextConfig, TransformerConfig
from mmt.generation import GenerationConfig, GuidedStep, decoder_step, generate
from mmt.layers.positions import RasterPositions
from mmt.layers.transformer import Decoder
from mmt.models.losses import next_token_loss
from mmt.models.vqvae import VQVAE, VQVAEConfig, vqvae_tiny
from mmt.registry import register_model, register_preset
from mmt.text import LogitsHead, TextTower


@dataclasses.dataclass
class T2IConfig(Settings):
    """Text encoder + decoder over image tokens + the VQ-VAE that draws them."""

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    decoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=4))
    image_tokenizer: VQVAEConfig = dataclasses.field(default_factory=VQVAEConfig)  # set from the tokenizer run
    null_text_rate: Fraction = 0.1  # share of training captions replaced by "no text" (for guidance)
    label_smoothing: Fraction = 0.0


class ImageTokenEmbedding(nn.Module):
    """Code embedding (codes 0..K-1, [BOS] = K) + raster 2-D positions; called like TokenEmbedding."""

    def __init__(self, codebook_size: int, dim: int, grid: int):
        super().__init__()
        self.tokens = nn.Embedding(codebook_size + 1, dim)
        self.positions = RasterPositions(grid, grid, dim)

    def forward(self, ids: Tensor, start: int | Tensor = 0) -> Tensor:
        embedded = self.tokens(ids)
        return embedded + self.positions(ids.shape[1], start).to(embedded.dtype)


@register_model
class T2IModel(Pretrained, nn.Module):
    model_type = "t2i"
    config_class = T2IConfig

    def __init__(self, cfg: T2IConfig):
        super().__init__()
        self.config = cfg
        K, grid, dim = cfg.image_tokenizer.codebook_size, cfg.image_tokenizer.grid(), cfg.decoder.dim
        self.bos_id = K
        self.text = TextTower(cfg.text)
        self.null_text = nn.Parameter(torch.randn(1, cfg.text.encoder.dim) * 0.02)
        self.embed = ImageTokenEmbedding(K, dim, grid)
        self.decoder = Decoder(cfg.decoder, context_dim=cfg.text.encoder.dim)
        self.head = LogitsHead(dim, K + 1)  # ([BOS]'s logit is never sampled)
        self.image_tokenizer = VQVAE(cfg.image_tokenizer).requires_grad_(False)

    def train(self, mode: bool = True) -> "T2IModel":
        super().train(mode)
        self.image_tokenizer.eval()  # frozen: its codebook averages never move
        return self

    def encode_text(self, caption_ids: Tensor, drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(text tokens (B, T, D), padding (B, T)); rows where `drop` (B,) is True become the
        "no text" context: the null vector at position 0, every other position masked."""
        tokens, padding = self.text(caption_ids)
        if drop is not None and bool(drop.any()):
            null = torch.zeros_like(tokens)
            null[:, 0] = self.null_text.to(tokens.dtype)
            tokens = torch.where(drop[:, None, None], null, tokens)
            first = torch.arange(tokens.shape[1], device=tokens.device)[None] == 0
            padding = torch.where(drop[:, None], ~first, padding)
        return tokens, padding

    def forward(self, caption_ids: Tensor, codes: Tensor, drop_text: Tensor | None = None) -> dict[str, Tensor]:
        """Teacher-forced loss. caption_ids (B, T); codes (B, h, w) or (B, L); drop_text (B,) bool."""
        text, padding = self.encode_text(caption_ids, drop_text)
        targets = codes.flatten(1)
        inputs = torch.cat([torch.full_like(targets[:, :1], self.bos_id), targets[:, :-1]], dim=1)
        hidden = self.decoder(self.embed(inputs), text, context_padding_mask=padding)
        logits = self.head(hidden)
        loss = next_token_loss(logits, targets, pad_id=-100, label_smoothing=self.config.label_smoothing)
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
        return {"image_token_loss": loss, "tokens_correct": correct, "tokens": torch.tensor(targets.numel())}

    @torch.no_grad()
    def generate_codes(self, caption_ids: Tensor, config: GenerationConfig | None = None, **options) -> Tensor:
        """Codes (B, R, h, w) for each caption, R = config.num_return; `options` override `config`
        fields (do_sample=True, temperature=, top_k=, top_p=, guidance_scale=, seed=, ...)."""
        grid = self.config.image_tokenizer.grid()
        config = dataclasses.replace(config or GenerationConfig(), **options)
        config.max_new_tokens = grid * grid
        B = caption_ids.shape[0]
        rows = config.rows(B)
        text, padding = self.encode_text(caption_ids)
        guided = config.guidance_scale != 1.0
        if guided:  # rows of the same sequences without their text come after the conditioned ones
            unconditional = self.encode_text(caption_ids, torch.ones(B, dtype=torch.bool, device=text.device))
            text, padding = torch.cat([text, unconditional[0]]), torch.cat([padding, unconditional[1]])
        step = decoder_step(self, self.embed, self.decoder, self.head, text, padding, config, 2 * rows if guided else rows)
        if guided:
            step = GuidedStep(step, config.guidance_scale)
        # no [EOS]: every image has exactly grid * grid codes
        out = generate(step, B, config, bos_id=self.bos_id, eos_id=-1, pad_id=self.bos_id, device=caption_ids.device)
        return out.ids[:, :, 1:].reshape(B, -1, grid, grid)

    @torch.no_grad()
    def generate(self, caption_ids: Tensor, config: GenerationConfig | None = None, **options) -> Tensor:
        """Pixels (B, R, 3, H, W) in [-1, 1] for each caption (see `generate_codes`)."""
        codes = self.generate_codes(caption_ids, config, **options)
        B, R, h, w = codes.shape
        pixels = self.image_tokenizer.decode(codes.view(B * R, h, w))
        return pixels.view(B, R, *pixels.shape[1:])


@register_preset
def t2i_small() -> T2IConfig:
    """The CPU default for the shapes world: 2-layer text encoder and 4-layer image-token decoder, width 192."""
    width = TransformerConfig(dim=192, depth=4, heads=4, ffn_dim=768, dropout=0.0)
    return T2IConfig(text=TextConfig(max_len=32, encoder=dataclasses.replace(width, depth=2)), decoder=width)


@register_preset
def t2i_tiny() -> T2IConfig:
    """A few-second CPU model for tests (with the vqvae-tiny tokenizer)."""
    width = TransformerConfig(dim=32, depth=1, heads=2, ffn_dim=64, dropout=0.0)
    return T2IConfig(text=TextConfig(max_len=32, encoder=width), decoder=width, image_tokenizer=vqvae_tiny())
