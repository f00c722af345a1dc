"""Image captioning: vision tower -> Transformer decoder -> next-token logits.

The design's cross-modal generation: the decoder's masked self-attention reads the
caption so far, its cross-attention reads the image tokens, and training uses teacher
forcing (the ground-truth prefix predicts each next token). Inference runs
autoregressively from [BOS] until [EOS] or a maximum length, reusing the KV cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mmt.checkpoint import Pretrained
from mmt.config import Amount, Count, Fraction, Length, Settings, TransformerConfig, VisionConfig
from mmt.cuda_graphs import DecodesWithGraphs, replayed
from mmt.generation import Generated, GenerationConfig, Step, decoder_step, generate, graphs_apply
from mmt.layers.transformer import Decoder
from mmt.models.losses import next_token_loss
from mmt.registry import register_model, register_preset
from mmt.text import LogitsHead, TokenEmbedding
from mmt.vision import VisionTower


@dataclasses.dataclass
class CaptionConfig(Settings):
    """Image encoder + text decoder."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    decoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))
    vocab_size: Count = 1000  # decoder vocabulary; set from the tokenizer
    max_len: Length = 32  # longest caption in tokens, [BOS] and [EOS] included (tasks raise it to fit their captions)
    pad_id: Amount = 0  # [PAD]: ignored by the loss
    bos_id: int = 5  # [BOS]: first input token when generating
    eos_id: int = 6  # [EOS]: generation stops once every caption has produced it
    label_smoothing: Fraction = 0.0  # cross-entropy label smoothing (Szegedy et al. 2016)


@register_model
class CaptionModel(Pretrained, DecodesWithGraphs):
    model_type = "caption"
    config_class = CaptionConfig

    def __init__(self, cfg: CaptionConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.decoder.dim
        self.vision = VisionTower(cfg.vision)
        self.embed = TokenEmbedding(cfg.vocab_size, dim, cfg.max_len, pad_id=cfg.pad_id)
        self.decoder = Decoder(cfg.decoder, context_dim=cfg.vision.encoder.dim)
        self.lm_head = LogitsHead(dim, cfg.vocab_size)

    def encode_images(self, pixels: Tensor, pixel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> image_tokens (B, N, Dv), image_padding_mask (B, N)."""
        return self.vision(pixels, pixel_mask)

    def next_token_logits(
        self, ids: Tensor, image_tokens: Tensor, image_padding_mask: Tensor | None = None, text_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for the token after each of `ids` (B, T) (teacher forcing)."""
        hidden = self.decoder(
            self.embed(ids), image_tokens, key_padding_mask=text_padding_mask, context_padding_mask=image_padding_mask
        )
        return self.lm_head(hidden)

    def forward(self, pixels: Tensor, caption_ids: Tensor) -> dict[str, Tensor]:
        """Teacher-forced loss. pixels (B, C, H, W); caption_ids (B * g, T): [BOS] words [EOS]
        [PAD]..., g captions per image, image by image. Each image is encoded once and its g
        captions read its keys/values together (shared contexts, no copies)."""
        image_tokens, image_padding = self.encode_images(pixels)
        inputs, targets = caption_ids[:, :-1], caption_ids[:, 1:]
        logits = self.next_token_logits(inputs, image_tokens, image_padding, inputs == self.config.pad_id)
        loss = next_token_loss(logits, targets, self.config.pad_id, self.config.label_smoothing)
        with torch.no_grad():  # teacher-forced next-token accuracy, for the progress bar
            real = targets != self.config.pad_id
            correct = (logits.argmax(-1) == targets) & real
        return {"caption_loss": loss, "tokens_correct": correct.sum(), "tokens": real.sum()}

    def decode_step(self, image_tokens: Tensor, image_padding: Tensor | None, config: GenerationConfig, rows: int) -> Step:
        """The step `mmt.generation.generate` drives for `rows` sequences about these encoded images."""
        return decoder_step(self, self.embed, self.decoder, self.lm_head, image_tokens, image_padding, config, rows)

    @torch.no_grad()
    def generate(self, pixels: Tensor, config: GenerationConfig | None = None, **options) -> Generated:
        """Captions for (B, C, H, W) images: greedy by default; `options` override `config`
        fields (num_beams=3, do_sample=True, top_p=0.9, ...). Ids start with [BOS]."""
        cfg = self.config
        config = dataclasses.replace(config or GenerationConfig(max_new_tokens=cfg.max_len - 1), **options)
        config.max_new_tokens = min(config.max_new_tokens, cfg.max_len - 1)  # positions end at max_len
        if pixels.shape[0] > 0 and graphs_apply(config, pixels, self):  # the image encoder is replayed too
            image_tokens, image_padding = replayed(self, self.encode_images, pixels)
        else:
            image_tokens, image_padding = self.encode_images(pixels)
        if image_padding is not None and not image_padding.any():
            image_padding = None  # nothing to mask: cross-attention takes its unmasked path every step
        step = self.decode_step(image_tokens, image_padding, config, config.rows(pixels.shape[0]))
        return generate(
            step, pixels.shape[0], config, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id, device=pixels.device
        )


@register_preset
def caption_tiny() -> CaptionConfig:
    """A few-second CPU model for demos and tests."""
    width = TransformerConfig(dim=64, depth=2, heads=4, ffn_dim=128, dropout=0.0)
    vision = VisionConfig(image_size=32, conv_widths=(32, 64), encoder=dataclasses.replace(width, depth=1))
    return CaptionConfig(vision=vision, decoder=width, max_len=16)


@register_preset
def caption_small() -> CaptionConfig:
    """The CPU default for the shapes world: conv stem on 64x64 images (8x8 tokens), 2-layer
    image encoder, 3-layer decoder, width 128."""
    width = TransformerConfig(dim=128, depth=3, heads=4, ffn_dim=512, dropout=0.0)
    vision = VisionConfig(
        image_size=64,
        conv_widths=(32, 64),
        conv_strides=(2,),
        conv_norm="batch",
        positions="sincos",
        token_norm=True,
        encoder=dataclasses.replace(width, depth=2),
    )
    return CaptionConfig(vision=vision, decoder=width, max_len=32)
