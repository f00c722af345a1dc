"""BERT-family text towers (`transformers.BertModel` layout: BERT, MiniLM, sentence-transformers
checkpoints) and their WordPiece tokenizers, in mmt's own TextTower and Tokenizer.

BERT (Devlin et al. 2019) is a post-norm encoder whose embedding is word + position +
token type, then LayerNorm. mmt reads single sentences, always token type 0, so that row
is folded into the position table; the token-type table itself is then dropped. The
pooler (dense + tanh over [CLS], trained for next-sentence prediction) and pre-training
heads have no place in a tower and are dropped by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers

from mmt.config import TextConfig, TransformerConfig
from mmt.errors import CheckpointError
from mmt.interop.weights import CONFIG_NAME, Mapping, attention, pairs, read_json, setting
from mmt.text import REQUIRED_TOKENS, Tokenizer

MODEL_TYPES = ("bert",)
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "quick_gelu": "quick_gelu"}  # Hugging Face hidden_act -> mmt's activation
DROPPED = {
    "pooler.": "BERT's pooler (dense + tanh over [CLS], trained for next-sentence prediction) is not part of a text tower",
    "cls.": "pre-training heads (masked-word and next-sentence prediction) are not part of a text tower",
    "embeddings.position_ids": "a buffer of 0, 1, 2, ... (checked), which mmt's positions always are",
    "embeddings.token_type_ids": "a buffer of zeros: mmt reads single sentences, token type 0",
}


def text_config(config: dict[str, Any], path: str | Path) -> TextConfig:
    """mmt's TextConfig for a BERT config.json (its defaults where older files leave keys out)."""
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type={config['position_embedding_type']!r}; mmt reads only 'absolute'")
    act = setting(config, "hidden_act", str, path, "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: hidden_act={act!r} is not one of {sorted(ACTIVATIONS)}")
    dim = setting(config, "hidden_size", int, path)
    heads = setting(config, "num_attention_heads", int, path)
    if dim % heads:
        raise CheckpointError(f"{path}: hidden_size={dim} is not divisible by num_attention_heads={heads}")
    encoder = TransformerConfig(
        dim=dim, depth=setting(config, "num_hidden_layers", int, path), heads=heads,
        ffn_dim=setting(config, "intermediate_size", int, path),
        dropout=setting(config, "hidden_dropout_prob", float, path, 0.1),
        activation=ACTIVATIONS[act], norm_first=False, norm_eps=setting(config, "layer_norm_eps", float, path, 1e-12),
    )
    return TextConfig(
        vocab_size=setting(config, "vocab_size", int, path), max_len=setting(config, "max_position_embeddings", int, path, 512),
        positions="learned", pad_id=setting(config, "pad_token_id", int, path, 0), embed_norm=True, causal=False, encoder=encoder,
    )


def text_mapping(cfg: TextConfig, prefix: str = "") -> Mapping:
    """Where each tensor of mmt's TextTower comes from in a BertModel file whose names start
    with `prefix` ("" or "bert.")."""
    p = prefix
    tensors: dict = {
        "embed.tokens.weight": f"{p}embeddings.word_embeddings.weight",
        # token type 0 is added to every position: fold its row into the position table
        "embed.positions.table": (
            (f"{p}embeddings.position_embeddings.weight", f"{p}embeddings.token_type_embeddings.weight"),
            lambda positions, types: positions + types[0],
        ),
        **pairs("embed_norm", f"{p}embeddings.LayerNorm"),
    }
    for i in range(cfg.encoder.depth):
        mine, theirs = f"encoder.layers.{i}", f"{p}encoder.layer.{i}"
        tensors.update(attention(f"{mine}.attn", f"{theirs}.attention.", {
            "q_proj": "self.query", "k_proj": "self.key", "v_proj": "self.value", "out_proj": "output.dense",
        }))
        tensors.update(pairs(f"{mine}.norm1", f"{theirs}.attention.output.LayerNorm"))
        tensors.update(pairs(f"{mine}.ffn.fc1", f"{theirs}.intermediate.dense"))
        tensors.update(pairs(f"{mine}.ffn.fc2", f"{theirs}.output.dense"))
        tensors.update(pairs(f"{mine}.norm2", f"{theirs}.output.LayerNorm"))
    dropped = {f"{p}{name}": why for name, why in DROPPED.items() if not name.startswith("cls.")}
    dropped["cls."] = DROPPED["cls."]  # (heads sit beside "bert.", never under it)
    return Mapping(tensors, dropped)


def file_prefix(names: list[str]) -> str:
    """"bert." when the file is a BERT with heads (BertForMaskedLM, ...), "" for a bare BertModel."""
    return "bert." if "bert.embeddings.word_embeddings.weight" in names else ""


def tokenizer(directory: str | Path) -> Tokenizer:
    """The directory's WordPiece tokenizer as an mmt Tokenizer: its tokenizer.json (padding and
    truncation switched off: mmt pads and cuts itself), else one built from vocab.txt with
    BERT's normalisation (lowercased unless tokenizer_config.json says do_lower_case=false)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        return Tokenizer.load(path)
    vocab = directory / "vocab.txt"
    if not vocab.is_file():
        raise CheckpointError(f"{directory}: neither tokenizer.json nor vocab.txt beside {CONFIG_NAME}; mmt needs the model's own tokenizer")
    lowercase = True
    options = directory / "tokenizer_config.json"
    if options.is_file():
        lowercase = setting(read_json(options), "do_lower_case", bool, options, True)
    try:
        backend = Backend(models.WordPiece(models.WordPiece.read_file(str(vocab)), unk_token="[UNK]", max_input_chars_per_word=100))
    except Exception as e:  # tokenizers raises a bare Exception
        raise CheckpointError(f"{vocab}: not a readable WordPiece vocabulary ({e})") from None
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    present = [token for token in REQUIRED_TOKENS if backend.token_to_id(token) is not None]
    backend.add_special_tokens(present)  # (already in the vocabulary: their ids stay; decoding then skips them)
    try:
        return Tokenizer(backend)
    except ValueError as e:
        raise CheckpointError(f"{vocab}: {e}") from None
