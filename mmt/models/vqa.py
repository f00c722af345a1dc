"""Visual question answering: image tower + question tower + fusion + answer classifier.

Two fusion styles, as the design discusses them:
- "joint" (single stream, ViLT-style): one encoder over [CLS] + question tokens + image
  tokens, with a learned modality embedding on each; the [CLS] state answers.
- "cross" (cross-modal attention): the question tokens pass through layers of
  self-attention, cross-attention to the image tokens, and feed-forward (a decoder layer
  without the causal mask); the question's [CLS] state answers. Each image is encoded
  once and its cross-attention keys/values are shared by all its questions, which makes
  this the fast choice when images carry many questions.

Answers are classes over a vocabulary built from the training answers. Targets are either
class ids (cross-entropy) or soft scores per answer (B, A) as in VQA v2, which train with
binary cross-entropy (Teney et al. 2018).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.checkpoint import Pretrained
from mmt.config import Count, Length, Settings, TextConfig, TransformerConfig, VisionConfig
from mmt.cuda_graphs import DecodesWithGraphs
from mmt.generation import Generated, GenerationConfig, decoder_step, generate
from mmt.layers.transformer import Decoder, Encoder, init_weights
from mmt.models.fusion import CrossFusion, copy_rows
from mmt.models.losses import next_token_loss
from mmt.registry import register_model, register_preset
from mmt.text import LogitsHead, TextTower, TokenEmbedding
from mmt.vision import VisionTower, token_coordinates


@dataclasses.dataclass
class VQAConfig(Settings):
    """Image tower + question tower + fusion + answer classifier."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    fusion: Literal["joint", "cross"] = "cross"  # single-stream encoder, or question->image cross-attention
    fusion_encoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))
    # cross fusion: from the second fusion layer on, each head's attention to the image tokens
    # is biased by -scale * (distance in tokens)^2 from where that head looked in the layer
    # before (a learned scale per head and layer, zero at the start; mmt.models.fusion)
    focus_bias: bool = False
    # with focus_bias: each question also sets its own scale per head, and how strongly each
    # head avoids (or seeks) the image tokens it looked at in the layer before (a linear map
    # of the question's state, zero at the start; mmt.models.fusion)
    focus_per_query: bool = False
    head: Literal["classify", "generate"] = "classify"  # answer classifier, or a decoder that writes the answer
    num_answers: Count = 10  # classify: size of the answer vocabulary; set from the training answers
    head_hidden: Count = 256  # classify: hidden width of the two-layer answer classifier
    answer_decoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=1))  # generate
    answer_max_len: Length = 8  # generate: longest answer in tokens, [BOS] and [EOS] included (tasks raise it to fit)
    init: Literal["trunc_normal", "torch"] = "torch"  # weight init: N(0, 0.02) (BERT/ViT) or torch defaults


@register_model
class VQAModel(Pretrained, DecodesWithGraphs):
    model_type = "vqa"
    config_class = VQAConfig

    def __init__(self, cfg: VQAConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.fusion_encoder.dim
        for name, tower in (("vision", cfg.vision.encoder), ("text", cfg.text.encoder)):
            if tower.dim != dim:
                raise ValueError(f"{name}.encoder.dim={tower.dim} must equal fusion_encoder.dim={dim}")
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        if cfg.focus_per_query and not cfg.focus_bias:
            raise ValueError("model.focus_per_query needs model.focus_bias=true (it refines the focus bias)")
        if cfg.fusion == "joint":
            self.modality = nn.Parameter(torch.randn(2, dim) * 0.02)  # 0: text, 1: image
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.fusion = Encoder(cfg.fusion_encoder)
        else:
            self.fusion = CrossFusion(cfg.fusion_encoder, cfg.focus_bias, cfg.focus_per_query)
        if cfg.focus_bias:
            if cfg.fusion != "cross":
                raise ValueError("model.focus_bias needs model.fusion='cross' (it biases the question's attention to the image)")
            if cfg.vision.class_token:
                raise ValueError("model.focus_bias needs image tokens on a grid: a class token (vision.class_token, ViT/CLIP towers) has no place on it")
            positions = token_coordinates(*self.vision.grid_size(cfg.vision.image_size)).float()  # (row, col), row-major
            self.register_buffer("image_positions", positions, persistent=False)
        if cfg.head == "classify":
            self.head = nn.Sequential(
                nn.Linear(dim, cfg.head_hidden), nn.GELU(), nn.LayerNorm(cfg.head_hidden), nn.Linear(cfg.head_hidden, cfg.num_answers)
            )
        else:  # answers are text in the question vocabulary: [BOS] answer words [EOS]
            text = cfg.text
            self.answer_embed = TokenEmbedding(text.vocab_size, cfg.answer_decoder.dim, cfg.answer_max_len, pad_id=text.pad_id)
            self.answer_decoder = Decoder(cfg.answer_decoder, context_dim=dim)
            self.lm_head = LogitsHead(cfg.answer_decoder.dim, text.vocab_size)
        if cfg.init == "trunc_normal":
            init_weights(self)

    def fuse(
        self, image_tokens: Tensor, image_padding: Tensor, question_ids: Tensor, image_index: Tensor | None = None,
        first: int | None = None, distinct_once: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Fused token states (Q, S, D) and their padding mask (Q, S) for Q questions; token 0
        is the [CLS] state the classifier reads. joint: [CLS] + question + image tokens;
        cross: the question tokens after attending to the image.

        Args:
            image_tokens: (I, N, D) encoded images; image_padding: (I, N).
            question_ids: (Q, T) token ids, [CLS] first.
            image_index: (Q,) which image each question is about (default: question i is
                about image i).
            first: return only the first `first` token states; the last fusion layer then
                computes no others (the classifier reads only [CLS]: first=1).
            distinct_once: compute each distinct question once (False: every row as it is, the
                same arithmetic without the data-dependent choice; what an exported graph runs).
        """
        # The text tower does not see the image, so each distinct question is encoded once
        # (datasets repeat questions across images; a batch of VQA often holds few distinct
        # ones), and so is the cross fusion's first self-attention, which sees only the
        # question. `inverse` then maps each question to its distinct row.
        Q = question_ids.shape[0]  # (not len(): a traced graph keeps the shape, a number it would fix)
        unique_ids, inverse = torch.unique(question_ids, dim=0, return_inverse=True) if distinct_once else (question_ids, None)
        if inverse is None or 2 * len(unique_ids) > Q:  # few repeats: encoding all is cheaper than copying
            text_tokens, text_padding = self.text(question_ids)
            inverse = None
        else:
            text_tokens, text_padding = self.text(unique_ids)  # (U, T, D)
        D = text_tokens.shape[-1]
        if inverse is not None and (self.config.fusion == "joint" or not len(self.fusion.layers)):
            text_tokens, text_padding, inverse = copy_rows(text_tokens, inverse), text_padding[inverse], None  # a copy per question
        shared = image_index is not None and _questions_per_image(image_index, image_tokens.shape[0])
        if self.config.fusion == "joint":
            if shared:  # g consecutive questions per image: repeat by expanding (backward is a sum)
                I, N, _ = image_tokens.shape
                image_tokens = image_tokens[:, None].expand(I, shared, N, D).reshape(Q, N, D)
                image_padding = image_padding.repeat_interleave(shared, dim=0)
            elif image_index is not None:
                image_tokens, image_padding = image_tokens.index_select(0, image_index), image_padding[image_index]
            tokens = torch.cat(
                [self.cls.expand(Q, -1, -1), text_tokens + self.modality[0], image_tokens + self.modality[1]], dim=1
            )  # (Q, 1 + T + N, D)
            padding = torch.cat([text_padding.new_zeros(Q, 1), text_padding, image_padding], dim=1)
            fused = self.fusion(tokens, key_padding_mask=padding, first=first)
            return fused, padding[:, :first]
        # cross: project each image's keys/values once per layer. When each image's questions
        # are consecutive and equally many, attention takes them shared (no copies at all);
        # otherwise each question gets its image's keys/values.
        image_kv, padding = self.fusion.project_context(image_tokens), image_padding
        if image_index is not None and not shared:
            image_kv, padding = [kv.select(image_index) for kv in image_kv], image_padding[image_index]
        positions = None
        if self.config.focus_bias:
            positions = self.image_positions
            if image_tokens.shape[1] != len(positions):
                raise ValueError(
                    f"focus bias: {image_tokens.shape[1]} image tokens, but the model's {self.config.vision.image_size}-pixel "
                    f"images make {len(positions)}"
                )
        fused = self.fusion(
            text_tokens, image_kv, text_padding=text_padding, image_padding=padding, first=first, row_index=inverse,
            positions=positions,
        )
        if inverse is not None:
            text_padding = text_padding[inverse]
        return fused, text_padding[:, :first]

    def answer_logits(
        self, pixels: Tensor, question_ids: Tensor, image_index: Tensor | None = None, pixel_mask: Tensor | None = None,
        distinct_once: bool = True,
    ) -> Tensor:
        """(Q, num_answers) logits of the classifier head. pixels: (I, C, H, W); question_ids: (Q, T);
        `distinct_once` as in `fuse`."""
        image_tokens, image_padding = self.vision(pixels, pixel_mask)
        fused, _ = self.fuse(image_tokens, image_padding, question_ids, image_index, first=1, distinct_once=distinct_once)
        return self.head(fused[:, 0])

    def answer_token_logits(self, answer_ids: Tensor, fused: Tensor, fused_padding: Tensor) -> Tensor:
        """Generative head: logits (Q, T, V) of each next answer token, attending to the fused states
        (teacher forcing)."""
        return self.lm_head(self.answer_decoder(self.answer_embed(answer_ids), fused, context_padding_mask=fused_padding))

    def forward(
        self, pixels: Tensor, question_ids: Tensor, answers: Tensor, image_index: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Losses for a batch. classify: `answers` are class ids (Q,) or soft scores (Q, num_answers);
        generate: `answers` are answer token ids (Q, A), [BOS] answer [EOS] [PAD]..."""
        image_tokens, image_padding = self.vision(pixels)
        first = 1 if self.config.head == "classify" else None  # the classifier reads only [CLS]
        fused, fused_padding = self.fuse(image_tokens, image_padding, question_ids, image_index, first)
        if self.config.head == "generate":
            pad = self.config.text.pad_id
            inputs, targets = answers[:, :-1], answers[:, 1:]
            logits = self.answer_token_logits(inputs, fused, fused_padding)
            loss = next_token_loss(logits, targets, pad)
            # an answer counts as right when every token is the argmax given the true prefix:
            # exactly the case where greedy decoding writes it
            right = ((logits.argmax(-1) == targets) | (targets == pad)).all(1)
            return {"answer_loss": loss, "answers_correct": right.sum().detach()}
        logits = self.head(fused[:, 0])
        if answers.dtype.is_floating_point:
            # soft VQA targets: per-answer binary cross-entropy, summed over answers
            loss = F.binary_cross_entropy_with_logits(logits.float(), answers, reduction="sum") / len(answers)
        else:
            loss = F.cross_entropy(logits.float(), answers)
        return {"answer_loss": loss, "answer_logits": logits.detach()}

    @torch.no_grad()
    def generate_answers(
        self, pixels: Tensor, question_ids: Tensor, image_index: Tensor | None = None, config: GenerationConfig | None = None,
        *, bos_id: int = 5, eos_id: int = 6,
    ) -> Generated:
        """Generative head: answer text ids (Q, R, L) for each question, greedy by default."""
        if self.config.head != "generate":
            raise ValueError("generate_answers needs a model with head='generate'")
        config = config or GenerationConfig()
        config = dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, self.config.answer_max_len - 1))
        image_tokens, image_padding = self.vision(pixels)
        fused, fused_padding = self.fuse(image_tokens, image_padding, question_ids, image_index)
        rows = config.rows(len(question_ids))
        step = decoder_step(self, self.answer_embed, self.answer_decoder, self.lm_head, fused, fused_padding, config, rows)
        return generate(
            step, len(question_ids), config, bos_id=bos_id, eos_id=eos_id, pad_id=self.config.text.pad_id, device=pixels.device
        )


def _questions_per_image(image_index: Tensor, num_images: int) -> int:
    """g when image_index is [0]*g + [1]*g + ... + [I-1]*g, else 0."""
    Q = image_index.shape[0]
    if Q % num_images:
        return 0
    g = Q // num_images
    expected = torch.arange(num_images, device=image_index.device).repeat_interleave(g)
    return g if torch.equal(image_index, expected) else 0


def _transformer(dim: int, depth: int, heads: int, dropout: float) -> TransformerConfig:
    return TransformerConfig(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, dropout=dropout)


def _conv_vision(dim: int, depth: int, heads: int, dropout: float, widths: tuple[int, ...]) -> VisionConfig:
    # BatchNorm in the stem and fixed 2-D sinusoidal positions: on Sort-of-CLEVR a GroupNorm
    # stem left shape questions at chance for thousands of steps, and learned positions
    # were slower to pick up left/top (docs/lab-notes.md).
    return VisionConfig(
        image_size=75,
        conv_widths=widths,
        conv_strides=(2,) * (len(widths) - 1),
        conv_norm="batch",
        positions="sincos",
        token_norm=True,
        encoder=_transformer(dim, depth, heads, dropout),
    )


@register_preset
def vqa_small() -> VQAConfig:
    """The CPU default: conv stem, 4-layer image encoder, 1-layer question encoder, 2 cross-fusion layers."""
    dim = 128
    return VQAConfig(
        vision=_conv_vision(dim, 4, 4, 0.0, (32, 64)),
        text=TextConfig(max_len=24, encoder=_transformer(dim, 1, 4, 0.0)),
        fusion="cross",
        fusion_encoder=_transformer(dim, 2, 4, 0.0),
        head_hidden=256,
    )


@register_preset
def vqa_fast() -> VQAConfig:
    """The Sort-of-CLEVR default: a small conv stem to a 10x10 grid of width-64 tokens (on
    75x75 images each object centre falls in its own token), one image-encoder layer with a
    learned bias per relative offset between tokens, a 1-layer question encoder and 2
    cross-fusion layers, the second with a focus bias (each head drawn towards or away from
    where it looked in the first, by a scale each question sets, and kept off or on the
    tokens it looked at there): cheap steps, so that a CPU run can take thousands of them
    (docs/lab-notes.md)."""
    dim = 64
    vision = _conv_vision(dim, 1, 4, 0.0, (24, 24))
    vision.relative_bias = True
    cfg = VQAConfig(
        vision=vision,
        text=TextConfig(max_len=24, encoder=_transformer(dim, 1, 4, 0.0)),
        fusion="cross",
        fusion_encoder=_transformer(dim, 2, 4, 0.0),
        focus_bias=True,
        focus_per_query=True,
        head_hidden=256,
    )
    return cfg


@register_preset
def vqa_joint_small() -> VQAConfig:
    """Single-stream variant of vqa-small: [CLS] + question + image tokens in one 4-layer encoder."""
    cfg = vqa_small()
    cfg.fusion = "joint"
    cfg.vision.encoder.depth = cfg.text.encoder.depth = 0  # the towers only embed; the joint encoder does the rest
    cfg.fusion_encoder.depth = 4
    return cfg


@register_preset
def seed_vqa() -> VQAConfig:
    """The design's example: conv stem + Transformer, hidden 512, 6 layers, 8 heads, dropout 0.1."""
    dim = 512
    return VQAConfig(
        vision=_conv_vision(dim, 0, 8, 0.1, (64, 128)),
        text=TextConfig(max_len=24, encoder=_transformer(dim, 0, 8, 0.1)),
        fusion="joint",
        fusion_encoder=_transformer(dim, 6, 8, 0.1),
        head_hidden=512,
    )
