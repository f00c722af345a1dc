"""Image-text retrieval and multimodal pretraining: one model, four loss terms.

- Dual encoder (ITC): the image tower's tokens, mean-pooled, and the text tower's [CLS]
  state are projected and L2-normalised; the symmetric contrastive loss (Radford et al.
  2021) with a learnable temperature pulls each image towards its captions. Under DDP the
  loss reads the embeddings of every rank (all-gather with gradient), so two processes
  optimise the same loss as one process holding both halves of the batch.
- Matching (ITM): a fusion encoder runs the text tokens through self-attention,
  cross-attention to the image tokens and feed-forward layers (a decoder stack without the
  causal mask, the same fusion the VQA model uses) and classifies [CLS] as match / no
  match. Negatives are drawn with probability softmax(cosine similarity), every positive
  excluded: a mild preference for hard negatives (Li et al. 2021 scale the similarities by
  the contrastive temperature, which makes them harder). At evaluation ITM re-ranks the contrastive top-k.
- Masked language modelling (MLM, pretraining): 15% of the caption's tokens are masked
  and predicted through the fusion encoder, so filling them in needs the image.
- Captioning / causal LM (LM, pretraining): a decoder over the image tokens, named as in
  `CaptionModel` (`embed`, `decoder`, `lm_head`) so a caption run can start from it.

A term's module exists only when its weight is non-zero; pretraining is this model with
all four terms on, and `--init` hands its towers and heads to VQA, captioning and
retrieval runs by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmt.checkpoint import Pretrained
from mmt.config import Amount, Count, Fraction, Length, NonNegative, Positive, Settings, TextConfig, TransformerConfig, VisionConfig
from mmt.distributed import gather_plain, gather_with_grad, rank_offset
from mmt.layers.transformer import Decoder
from mmt.models.losses import next_token_loss
from mmt.registry import register_model, register_preset
from mmt.text import LogitsHead, TextTower, TokenEmbedding
from mmt.vision import VisionTower


@dataclasses.dataclass
class LossWeights(Settings):
    """Weight of each pretraining term in the summed loss; 0 switches the term (and its module) off."""

    itc: NonNegative = 1.0  # image-text contrastive
    itm: NonNegative = 1.0  # image-text matching with hard negatives
    mlm: NonNegative = 0.0  # masked language modelling conditioned on the image
    lm: NonNegative = 0.0  # captioning (causal language modelling over the image)


@dataclasses.dataclass
class RetrievalConfig(Settings):
    """Image tower + text tower, projected for contrast; fusion encoder for matching / MLM; caption decoder for LM."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: Count = 128  # width of the shared, L2-normalised embedding space
    temperature: Positive = 0.07  # initial softmax temperature of the contrastive loss (learned)
    max_logit_scale: Positive = 100.0  # 1 / temperature is clamped below this
    fusion_encoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))  # ITM, MLM
    decoder: TransformerConfig = dataclasses.field(default_factory=lambda: TransformerConfig(depth=2))  # LM
    caption_max_len: Length = 48  # LM: longest caption in tokens, [BOS] and [EOS] included
    losses: LossWeights = dataclasses.field(default_factory=LossWeights)
    mask_prob: Fraction = 0.15  # MLM: share of caption tokens masked (80% [MASK], 10% random, 10% kept)
    rerank_k: Amount = 16  # evaluation: ITM re-scores this many contrastive candidates
    # re-ranking score: ITM log-odds plus the contrastive logit (scale x cosine), both log-odds
    # of a match; False: ITM log-odds alone
    rerank_adds_contrastive: bool = True
    mask_id: Amount = 4  # [MASK]
    special_ids: tuple[Amount, ...] = (0, 1, 2, 3, 4, 5, 6)  # never masked and never drawn as random replacements
    # a text's embedding is read from: its first token ([CLS]), the mean of its tokens (as
    # sentence-transformers pools), or its last real token (CLIP's end-of-text)
    text_pool: Literal["cls", "mean", "last"] = "cls"
    image_pool: Literal["mean", "first"] = "mean"  # an image's: the mean of its tokens, or the first (a class token)
    projection_bias: bool = True  # the projections into the shared space have biases (CLIP's have none)


def contrastive_loss(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, image_ids: Tensor | None = None, text_ids: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE over this rank's rows against every rank's columns.

    image_emb (B, E) and text_emb (B, E) are normalised; row i of each is a matching pair
    unless ids say otherwise: `image_ids` / `text_ids` (B,) name the image each row shows /
    describes, and every column of the same image is a positive (soft target spread
    evenly over them), which keeps the loss right when a batch holds an image twice.

    loss = (CE(scale * I T_all^T, targets) + CE(scale * T I_all^T, targets)) / 2, rows averaged.
    Under DDP each rank's loss averages its own rows; DDP's gradient average then equals
    the gradient of the whole batch's loss.
    """
    B = image_emb.shape[0]
    if image_ids is None:
        image_ids = torch.arange(B, device=image_emb.device) + rank_offset(B)
    if text_ids is None:
        text_ids = image_ids
    all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)
    all_image_ids, all_text_ids = gather_plain(image_ids), gather_plain(text_ids)
    scale = logit_scale.float()
    i2t = scale * image_emb.float() @ all_texts.float().T  # (B, B_all)
    t2i = scale * text_emb.float() @ all_images.float().T

    def soft_ce(logits: Tensor, positive: Tensor) -> Tensor:
        targets = positive.float() / positive.sum(1, keepdim=True)
        return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()

    return 0.5 * (soft_ce(i2t, image_ids[:, None] == all_text_ids[None]) + soft_ce(t2i, text_ids[:, None] == all_image_ids[None]))


def sample_hard_negatives(similarity: Tensor, positive: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each row, one column drawn with probability softmax(similarity) over the
    non-positive columns (positives get probability zero). similarity, positive: (R, C).
    Every row needs at least one non-positive column. The ITM loss passes raw cosines
    (in [-1, 1], not scaled by the contrastive temperature), which prefers similar
    negatives only mildly; scaling them would make the negatives harder."""
    if (positive.all(1)).any():
        row = int(positive.all(1).nonzero()[0])
        raise ValueError(f"row {row} has no negative to sample: every column is a positive")
    weights = torch.softmax(similarity.float().masked_fill(positive, -math.inf), dim=1)
    weights = weights.masked_fill(positive, 0.0) + (~positive).float() * 1e-12  # keep rows valid when softmax underflows
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@register_model
class RetrievalModel(Pretrained, nn.Module):
    model_type = "retrieval"
    config_class = RetrievalConfig

    def __init__(self, cfg: RetrievalConfig):
        super().__init__()
        self.config = cfg
        vdim, tdim = cfg.vision.encoder.dim, cfg.text.encoder.dim
        self.vision = VisionTower(cfg.vision)
        self.text = TextTower(cfg.text)
        if cfg.image_pool == "first" and not cfg.vision.class_token:
            raise ValueError("image_pool='first' reads a class token: set vision.class_token=true")
        self.image_proj = nn.Linear(vdim, cfg.embed_dim, bias=cfg.projection_bias)
        self.text_proj = nn.Linear(tdim, cfg.embed_dim, bias=cfg.projection_bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        w = cfg.losses
        if w.itm and not w.itc:
            raise ValueError("losses.itm needs losses.itc: matching draws its hard negatives from the contrastive similarities")
        # without the contrastive term the projections and temperature get no gradient (DDP must be told)
        self.leaves_parameters_unused = not w.itc
        if w.itm or w.mlm:
            if cfg.fusion_encoder.dim != tdim:
                raise ValueError(f"fusion_encoder.dim={cfg.fusion_encoder.dim} must equal text.encoder.dim={tdim}")
            self.fusion = Decoder(cfg.fusion_encoder, context_dim=vdim, causal=False)
        if w.itm:
            self.itm_head = nn.Linear(tdim, 2)
        if w.mlm:
            self.mlm_head = nn.Sequential(nn.Linear(tdim, tdim), nn.GELU(), nn.LayerNorm(tdim), nn.Linear(tdim, cfg.text.vocab_size))
        if w.lm:  # the names CaptionModel uses
            self.embed = TokenEmbedding(cfg.text.vocab_size, cfg.decoder.dim, cfg.caption_max_len, pad_id=cfg.text.pad_id)
            self.decoder = Decoder(cfg.decoder, context_dim=vdim)
            self.lm_head = LogitsHead(cfg.decoder.dim, cfg.text.vocab_size)

    # ------------------------------------------------------------------ embeddings

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def image_embedding(self, image_tokens: Tensor, image_padding: Tensor) -> Tensor:
        if self.config.image_pool == "first":
            pooled = image_tokens[:, 0]
        else:
            keep = (~image_padding).unsqueeze(-1).to(image_tokens.dtype)
            pooled = (image_tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
        return F.normalize(self.image_proj(pooled).float(), dim=-1)

    def text_embedding(self, text_tokens: Tensor, text_padding: Tensor | None = None) -> Tensor:
        """text_tokens (B, T, D), text_padding (B, T) True at padding (needed unless text_pool is "cls")."""
        pool = self.config.text_pool
        if pool == "cls":
            pooled = text_tokens[:, 0]
        elif text_padding is None:
            raise ValueError(f"text_pool={pool!r} needs the texts' padding mask")
        elif pool == "mean":
            keep = (~text_padding).unsqueeze(-1).to(text_tokens.dtype)
            pooled = (text_tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
        else:  # the last real token of each row
            last = (~text_padding).long().cumsum(1).argmax(1)  # (B,) the first position holding the row's count of real tokens
            pooled = text_tokens[torch.arange(len(text_tokens), device=text_tokens.device), last]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def embed_images(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, embed_dim), unit length."""
        return self.image_embedding(*self.vision(pixels))

    def embed_texts(self, text_ids: Tensor) -> Tensor:
        """(B, T) ids, [CLS] first -> (B, embed_dim), unit length."""
        return self.text_embedding(*self.text(text_ids))

    # ------------------------------------------------------------------ matching

    def fuse(
        self, text_tokens: Tensor, text_padding: Tensor, image_tokens: Tensor, image_padding: Tensor, first: int | None = None
    ) -> Tensor:
        """Text tokens after attending to their image (row i of the text to row i of the image);
        first=1 computes only the [CLS] state in the last layer (what the matching head reads)."""
        padding = image_padding if image_padding.any() else None
        return self.fusion(text_tokens, image_tokens, key_padding_mask=text_padding, context_padding_mask=padding, first=first)

    # ------------------------------------------------------------------ losses

    def mask_tokens(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """BERT masking: (masked ids, targets with -100 where not masked). At least one token per row."""
        cfg = self.config
        maskable = ~torch.isin(ids, torch.tensor(cfg.special_ids, device=ids.device))
        chosen = (torch.rand(ids.shape, device=ids.device) < cfg.mask_prob) & maskable
        # rows where chance picked nothing get one maskable token, so every caption teaches something
        empty = ~chosen.any(1) & maskable.any(1)
        if empty.any():
            pick = torch.multinomial(maskable[empty].float(), 1).squeeze(1)
            chosen[empty.nonzero().squeeze(1), pick] = True
        targets = ids.masked_fill(~chosen, -100)
        roll = torch.rand(ids.shape, device=ids.device)
        masked = ids.masked_fill(chosen & (roll < 0.8), cfg.mask_id)
        randoms = self.random_words(ids.shape, ids.device)
        masked = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), randoms, masked)
        return masked, targets

    def random_words(self, shape: torch.Size, device: torch.device) -> Tensor:
        """Ids drawn evenly from the vocabulary's non-special ids. With mmt's own tokenizers
        (special ids 0..n-1) this is randint(n, vocab_size), the draw it always was; a BERT
        vocabulary has its special tokens elsewhere (100..103): the k-th non-special id then."""
        cfg = self.config
        special = sorted(set(cfg.special_ids))
        if special == list(range(len(special))):
            return torch.randint(len(special), cfg.text.vocab_size, shape, device=device)
        words = torch.ones(cfg.text.vocab_size, dtype=torch.bool, device=device)
        words[torch.tensor(special, device=device)] = False
        allowed = words.nonzero().squeeze(1)
        return allowed[torch.randint(len(allowed), shape, device=device)]

    def forward(
        self, pixels: Tensor, text_ids: Tensor, image_ids: Tensor | None = None, caption_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Losses for B image-text pairs: pixels (B, C, H, W), text_ids (B, T) with [CLS] first,
        image_ids (B,) naming each row's image (default: all different), caption_ids (B, L)
        [BOS] caption [EOS] for the LM term."""
        w = self.config.losses
        B = pixels.shape[0]
        if image_ids is None:  # all different, across ranks too
            image_ids = torch.arange(B, device=pixels.device) + rank_offset(B)
        image_tokens, image_padding = self.vision(pixels)
        text_tokens, text_padding = self.text(text_ids)
        out: dict[str, Tensor] = {}
        image_emb = self.image_embedding(image_tokens, image_padding)
        text_emb = self.text_embedding(text_tokens, text_padding)
        if w.itc:
            out["itc_loss"] = w.itc * contrastive_loss(image_emb, text_emb, self.scale(), image_ids)
            with torch.no_grad():  # text -> image accuracy within the whole batch (all processes), for the progress bar
                all_images, all_ids = gather_plain(image_emb.detach()), gather_plain(image_ids)
                best = (text_emb @ all_images.T).argmax(1)
                out["pairs_correct"] = (all_ids[best] == image_ids).sum()
        if w.itm:
            out["itm_loss"] = w.itm * self._itm_loss(image_tokens, image_padding, text_tokens, text_padding, image_emb, text_emb, image_ids)
        if w.mlm:
            masked, targets = self.mask_tokens(text_ids)
            masked_tokens, _ = self.text(masked, text_padding)
            logits = self.mlm_head(self.fuse(masked_tokens, text_padding, image_tokens, image_padding))
            out["mlm_loss"] = w.mlm * F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        if w.lm:
            if caption_ids is None:
                raise ValueError("the LM term needs caption_ids ([BOS] caption [EOS])")
            inputs, targets = caption_ids[:, :-1], caption_ids[:, 1:]
            pad = self.config.text.pad_id
            hidden = self.decoder(
                self.embed(inputs), image_tokens, key_padding_mask=inputs == pad,
                context_padding_mask=image_padding if image_padding.any() else None,
            )
            out["lm_loss"] = w.lm * next_token_loss(self.lm_head(hidden), targets, pad)
        return out

    def _itm_loss(self, image_tokens, image_padding, text_tokens, text_padding, image_emb, text_emb, image_ids) -> Tensor:
        """Cross-entropy of match / no match over B positives, B hard negative texts (one per
        image) and B hard negative images (one per text), all from this batch."""
        with torch.no_grad():
            similarity = image_emb @ text_emb.T  # (B images, B texts)
            positive = image_ids[:, None] == image_ids[None]
            if positive.all():
                raise ValueError(
                    f"image-text matching needs at least 2 different images in each process's batch (got {len(image_ids)} "
                    "row(s) of one image): raise train.batch_size, or lower the number of processes or train.accumulate"
                )
            neg_text = sample_hard_negatives(similarity, positive)  # for each image
            neg_image = sample_hard_negatives(similarity.T, positive.T)  # for each text
        texts = torch.cat([text_tokens, text_tokens[neg_text], text_tokens])
        text_pad = torch.cat([text_padding, text_padding[neg_text], text_padding])
        images = torch.cat([image_tokens, image_tokens, image_tokens[neg_image]])
        image_pad = torch.cat([image_padding, image_padding, image_padding[neg_image]])
        logits = self.itm_head(self.fuse(texts, text_pad, images, image_pad, first=1)[:, 0]).float()
        B = len(image_ids)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)


def _width(dim: int, depth: int, heads: int = 4) -> TransformerConfig:
    return TransformerConfig(dim=dim, depth=depth, heads=heads, ffn_dim=4 * dim, dropout=0.0)


@register_preset
def retrieval_small() -> RetrievalConfig:
    """The CPU default for the shapes world: conv stem on 64x64 images (8x8 tokens), 2-layer
    image and text encoders, 2-layer fusion for matching, width 128."""
    dim = 128
    vision = VisionConfig(
        image_size=64, conv_widths=(32, 64), conv_strides=(2,), conv_norm="batch", positions="sincos",
        token_norm=True, encoder=_width(dim, 2),
    )
    return RetrievalConfig(
        vision=vision, text=TextConfig(max_len=48, encoder=_width(dim, 2)), embed_dim=128,
        fusion_encoder=_width(dim, 2), decoder=_width(dim, 3), losses=LossWeights(itc=1.0, itm=1.0),
    )


@register_preset
def pretrain_small() -> RetrievalConfig:
    """retrieval-small with all four pretraining terms: ITC + ITM + MLM + captioning LM."""
    cfg = retrieval_small()
    cfg.losses = LossWeights(itc=1.0, itm=1.0, mlm=1.0, lm=1.0)
    return cfg


@register_preset
def retrieval_tiny() -> RetrievalConfig:
    """A few-second CPU model for tests: 32x32 images, width 64."""
    vision = VisionConfig(image_size=32, conv_widths=(16, 32), encoder=_width(64, 1))
    return RetrievalConfig(
        vision=vision, text=TextConfig(max_len=48, encoder=_width(64, 1)), embed_dim=32,
        fusion_encoder=_width(64, 1), decoder=_width(64, 1), losses=LossWeights(itc=1.0, itm=1.0, mlm=1.0, lm=1.0),
    )
