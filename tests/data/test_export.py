"""`mmt data export`: built-in scenes as files that the readers take back unchanged."""

import json

import numpy as np
import pytest
from PIL import Image

from mmt.cli import main
from mmt.data.formats import load_source
from mmt.data.worlds import shapes, sort_of_clevr
from mmt.data.worlds.export import export_world


def test_shapes_export_is_the_test_split_and_reads_back(tmp_path):
    captions_file, questions_file = export_world("shapes", tmp_path / "out", num_scenes=4)
    truth = shapes.splits(0, 0, 6)[2]  # the test split mmt eval uses (first 4 of it)
    for i in range(4):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"scene-{i:03d}.png")), truth.images[i])
    records = load_source(captions_file).records
    assert [list(r.captions) for r in records] == truth.captions[:4]
    vqa = load_source(questions_file).records
    assert len(vqa) == sum(len(q) for q in truth.qa[:4]) and vqa[0].question == truth.qa[0][0].question


def test_sort_of_clevr_export_matches_the_splits_and_answers(tmp_path):
    (questions_file,) = export_world("sort-of-clevr", tmp_path / "out", num_scenes=2, split="train", seed=3)
    train, _ = sort_of_clevr.splits(num_train=2, num_test=1, seed=3)
    lines = [json.loads(line) for line in questions_file.read_text().splitlines()]
    assert [(d["question"], d["answer"]) for d in lines] == [(q.text, q.answer) for q in train.questions]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "scene-001.png")), train.images[1])


def test_export_refuses_a_folder_with_files_and_unknown_names(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("keep me")
    assert main(["data", "export", "shapes", "--out", str(tmp_path), "--scenes", "1"]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (tmp_path / "old.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="has no 'val' split"):
        export_world("sort-of-clevr", tmp_path / "new", split="val")
    with pytest.raises(ValueError, match="unknown world"):
        export_world("clevr", tmp_path / "new")
