import pytest
import torch

from mmt.config import TextConfig, TransformerConfig
from mmt.text import SPECIAL_TOKENS, TextTower, Tokenizer

CORPUS = ["What is the shape of the red object?", "Is the blue object on the left?", "a small green cross above a circle"] * 5


@pytest.mark.parametrize("kind", ["word", "wordpiece"])
def test_train_save_load_round_trip(tmp_path, kind):
    tok = Tokenizer.train(CORPUS, kind=kind, vocab_size=200)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    text = "what is the shape of the red object ?"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == "what is the shape of the red object?"


def test_unknown_words():
    word = Tokenizer.train(CORPUS, kind="word")
    assert word.encode("purple object") == [word.unk_id, word.token_to_id("object")]
    piece = Tokenizer.train(CORPUS * 3, kind="wordpiece", vocab_size=120)
    # WordPiece spells a new word from learned pieces instead of giving up
    assert piece.unk_id not in piece.encode("redder")


def test_batch_wraps_pads_and_truncates():
    tok = Tokenizer.train(CORPUS)
    ids, pad = tok.batch(["is the blue object on the left", "red"], max_len=5, wrap="cls")
    assert ids.shape == (2, 5)
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id  # truncated, closing token kept
    assert ids[1].tolist() == [tok.cls_id, tok.token_to_id("red"), tok.sep_id, tok.pad_id, tok.pad_id]
    assert pad[1].tolist() == [False, False, False, True, True]
    ids, _ = tok.batch(["red"], max_len=8, wrap="bos_eos")
    assert ids[0].tolist() == [tok.bos_id, tok.token_to_id("red"), tok.eos_id]
    assert tok.decode([tok.bos_id, tok.token_to_id("red"), tok.eos_id, tok.token_to_id("blue")]) == "red"


def test_load_rejects_bad_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_text_tower_masks_padding():
    tok = Tokenizer.train(CORPUS)
    cfg = TextConfig(vocab_size=tok.vocab_size, encoder=TransformerConfig(dim=32, depth=2, heads=4, ffn_dim=64, dropout=0.0))
    tower = TextTower(cfg).eval()
    ids, pad = tok.batch(["is the blue object on the left", "red object"], max_len=12)
    tokens, mask = tower(ids)
    assert tokens.shape == (2, ids.shape[1], 32) and torch.equal(mask, pad)
    alone, _ = tower(ids[1:, : int((~pad[1]).sum())])
    assert (tokens[1, : alone.shape[1]] - alone[0]).abs().max() <= 1e-5
