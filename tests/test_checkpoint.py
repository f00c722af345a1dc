import json

import pytest
import torch

from mmt import checkpoint, registry
from mmt.checkpoint import CheckpointError, from_pretrained, load_weights, save_pretrained
from mmt.text import Tokenizer


def tiny_model():
    cfg = registry.preset("caption-tiny")
    cfg.vocab_size = 20
    return registry.build(cfg).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(7, 20, (2, 6), generator=g)
    ids[:, 0] = 5
    return pixels, ids


def logits(model, pixels, ids):
    with torch.no_grad():
        tokens, mask = model.encode_images(pixels)
        return model.next_token_logits(ids, tokens, mask)


def test_save_load_gives_identical_outputs_twice(tmp_path):
    model = tiny_model()
    tok = Tokenizer.train(["a red square", "a blue circle"])
    pixels, ids = batch()
    reference = logits(model, pixels, ids)
    save_pretrained(model, tmp_path / "one", tok)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    once = from_pretrained(tmp_path / "one")
    assert not any(m.training for m in once.modules())  # ready to predict: dropout off
    save_pretrained(once, tmp_path / "two")
    twice = from_pretrained(tmp_path / "two")
    assert torch.equal(logits(once, pixels, ids), reference)
    assert torch.equal(logits(twice, pixels, ids), reference)
    assert checkpoint.load_tokenizer(tmp_path / "one").encode("a red square") == tok.encode("a red square")
    assert checkpoint.load_tokenizer(tmp_path / "two") is None
    assert json.loads((tmp_path / "one" / "config.json").read_text())["model_type"] == "caption"


def test_no_pickle_and_no_temporary_files_left(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    head = (tmp_path / "model.safetensors").read_bytes()[:8]
    assert int.from_bytes(head, "little") < 10_000_000  # safetensors starts with its header length
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_weights_give_a_clear_error(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file .*truncated"):
        from_pretrained(tmp_path)


def test_corrupted_weights_give_a_clear_error(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        from_pretrained(tmp_path)


def test_unknown_config_key_gives_a_clear_error(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["decoder"]["num_experts"] = 8
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown config key decoder\.num_experts"):
        from_pretrained(tmp_path)
    data["decoder"].pop("num_experts")
    data["model_type"] = "telepathy"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown model_type 'telepathy'"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(tmp_path / "nowhere")


def test_mismatched_weights_are_reported_by_key(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    cfg = registry.preset("caption-tiny")
    cfg.vocab_size = 25  # embedding and head change shape
    cfg.decoder.depth = 3  # one more layer than the file has
    other = registry.build(cfg)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(other, tmp_path / "model.safetensors")
    message = str(err.value)
    assert "embed.tokens.weight file [20, 64] vs model [25, 64]" in message
    assert "missing from the file" in message and "decoder.layers.2." in message
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # strict failure loads nothing
    report = load_weights(other, tmp_path / "model.safetensors", strict=False)
    assert ("lm_head.weight", (20, 64), (25, 64)) in report.mismatched
    assert "vision.stem.proj.weight" in report.loaded and not report.unexpected


def test_a_model_saved_before_image_fit_existed_loads_stretching_as_it_was_trained(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    assert data["vision"].pop("image_fit") == "crop"
    path.write_text(json.dumps(data))
    assert from_pretrained(tmp_path).config.vision.image_fit == "stretch"


def test_models_save_and_load_themselves_from_a_model_or_run_directory(tmp_path):
    from mmt.models.caption import CaptionModel
    from mmt.models.vqa import VQAModel

    model = tiny_model()
    pixels, ids = batch()
    model.save_pretrained(tmp_path / "run" / "model")  # a run directory keeps its model in model/
    for directory in (tmp_path / "run", tmp_path / "run" / "model"):
        again = CaptionModel.from_pretrained(directory)
        assert type(again) is CaptionModel and torch.equal(logits(again, pixels, ids), logits(model, pixels, ids))
    with pytest.raises(CheckpointError, match="holds a caption model, not a VQAModel"):
        VQAModel.from_pretrained(tmp_path / "run")
