"""Image search: index a gallery with a tiny retrieval run, resume an interrupted build, search it."""

import json
import re
import shutil

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

import mmt.search as search_lib
from mmt import checkpoint
from mmt.cli import main
from mmt.data.images import ImageError, to_pixels
from mmt.data.worlds import shapes
from mmt.search import SearchIndex, SearchIndexError, build_index, list_gallery, make_faiss_index, search
from mmt.tasks.retrieval import embed_texts, load_for_inference

NUM_IMAGES = 16
# 16 training images seen 300 times each: the tiny dual encoder learns them well enough that
# an image's full description (caption 0) finds it first (16 of 16 when written; chance is 1 in 16)
TINY_RETRIEVAL = [
    "data.image_size=32",
    f"data.num_train={NUM_IMAGES}",
    "data.num_val=8",
    "data.num_test=4",
    "train.steps=300",
    "train.batch_size=16",
    "train.lr=3e-3",
    "train.warmup_steps=10",
    "train.eval_every=300",
    "train.save_every=300",
    "train.threads=1",
    "model.losses.itm=0",
    "model.losses.mlm=0",
    "model.losses.lm=0",
]


@pytest.fixture(autouse=True)
def _one_thread():
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("retrieval") / "run"
    args = ["train", "retrieval", str(directory), "--preset", "retrieval-tiny", "--no-progress"]
    assert main(args + sum((["--set", s] for s in TINY_RETRIEVAL), [])) == 0
    return directory


@pytest.fixture(scope="module")
def scenes():
    return shapes.splits(NUM_IMAGES, 8, 4, seed=0, image_size=32)[0]  # the run's training images


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, scenes):
    """The 16 scenes as image files, some in a subfolder and with upper-case extensions, plus a non-image."""
    folder = tmp_path_factory.mktemp("gallery")
    (folder / "more").mkdir()
    for i, image in enumerate(scenes.images):
        name = f"more/scene-{i:02d}.PNG" if i % 4 == 3 else f"scene-{i:02d}.png"
        Image.fromarray(image).save(folder / name, format="PNG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def scene_path(gallery, i):
    return str(gallery / (f"more/scene-{i:02d}.PNG" if i % 4 == 3 else f"scene-{i:02d}.png"))


def stored_vectors(index_dir):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    return np.concatenate([np.load(index_dir / f"chunk-{c:06d}.npy") for c in range(manifest["num_chunks"])])


def test_gallery_folder_is_listed_recursively_sorted_by_extension(gallery):
    paths = list_gallery(gallery)
    assert len(paths) == NUM_IMAGES and not any(p.endswith(".txt") for p in paths)
    assert paths == sorted(paths, key=lambda p: p[len(str(gallery)) + 1 :])
    assert set(paths) == {scene_path(gallery, i) for i in range(NUM_IMAGES)}


@pytest.mark.e2e
def test_search_finds_images_by_caption_and_by_themselves(run, gallery, scenes, tmp_path):
    out = tmp_path / "index"
    report = build_index(run, gallery, out, batch_size=5, chunk_size=6, progress=False)
    assert report["count"] == NUM_IMAGES and report["embedded"] == NUM_IMAGES and report["skipped"] == 0
    assert report["index"]["type"] == "IndexFlatIP"
    index = SearchIndex.load(out)
    assert len(index) == NUM_IMAGES and sorted(index.paths) == sorted(list_gallery(gallery))

    # scores are exactly the model's cosines, computed here without the index
    model, tokenizer = load_for_inference(run)
    with torch.no_grad():
        image_emb = model.embed_images(to_pixels(scenes.images)).numpy()  # (16, E)
    text_emb = embed_texts(model, tokenizer, [c[0] for c in scenes.captions]).numpy()  # (16, E)
    expected = text_emb @ image_emb.T  # (16 texts, 16 images)
    found_first = 0
    for i in range(NUM_IMAGES):
        hits = search(out, text=scenes.captions[i][0], k=NUM_IMAGES)
        assert [h["rank"] for h in hits] == list(range(1, NUM_IMAGES + 1))
        scores = {h["path"]: h["score"] for h in hits}
        for j in range(NUM_IMAGES):
            assert scores[scene_path(gallery, j)] == pytest.approx(float(expected[i, j]), abs=1e-5)
        found_first += hits[0]["path"] == scene_path(gallery, i)
        rank = next(h["rank"] for h in hits if h["path"] == scene_path(gallery, i))
        assert rank <= 4, f"caption {scenes.captions[i][0]!r} ranks its image {rank}th of {NUM_IMAGES}"
    assert found_first >= 13, f"captions found their own image first {found_first} times of {NUM_IMAGES}"

    for i in (0, 7):  # an indexed image finds itself first, at cosine 1
        hits = index.search_image(scene_path(gallery, i), k=3)
        assert hits[0]["path"] == scene_path(gallery, i) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        search(out, text="a red circle", image=scene_path(gallery, 0))


class Interrupted(Exception):
    pass


@pytest.mark.e2e
def test_interrupted_build_resumes_without_duplicates(run, gallery, tmp_path, monkeypatch):
    real_load = search_lib.load_image
    calls = []

    def failing_load(path, size):
        if len(calls) == 11:  # the 12th image: chunks 0 and 1 (of 4 images each) are done
            raise Interrupted
        calls.append(path)
        return real_load(path, size)

    out = tmp_path / "index"
    monkeypatch.setattr(search_lib, "load_image", failing_load)
    with pytest.raises(Interrupted):
        build_index(run, gallery, out, batch_size=3, chunk_size=4, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["chunk-000000.json", "chunk-000000.npy", "chunk-000001.json", "chunk-000001.npy", "manifest.json"]
    with pytest.raises(SearchIndexError, match="unfinished"):
        SearchIndex.load(out)
    # a kill between writing chunk 1's embeddings and its listing: chunk 1 is not done
    (out / "chunk-000001.json").unlink()

    resumed_calls = []
    monkeypatch.setattr(search_lib, "load_image", lambda path, size: resumed_calls.append(path) or real_load(path, size))
    report = build_index(run, gallery, out, batch_size=3, chunk_size=4, progress=False)
    assert (report["resumed"], report["embedded"], report["count"]) == (4, 12, NUM_IMAGES)
    assert sorted(resumed_calls) == sorted(list_gallery(gallery)[4:])  # chunk 0's images were not loaded again
    index = SearchIndex.load(out)
    assert index.paths == list_gallery(gallery)  # each image once, in gallery order

    fresh = tmp_path / "fresh"
    build_index(run, gallery, fresh, batch_size=3, chunk_size=4, progress=False)
    np.testing.assert_allclose(stored_vectors(out), stored_vectors(fresh), atol=1e-6)
    assert SearchIndex.load(fresh).paths == index.paths

    # the same folder is never continued with other chunking, another gallery or other weights
    with pytest.raises(SearchIndexError, match="chunk_size=4"):
        build_index(run, gallery, out, chunk_size=8, progress=False)
    smaller = tmp_path / "smaller"
    shutil.copytree(gallery, smaller)
    (smaller / "scene-00.png").unlink()
    with pytest.raises(SearchIndexError, match="gallery listing"):
        build_index(run, smaller, fresh, chunk_size=4, progress=False)


@pytest.mark.e2e
def test_changed_weights_are_refused(run, gallery, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint.model_directory(run), model_dir)
    out = tmp_path / "index"
    build_index(model_dir, gallery, out, progress=False)
    model, tokenizer = load_for_inference(model_dir)
    with torch.no_grad():
        model.image_proj.weight.mul_(1.5)
    checkpoint.save_pretrained(model, model_dir, tokenizer)  # "trained on" in place
    with pytest.raises(SearchIndexError, match="not the weights"):
        search(out, text="a small red circle")
    with pytest.raises(SearchIndexError, match="different model weights"):
        build_index(model_dir, gallery, out, progress=False)


def test_an_index_is_continued_only_with_the_image_fit_it_began_with(run, gallery, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint.model_directory(run), model_dir)
    out = tmp_path / "index"
    build_index(model_dir, gallery, out, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_fit"] == "crop"
    config_path = model_dir / "config.json"
    saved = json.loads(config_path.read_text())
    saved["vision"]["image_fit"] = "stretch"
    config_path.write_text(json.dumps(saved))
    with pytest.raises(SearchIndexError, match="different image fit"):
        build_index(model_dir, gallery, out, progress=False)
    del manifest["image_fit"]  # an index begun by mmt 0.1, which stretched: continued by a stretching model
    (out / "manifest.json").write_text(json.dumps(manifest))
    build_index(model_dir, gallery, out, progress=False)


def test_jsonl_gallery_resolves_paths_and_names_a_bad_line(gallery, tmp_path):
    listing = gallery / "gallery.jsonl"
    first, second = scene_path(gallery, 0), scene_path(gallery, 3)
    lines = [json.dumps({"image": "scene-00.png", "id": 1}), "", json.dumps({"image": second}), json.dumps({"image": first})]
    listing.write_text("\n".join(lines) + "\n")
    assert list_gallery(listing) == [first, second]  # relative to the file's folder; a repeat kept once
    listing.write_text("\n".join([*lines, "{oops"]) + "\n")
    with pytest.raises(SearchIndexError, match=r"gallery\.jsonl:5: invalid JSON"):
        list_gallery(listing)
    listing.write_text("\n".join([lines[0], json.dumps({"picture": "x.png"})]) + "\n")
    with pytest.raises(SearchIndexError, match=r'gallery\.jsonl:2: expected an object with an "image" path'):
        list_gallery(listing)
    listing.unlink()


@pytest.mark.e2e
def test_missing_image_is_named_or_skipped_and_counted(run, gallery, tmp_path):
    listing = tmp_path / "gallery.jsonl"
    missing = tmp_path / "gone" / "lost.png"
    listing.write_text("\n".join(json.dumps({"image": p}) for p in [scene_path(gallery, 0), str(missing), scene_path(gallery, 1)]) + "\n")
    with pytest.raises(ImageError, match=re.escape(f"{missing}: image not found (run mmt index with --skip-bad to leave it out)")):
        build_index(run, listing, tmp_path / "strict", progress=False)
    out = tmp_path / "lenient"
    report = build_index(run, listing, out, skip_bad=True, progress=False)
    assert (report["count"], report["skipped"], report["skipped_paths"]) == (2, 1, [str(missing)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == 1 and manifest["skipped_paths"] == [str(missing)]
    assert SearchIndex.load(out).paths == [scene_path(gallery, 0), scene_path(gallery, 1)]


def clustered(n, dim, centres, noise, seed):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    points = means[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_approximate_index_agrees_with_exact_search():
    vectors = clustered(4000, 32, centres=40, noise=0.3, seed=0)
    approximate = make_faiss_index(vectors, exact_below=1000, nprobe=4)
    assert isinstance(approximate, faiss.IndexIVFFlat) and approximate.nlist == search_lib.default_nlist(4000) > 50
    exact = make_faiss_index(vectors, exact_below=1000_000)
    assert isinstance(exact, faiss.IndexFlatIP)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(4000, 200, replace=False)] + 0.02 * rng.standard_normal((200, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact_ids = exact.search(queries, 10)
    _, approx_ids = approximate.search(queries, 10)
    assert (approx_ids[:, 0] == exact_ids[:, 0]).all()
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids)])
    assert recall > 0.8, f"recall@10 {recall:.3f} with nprobe 4 of {approximate.nlist}"


@pytest.mark.e2e
def test_build_index_above_the_threshold_saves_an_ivf_index(run, gallery, tmp_path):
    out = tmp_path / "index"
    report = build_index(run, gallery, out, exact_below=8, nprobe=2, progress=False)
    assert report["index"] == {"file": "index.faiss", "type": "IndexIVFFlat", "exact": False, "nlist": 1, "nprobe": 1}
    index = SearchIndex.load(out)
    assert isinstance(index.index, faiss.IndexIVFFlat) and index.nprobe == 1
    index.nprobe = 5  # clipped to the one cell there is
    assert index.nprobe == 1
    hits = index.search_image(scene_path(gallery, 5), k=NUM_IMAGES)
    assert hits[0]["path"] == scene_path(gallery, 5) and len(hits) == NUM_IMAGES
    scores, paths = index.search(stored_vectors(out)[:3], k=1)
    assert [p[0] for p in paths] == index.paths[:3] and scores.shape == (3, 1)


@pytest.mark.e2e
def test_index_and_search_from_the_command_line(run, gallery, scenes, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", str(run), "--images", str(gallery), "--out", str(out), "--no-progress"]) == 0
    assert f"indexed {NUM_IMAGES} images" in capsys.readouterr().out
    assert main(["index", str(run), "--images", str(gallery), "--out", str(out), "--no-progress"]) == 0  # nothing left to do
    assert f"(0 embedded now, {NUM_IMAGES} already there" in capsys.readouterr().out
    assert main(["search", str(out), "--text", scenes.captions[5][0], "--num-results", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and scene_path(gallery, 5) in [h["path"] for h in hits]
    assert main(["search", str(out), "--image", scene_path(gallery, 2), "--num-results", "1"]) == 0
    assert scene_path(gallery, 2) in capsys.readouterr().out
    assert main(["search", str(out), "--num-results", "1"]) == 2
    assert "exactly one of --text" in capsys.readouterr().err
