"""Image captioning: vision tower -> Transformer decoder -> next-token logits.

The design's cross-modal generation: the decoder's masked self-attention reads the
caption so far, its cross-attention reads the image tokens, and training uses teacher
forcing (the ground-truth prefix predicts each next token). Inference runs
autoregressively from [BOS] until [EOS] or a maximum length, reusing the KV cache.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.config import TransformerConfig, VisionConfig
from mmt.generation import DecodesWithGraphs, Generated, GenerationConfig, StepFn, generate, graphs_apply, own_step, replayed
from mmt.layers.transformer import Decoder, DecoderCache
from mmt.registry import register_model, register_preset
from mmt.text import TokenEmbedding
from mmt.vision import VisionTower


@dataclasses.dataclass
class CaptionConfig:
    """Image encoder + text decoder."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    decoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))
    vocab_size: int = 1000  # decoder vocabulary; set from the tokenizer
    max_len: int = 32  # longest caption in tokens, [BOS] and [EOS] included (tasks raise it to fit their captions)
    pad_id: int = 0  # [PAD]: ignored by the loss
    bos_id: int = 5  # [BOS]: first input token when generating
    eos_id: int = 6  # [EOS]: generation stops once every caption has produced it
    label_smoothing: float = 0.0  # cross-entropy label smoothing (Szegedy et al. 2016)


@register_model
class CaptionModel(DecodesWithGraphs):
    model_type = "caption"
    config_class = CaptionConfig

    def __init__(self, cfg: CaptionConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.decoder.dim
        self.vision = VisionTower(cfg.vision)
        self.embed = TokenEmbedding(cfg.vocab_size, dim, cfg.max_len, pad_id=cfg.pad_id)
        self.decoder = Decoder(cfg.decoder, context_dim=cfg.vision.encoder.dim)
        self.lm_head = nn.Linear(dim, cfg.vocab_size)

    def encode_images(self, pixels: Tensor, pixel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> image_tokens (B, N, Dv), image_padding_mask (B, N)."""
        return self.vision(pixels, pixel_mask)

    def next_token_logits(
        self,
        ids: Tensor,
        image_tokens: Tensor,
        image_padding_mask: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, DecoderCache | None]:
        """Logits (B, T, V) for the token after each of `ids` (B, T).

        With a cache, `ids` are only the new tokens and positions continue from
        `cache.length`; the returned cache includes them.
        """
        start = cache.length if cache is not None else 0
        hidden, cache = self.decoder(
            self.embed(ids, start),
            image_tokens,
            key_padding_mask=text_padding_mask,
            context_padding_mask=image_padding_mask,
            cache=cache,
        )
        return self.lm_head(hidden), cache

    def forward(self, pixels: Tensor, caption_ids: Tensor) -> dict[str, Tensor]:
        """Teacher-forced loss. pixels (B, C, H, W); caption_ids (B * g, T): [BOS] words [EOS]
        [PAD]..., g captions per image, image by image. Each image is encoded once and its g
        captions read its keys/values together (grouped cross-attention, no copies)."""
        image_tokens, image_padding = self.encode_images(pixels)
        inputs, targets = caption_ids[:, :-1], caption_ids[:, 1:]
        text_padding = inputs == self.config.pad_id
        logits, _ = self.next_token_logits(inputs, image_tokens, image_padding, text_padding)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=self.config.pad_id,
            label_smoothing=self.config.label_smoothing,
        )
        with torch.no_grad():  # teacher-forced next-token accuracy, for the progress bar
            real = targets != self.config.pad_id
            correct = (logits.argmax(-1) == targets) & real
        return {"caption_loss": loss, "tokens_correct": correct.sum(), "tokens": real.sum()}

    def decode_step(self, image_tokens: Tensor, image_padding_mask: Tensor | None = None) -> StepFn:
        """The step function `mmt.generation.generate` drives, for these encoded images."""

        def step(ids: Tensor, cache: DecoderCache | None) -> tuple[Tensor, DecoderCache | None]:
            logits, cache = self.next_token_logits(ids, image_tokens, image_padding_mask, cache=cache)
            return logits[:, -1], cache

        return step

    @torch.no_grad()
    def generate(self, pixels: Tensor, config: GenerationConfig | None = None, **options) -> Generated:
        """Captions for (B, C, H, W) images: greedy by default; `options` override `config`
        fields (num_beams=3, do_sample=True, top_p=0.9, ...). Ids start with [BOS]."""
        cfg = self.config
        config = dataclasses.replace(config or GenerationConfig(max_new_tokens=cfg.max_len - 1), **options)
        config.max_new_tokens = min(config.max_new_tokens, cfg.max_len - 1)  # positions end at max_len
        graphs = pixels.shape[0] > 0 and graphs_apply(config, pixels.device, self)
        if graphs:  # the image encoder too is replayed (its outputs are copied into the slot step below)
            image_tokens, image_padding = replayed(self, self.encode_images, pixels)
        else:
            image_tokens, image_padding = self.encode_images(pixels)
        if image_padding is not None and not image_padding.any():
            image_padding = None  # nothing to mask: cross-attention takes its unmasked path every step
        rows = config.rows(pixels.shape[0])
        fast = own_step(self, self.embed, self.decoder, self.lm_head, image_tokens, image_padding, config, rows, graphs)
        return generate(
            fast or self.decode_step(image_tokens, image_padding), pixels.shape[0], len(self.decoder.layers), config,
            bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id, device=pixels.device, cache=fast,
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
