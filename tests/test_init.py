"""Starting a run from another (--init): the source's architecture, strict fitting unless
--allow-partial, and words the source's vocabulary lacks."""

import json
import logging

import pytest
import torch

from mmt import checkpoint, registry
from mmt.cli import main
from mmt.tasks.common import init_tokenizer, unknown_words
from mmt.text import Tokenizer
from mmt.train import TrainConfig, init_from

TINY_DATA = ["data.num_train=6", "data.num_test=3", "train.steps=2", "train.batch_size=2", "train.warmup_steps=1",
             "train.eval_every=2", "train.save_every=2", "train.threads=1"]
TINY_MODEL = ["model.vision.encoder.depth=1", "model.fusion_encoder.depth=1"]


def sets(overrides):
    return sum((["--set", s] for s in overrides), [])


@pytest.mark.e2e
def test_init_builds_the_source_architecture_and_refuses_what_does_not_fit(tmp_path, capsys):
    source = tmp_path / "source"
    assert main(["train", "vqa", str(source), "--no-progress", *sets(TINY_DATA + TINY_MODEL)]) == 0
    # no model settings given: the run is the source's architecture, every tensor loads
    again = tmp_path / "again"
    assert main(["train", "vqa", str(again), "--init", str(source), "--no-progress", *sets(TINY_DATA)]) == 0
    report = json.loads((again / "init_report.json").read_text())
    assert report["loaded"] and not (report["new"] or report["unused"] or report["skipped_shape_mismatch"])
    assert json.loads((again / "model" / "config.json").read_text())["vision"]["encoder"]["depth"] == 1
    # other scenes rank the answers otherwise: the classifier's rows keep the source's answers
    reseeded = tmp_path / "reseeded"
    assert main(["train", "vqa", str(reseeded), "--init", str(source), "--no-progress", *sets(TINY_DATA + ["data.seed=1", "train.new_words=unk"])]) == 0
    answers = json.loads((source / "answers.json").read_text())["answers"]
    assert json.loads((reseeded / "answers.json").read_text())["answers"][: len(answers)] == answers
    capsys.readouterr()
    # a deeper vision encoder: its second layer would start untrained; refused, naming the keys
    deeper = [*TINY_DATA, "model.vision.encoder.depth=2"]
    assert main(["train", "vqa", str(tmp_path / "deeper"), "--init", str(source), "--no-progress", *sets(deeper)]) == 2
    err = capsys.readouterr().err
    assert "vision.encoder.layers.1." in err and "(not in the source)" in err and "--allow-partial" in err
    assert not (tmp_path / "deeper" / "model").exists()
    args = ["train", "vqa", str(tmp_path / "deeper"), "--init", str(source), "--allow-partial", "--overwrite", "--no-progress"]
    assert main(args + sets(deeper)) == 0


def test_words_the_source_lacks_stop_the_run_extend_the_vocabulary_or_become_unk(tmp_path, caplog):
    source = Tokenizer.train(["a red circle", "a blue square"])
    (tmp_path / "src").mkdir()
    source.save(tmp_path / "src" / "tokenizer.json")
    texts = ["a Purple hexagon", "a red hexagon", "a red circle"]
    assert unknown_words(source, texts) == {"hexagon": 2, "purple": 1}

    def start(new_words):
        run = tmp_path / new_words
        run.mkdir()
        return init_tokenizer(run, TrainConfig(init=str(tmp_path / "src"), new_words=new_words), lambda: texts)

    with pytest.raises(ValueError, match=r"2 words of this run's texts \(3 occurrences\).*'hexagon' \(2\), 'purple' \(1\)"):
        start("stop")
    grown = start("extend")
    assert grown.vocab_size == source.vocab_size + 2
    assert grown.encode("a red circle") == source.encode("a red circle")  # old ids keep their meaning
    assert grown.unk_id not in grown.encode("a purple hexagon")
    ids = [grown.bos_id, *grown.encode("a purple hexagon"), grown.eos_id, grown.pad_id]
    assert grown.decode(ids) == "a purple hexagon" and grown.special_ids == source.special_ids  # special tokens stay special
    with caplog.at_level(logging.WARNING, logger="mmt"):
        same = start("unk")
    assert same.vocab_size == source.vocab_size and "2 words (3 occurrences) read as [UNK]" in caplog.text
    assert Tokenizer.load(tmp_path / "extend" / "tokenizer.json").vocab_size == grown.vocab_size  # the run keeps it


def test_an_extended_vocabulary_keeps_the_source_rows_of_every_word_tensor(tmp_path):
    cfg = registry.preset("caption-tiny")
    cfg.vocab_size = 20
    torch.manual_seed(0)
    source = registry.build(cfg)
    checkpoint.save_pretrained(source, tmp_path / "src")
    cfg.vocab_size = 23
    target = registry.build(cfg)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_from(target, tmp_path / "src", vocab_rows=(20, 23))
    assert not report.mismatched and not report.unexpected and not report.missing
    grown = [k for k, v in source.state_dict().items() if v.shape[0] == 20]
    assert grown  # the token embedding and the output layer
    for key in grown:
        assert torch.equal(target.state_dict()[key][:20], source.state_dict()[key])
        assert torch.equal(target.state_dict()[key][20:], fresh[key][20:])
