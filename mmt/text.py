"""Text: a trainable tokenizer (Hugging Face `tokenizers`) and the text tower.

The tokenizer lowercases, splits on whitespace and punctuation, and maps words to ids
either whole (word-level, for small closed vocabularies such as generated worlds) or as
WordPiece sub-words (Wu et al. 2016; open vocabularies). It saves and loads as `tokenizer.json`.

Special tokens are found by name. mmt's own tokenizers hold all seven, at ids 0..6 (the
order of SPECIAL_TOKENS). A BERT vocabulary (read by `mmt.interop`) holds [PAD], [UNK],
[CLS], [SEP], [MASK] wherever it puts them and no [BOS]/[EOS]: there [BOS] is [CLS] and
[EOS] is [SEP], so a decoder's text is [CLS] text [SEP] as BERT's own sequences are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor, nn

from mmt.config import TextConfig
from mmt.layers.positions import Positions1D
from mmt.layers.transformer import Encoder

PAD, UNK, CLS, SEP, MASK, BOS, EOS = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK, BOS, EOS]  # a tokenizer mmt trains gives them ids 0..6, in this order
REQUIRED_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # every tokenizer has these; [BOS]/[EOS] default to [CLS]/[SEP]


class Tokenizer:
    """Text <-> ids, with the special tokens every mmt task uses.

    Build one with `Tokenizer.train(corpus)` or `Tokenizer.load("tokenizer.json")`.
    """

    def __init__(self, backend: _Backend):
        ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
        missing = [token for token in REQUIRED_TOKENS if ids[token] is None]
        if missing:
            raise ValueError(f"tokenizer has no {', '.join(missing)} token; mmt needs {', '.join(REQUIRED_TOKENS)}")
        # mmt pads and cuts texts itself (`batch`): a tokenizer.json that pads or truncates
        # (Hugging Face's often do) would hand back rows of another length
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[token] for token in REQUIRED_TOKENS)
        self.bos_id = ids[BOS] if ids[BOS] is not None else self.cls_id
        self.eos_id = ids[EOS] if ids[EOS] is not None else self.sep_id

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of the special tokens, ascending (never masked, never drawn as random words)."""
        return tuple(sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id, self.eos_id}))

    @classmethod
    def train(
        cls,
        corpus: Iterable[str],
        kind: Literal["word", "wordpiece"] = "word",
        vocab_size: int = 8000,
        min_frequency: int = 1,
    ) -> "Tokenizer":
        """Learn a vocabulary from an iterable of texts.

        Args:
            kind: "word" keeps whole words; "wordpiece" learns sub-words (prefix "##").
            vocab_size: upper bound on the vocabulary, special tokens included.
            min_frequency: words seen fewer times map to [UNK] (word) or are split (wordpiece).
        """
        if kind == "word":
            backend = _Backend(models.WordLevel(unk_token=UNK))
            trainer = trainers.WordLevelTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
            )
        elif kind == "wordpiece":
            backend = _Backend(models.WordPiece(unk_token=UNK))
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS
            )
        else:
            raise ValueError(f"tokenizer kind must be 'word' or 'wordpiece', got {kind!r}")
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()  # joins words with spaces, merges "##" pieces
        backend.train_from_iterator(corpus, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        try:
            return cls(backend)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        self.backend.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; stops at the first [EOS] and drops special tokens when skip_special."""
        ids = [int(i) for i in ids]
        if skip_special and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def batch(
        self, texts: list[str], max_len: int, wrap: Literal["cls", "bos_eos", "none"] = "cls"
    ) -> tuple[Tensor, Tensor]:
        """Encode and right-pad a batch.

        Args:
            wrap: "cls" gives [CLS] text [SEP] (encoders), "bos_eos" gives [BOS] text [EOS]
                (decoders), "none" adds nothing. Long texts are cut to max_len, keeping the
                closing token.
        Returns:
            ids (B, T) long and padding mask (B, T) bool (True = padding), T <= max_len.
        """
        start, end = {"cls": ([self.cls_id], [self.sep_id]), "bos_eos": ([self.bos_id], [self.eos_id]), "none": ([], [])}[
            wrap
        ]
        room = max_len - len(start) - len(end)
        if room < 0:
            raise ValueError(f"max_len={max_len} leaves no room for the special tokens")
        rows = [start + ids[:room] + end for ids in (e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False))]
        T = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids == self.pad_id


class TokenEmbedding(nn.Module):
    """Token embedding + 1-D position embedding, shared by text encoders and decoders."""

    def __init__(self, vocab_size: int, dim: int, max_len: int, positions: str = "learned", pad_id: int = 0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.positions = Positions1D(max_len, dim, positions)

    def forward(self, ids: Tensor, start: int | Tensor = 0) -> Tensor:
        """ids (B, T) -> (B, T, D); `start` is the position of ids[:, 0] (decoding with a cache: the
        cache's `start`, a tensor for a static cache)."""
        embedded = self.tokens(ids)
        return embedded + self.positions(ids.shape[1], start).to(embedded.dtype)


class LogitsHead(nn.Linear):
    """The decoder's output projection to next-token logits (a linear layer).

    On a CPU in fp32, the product of a few rows (1-8: one decoding step) with a head of more
    than 4M parameters (16 MiB) is taken as W x^T, then transposed, instead of x W^T: torch's
    CPU product read such a head once per row, W x^T reads it once (docs/lab-notes.md,
    2026-11-28). One row goes in twice, as two columns, which ran faster than one vector. The
    rule reads only the shapes and dtype, never the host; the logits equal x W^T up to
    rounding (another summation order).
    """

    COLUMNS_FROM = 1 << 22  # parameters

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        if (
            x.dim() == 2 and 1 <= rows <= 8 and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and x.device.type == "cpu" and self.weight.numel() > self.COLUMNS_FROM and not torch.is_autocast_enabled("cpu")
        ):
            columns = torch.cat([x, x]).t() if rows == 1 else x.t()  # (D, rows), one row twice
            if self.bias is None:
                logits = torch.mm(self.weight, columns)
            else:
                logits = torch.addmm(self.bias[:, None], self.weight, columns)
            return logits[:, :rows].t()
        return nn.functional.linear(x, self.weight, self.bias)


class TextTower(nn.Module):
    """Token embedding (-> LayerNorm) -> Transformer encoder over the text (causal if the config says)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.encoder.dim, cfg.max_len, cfg.positions, cfg.pad_id)
        self.embed_norm = nn.LayerNorm(cfg.encoder.dim, eps=cfg.encoder.norm_eps) if cfg.embed_norm else nn.Identity()
        self.encoder = Encoder(cfg.encoder)

    def forward(self, ids: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """ids (B, T) -> text_tokens (B, T, D), text_padding_mask (B, T) (True = padding)."""
        if padding_mask is None:
            padding_mask = ids == self.cfg.pad_id
        embedded = self.embed_norm(self.embed(ids))
        text_tokens = self.encoder(embedded, key_padding_mask=padding_mask, causal=self.cfg.causal)
        return text_tokens, padding_mask
