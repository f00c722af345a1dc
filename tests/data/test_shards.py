"""Packing a data set into webdataset tar shards and reading them back (mmt.data.formats.shards)."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmt.data.formats.records import DataError
from mmt.data.formats.shards import ShardStream, iter_packed, pack, read_index, shard_dataset, shards_for_rank

N = 7


def make_dataset(root: Path, bad_line: int | None = None) -> Path:
    """A JSONL caption set of N images (PNG and JPEG); with `bad_line`, that line's image is not an image."""
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(N):
        ext = "png" if i % 2 == 0 else "jpg"
        path = root / "img" / f"im{i}.{ext}"
        if i == bad_line:
            path.write_bytes(b"this is not an image")
        else:
            image = Image.new("RGB", (8 + i, 6), (30 * i, 255 - 20 * i, 7 * i))
            image.putpixel((1, 1), (i, 2 * i, 3 * i))
            image.save(path, "PNG" if ext == "png" else "JPEG")
        lines.append(json.dumps({"image": f"img/{path.name}", "text": [f"caption {i}", f"another {i}"]}))
    source = root / "caps.jsonl"
    source.write_text("\n".join(lines) + "\n")
    return source


def json_keys(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [int(name.split(".")[0]) for name in tar.getnames() if name.endswith(".json")]


def read_all(out: Path):
    return list(shard_dataset(out, split_by_node=False))


def test_pack_writes_shards_and_index(tmp_path):
    source = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    summary = pack(source, out, shard_size=3)
    assert [s["name"] for s in summary["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["count"] for s in summary["shards"]] == [3, 3, 1]
    assert summary["num_samples"] == N and summary["format"] == "jsonl" and summary["skipped"]["total"] == 0
    assert read_index(out) == summary
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    with tarfile.open(out / "shard-000001.tar") as tar:
        assert tar.getnames() == ["00000003.jpg", "00000003.json", "00000004.png", "00000004.json", "00000005.jpg", "00000005.json"]


def test_round_trip_every_record_once_with_identical_bytes(tmp_path):
    source = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    pack(source, out, shard_size=3)
    samples = read_all(out)
    assert len(samples) == N
    assert sorted(meta["index"] for _, meta in samples) == list(range(N))
    members = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    for image, meta in samples:
        i = meta["index"]
        original = tmp_path / "data" / "img" / f"im{i}.{'png' if i % 2 == 0 else 'jpg'}"
        assert meta["kind"] == "caption" and meta["captions"] == [f"caption {i}", f"another {i}"]
        assert Path(meta["image_path"]) == original and meta["image_member"] == original.suffix[1:]
        assert meta["where"] == f"line {i + 1}" and meta["source"] == str(source)
        assert members[f"{i:08d}{original.suffix}"] == original.read_bytes()
        assert json.loads(members[f"{i:08d}.json"]) == meta
        assert image.mode == "RGB" and image.size == (8 + i, 6)
        with Image.open(original) as expected:
            assert image.tobytes() == expected.convert("RGB").tobytes()


def test_bad_image_errors_naming_file_and_record(tmp_path):
    source = make_dataset(tmp_path / "data", bad_line=4)
    out = tmp_path / "shards"
    with pytest.raises(DataError) as caught:
        pack(source, out, shard_size=3)
    message = str(caught.value)
    assert "caps.jsonl" in message and "line 5" in message and "im4.png" in message
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_bad_image_skipped_and_counted(tmp_path):
    source = make_dataset(tmp_path / "data", bad_line=4)
    out = tmp_path / "shards"
    summary = pack(source, out, shard_size=3, skip_bad=True)
    assert summary["num_samples"] == N - 1 and summary["num_records"] == N
    assert [s["count"] for s in summary["shards"]] == [3, 3]
    assert summary["skipped"]["total"] == 1 and summary["skipped"]["counts"] == {"corrupt_image": 1}
    assert read_index(out)["skipped"] == summary["skipped"]
    assert sorted(meta["index"] for _, meta in read_all(out)) == [0, 1, 2, 3, 5, 6]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_repack_removes_stale_shards(tmp_path):
    source = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    pack(source, out, shard_size=2)
    assert len(list(out.glob("shard-*.tar"))) == 4
    pack(source, out, shard_size=5)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(read_all(out)) == N


def test_max_shard_bytes_closes_shards_early(tmp_path):
    source = make_dataset(tmp_path / "data")
    summary = pack(source, tmp_path / "shards", shard_size=100, max_shard_bytes=1)
    assert [s["count"] for s in summary["shards"]] == [1] * N


def test_shuffle_is_deterministic_and_complete(tmp_path):
    source = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    pack(source, out, shard_size=3)
    first = [m["index"] for _, m in shard_dataset(out, shuffle=5, seed=3, split_by_node=False)]
    again = [m["index"] for _, m in shard_dataset(out, shuffle=5, seed=3, split_by_node=False)]
    assert first == again and sorted(first) == list(range(N))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("num_shards", [1, 3, 7, 8])
def test_shards_for_rank_partitions(world, num_shards):
    shards = [f"shard-{i:06d}.tar" for i in range(num_shards)]
    parts = [shards_for_rank(shards, rank, world) for rank in range(world)]
    flat = [s for part in parts for s in part]
    assert sorted(flat) == shards and len(flat) == len(set(flat))
    assert parts == [shards_for_rank(shards, rank, world) for rank in range(world)]
    assert parts[0] == shards[::world]  # strided, like webdataset.split_by_node
    with pytest.raises(ValueError):
        shards_for_rank(shards, world, world)


@pytest.mark.parametrize("world", [2, 3])
def test_dataset_reads_the_shards_of_its_rank(tmp_path, monkeypatch, world):
    source = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    summary = pack(source, out, shard_size=2)  # 4 shards
    seen = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        mine = shards_for_rank(summary["shards"], rank, world)
        expected = sorted(index for s in mine for index in json_keys(out / s["name"]))
        got = sorted(meta["index"] for _, meta in shard_dataset(out))
        assert got == expected
        seen += got
    assert sorted(seen) == list(range(N))


def test_data_pack_command(tmp_path, capsys):
    from mmt.cli import main

    source = make_dataset(tmp_path / "data")
    out = tmp_path / "shards"
    assert main(["data", "pack", str(source), "--out", str(out), "--shard-size", "3"]) == 0
    assert "packed 7 records into 3 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


# ----------------------------------------------------------------------------- training streams


def big_dataset(root: Path, n: int = 23) -> Path:
    """n distinct tiny PNGs (pixel (0, 0) encodes the index), one caption each."""
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "text": f"caption {i}"}))
    (root / "caps.jsonl").write_text("\n".join(lines) + "\n")
    return root / "caps.jsonl"


def stream_ids(stream: ShardStream, position: int, n: int) -> list[int]:
    samples = stream.take(position, n)
    for image, meta in samples:  # the decoded image is the record's own
        assert image.shape == (4, 4, 3) and int(image[0, 0, 0]) == meta["index"]
    return [meta["index"] for _, meta in samples]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_epochs_cover_each_sample_once_and_reshuffle(tmp_path, workers):
    # each worker makes its own passes, so the rank's epochs line up when the workers' shares
    # are equal: 24 samples in 6 shards of 4 give each of 2 workers 12
    n = 23 if workers == 0 else 24
    out = tmp_path / "shards"
    pack(big_dataset(tmp_path / "data", n), out, shard_size=4)
    stream = ShardStream(out, size=4, workers=workers, shuffle=5, seed=1)
    first, second = stream_ids(stream, 0, n), stream_ids(stream, n, n)
    assert sorted(first) == sorted(second) == list(range(n))  # each epoch: every sample exactly once
    assert first != second and first != list(range(n))  # shuffled, differently each epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_restarts_at_any_position_exactly(tmp_path, workers):
    out = tmp_path / "shards"
    pack(big_dataset(tmp_path / "data"), out, shard_size=4)
    whole = stream_ids(ShardStream(out, size=4, workers=workers, shuffle=5, seed=2), 0, 60)
    for position in (0, 1, 7, 22, 23, 24, 45):  # inside the first epoch, at and after its end, in the third
        resumed = ShardStream(out, size=4, workers=workers, shuffle=5, seed=2)
        assert stream_ids(resumed, position, 60 - position) == whole[position:], position


def test_stream_ranks_read_disjoint_shards(tmp_path):
    out = tmp_path / "shards"
    pack(big_dataset(tmp_path / "data"), out, shard_size=4)
    epoch = {rank: set(stream_ids(ShardStream(out, size=4, rank=rank, world=2, workers=0, shuffle=0), 0, 11)) for rank in (0, 1)}
    assert epoch[0].isdisjoint(epoch[1])
    assert epoch[0] | epoch[1] <= set(range(23)) and len(epoch[0] | epoch[1]) == 22  # rank 0: 12 samples, 11 taken; rank 1: 11
    with pytest.raises(DataError, match="leave process 6 of 7 without data"):
        ShardStream(out, size=4, rank=6, world=7)


def test_iter_packed_reads_records_without_images_and_names_a_missing_shard(tmp_path):
    out = tmp_path / "shards"
    pack(big_dataset(tmp_path / "data"), out, shard_size=10)
    assert [meta["captions"] for meta, image in iter_packed(out, images=False)] == [[f"caption {i}"] for i in range(23)]
    assert all(image is None for _, image in iter_packed(out, images=False))
    assert all(image.startswith(b"\x89PNG") for _, image in iter_packed(out))
    (out / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match=r"shard-000001.tar: shard listed in .*index.json is missing"):
        list(iter_packed(out, images=False))


def test_stream_augmentation_is_drawn_from_the_stream_position(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "text": f"noise {i}"}))
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    pack(tmp_path / "caps.jsonl", out, shard_size=3)
    plain = ShardStream(out, size=8, workers=0, shuffle=4, seed=1).take(0, 10)
    augmented = ShardStream(out, size=8, workers=0, shuffle=4, seed=1, augment=True).take(0, 10)
    resumed = ShardStream(out, size=8, workers=0, shuffle=4, seed=1, augment=True).take(4, 6)
    assert [m["index"] for _, m in plain] == [m["index"] for _, m in augmented]  # same samples, same order
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image, _ in plain + augmented)
    assert all(not np.array_equal(a, p) for (a, _), (p, _) in zip(augmented, plain))  # crops and jitter change every image
    assert all(np.array_equal(a, r) for (a, _), (r, _) in zip(augmented[4:], resumed))  # a restart draws the same


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_names_a_damaged_shard(tmp_path, workers):
    out = tmp_path / "shards"
    pack(big_dataset(tmp_path / "data"), out, shard_size=4)
    damaged = out / "shard-000003.tar"
    damaged.write_bytes(damaged.read_bytes()[:700])  # cut inside the first sample's image
    with pytest.raises(DataError, match=r"shard-000003.tar: unreadable shard \(unexpected end of data\)"):
        ShardStream(out, size=4, workers=workers, shuffle=0).take(0, 23)


def test_shards_read_a_16_bit_image_as_the_picture_it_shows(tmp_path):
    # the file's own bytes go into the shard; reading them back takes the one image pipeline
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    (tmp_path / "img").mkdir()
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "img" / "deep.png")
    source = tmp_path / "caps.jsonl"
    source.write_text(json.dumps({"image": "img/deep.png", "text": ["a deep picture"]}) + "\n")
    pack(source, tmp_path / "out")
    [(image, _)] = read_all(tmp_path / "out")
    assert np.array_equal(np.asarray(image), np.repeat(gray[..., None], 3, axis=2))
