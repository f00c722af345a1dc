"""Image search with a retrieval run: embed a gallery once, then find its images by text or by image.

`build_index(run_dir, images, out)` embeds every image of a gallery (a folder, walked
recursively, or a JSON Lines file of {"image": path, ...}) with the run's image tower and
writes an index directory:

    out/
      manifest.json       what was indexed, with which model (weights fingerprint), how it is searched
      chunk-000000.npy    float32 (n, E) unit-length embeddings of gallery items [0, chunk_size)
      chunk-000000.json   their paths, and the unreadable images skipped; written after the .npy
      ...
      index.faiss         the search structure over every chunk, written last

Resuming. The gallery is listed in a fixed order (sorted folder walk, or file order) and cut
by position into chunks of `chunk_size` items, so chunk i always holds the same images. Every
file is written atomically (temporary file, fsync, rename) and a chunk's .json only after its
.npy, so a chunk is done exactly when its .json exists and agrees with its .npy and with the
gallery. An interrupted build leaves whole chunks only; running it again embeds just the
missing ones, so no image is embedded twice. The manifest keeps fingerprints of the gallery
listing and of the model weights: an index is never continued over another gallery or with
another model, and queries are never embedded by a model other than the gallery's.

Search structure (faiss). Embeddings are unit-length, so inner product is cosine similarity.
- Fewer than `exact_below` vectors (default 50,000): `IndexFlatIP`, exact brute force; at that
  size a query reads 50k x E floats and nothing needs training.
- From `exact_below` on: `IndexIVFFlat` with inner product (inverted file; Jegou et al. 2011,
  "Product quantization for nearest neighbor search", without the quantisation). Spherical
  k-means, trained on a seeded sample of 64 vectors per cell, cuts the space into
  nlist ~ 4 sqrt(N) cells; each vector is stored uncompressed in the list of its nearest
  centroid, and a query scans only the `nprobe` cells (default 32) whose centroids are
  closest. Latency, build time and recall at 1M vectors: docs/results/retrieval.md
  (benchmarks/search_latency.py).
  Recall trade-off: a true neighbour is missed only when it sits in a cell beyond the
  `nprobe` probed ones; clustered vectors (as embeddings are) lose little, structureless
  uniform vectors (the worst case for any partitioning) lose much. Raising `nprobe` buys
  recall with latency, which grows about linearly with it (nprobe = nlist is exact search).
  Scores of what is found are exact cosines, since vectors are not compressed: 4E bytes
  per image. HNSW, the usual alternative, was not chosen: its graph builds far more slowly
  and needs more memory, and IVF already answers inside the latency budget
  (docs/lab-notes.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mmt import checkpoint
from mmt.api import load
from mmt.data.formats.jsonl import iter_lines
from mmt.data.formats.records import DataError
from mmt.data.images import IMAGE_EXTENSIONS, Fit, ImageError, image_files, load_image, to_pixels
from mmt.devices import choose_device
from mmt.errors import CheckpointError
from mmt.extras import require
from mmt.files import atomic_write, atomic_write_text
from mmt.tasks.retrieval import embed_texts, load_for_inference

faiss = require("faiss", "indexing and searching images (mmt index, mmt search)")

MANIFEST_NAME = "manifest.json"
FAISS_NAME = "index.faiss"
FORMAT = "mmt-image-index"
FORMAT_VERSION = 1
EXACT_BELOW = 50_000  # from this many vectors on, search an IVF index instead of brute force
NPROBE = 32  # IVF cells scanned per query (recall vs latency)
TRAIN_PER_CELL = 64  # k-means sample size per IVF cell (faiss wants at least 39)
_TEMP_FILE = re.compile(r"^\.(chunk-\d+\.(npy|json)|manifest\.json|index\.faiss)\..*\.tmp$")  # from atomic_write


class SearchIndexError(ValueError):
    """A gallery, an index directory or a query cannot be used; the message names the file or line."""


# ----------------------------------------------------------------------------- the gallery


def list_gallery(images: str | Path) -> list[str]:
    """Absolute paths of a gallery's images, in the fixed order that indexing uses.

    A folder: every file under it (recursively) whose extension is one of IMAGE_EXTENSIONS,
    in any case, sorted by path within the folder. A JSON Lines file: the "image" of each
    line in file order, relative paths resolved against the file's folder; blank lines are
    skipped and an image listed twice is kept once (at its first line), so that it cannot
    come back twice from a search.
    """
    source = Path(images)
    if source.is_dir():
        try:
            return [os.path.abspath(p) for p in image_files(source)]
        except ValueError as e:
            raise SearchIndexError(str(e)) from None
    if source.is_file():
        if source.suffix.lower() in IMAGE_EXTENSIONS:
            raise SearchIndexError(f"{source}: an image; the gallery is a folder of images or a JSON Lines file listing them")
        return _read_jsonl(source)
    raise SearchIndexError(f"{source}: no such folder or JSON Lines file")


def _read_jsonl(path: Path) -> list[str]:
    paths: list[str] = []
    seen: set[str] = set()
    for number, record in iter_lines(path):
        if isinstance(record, DataError):
            raise SearchIndexError(f"{path}:{number}: {record.detail}")
        if record is None:
            continue
        image = record.get("image")
        if not isinstance(image, str) or not image.strip():
            raise SearchIndexError(f'{path}:{number}: expected an object with an "image" path, like {{"image": "cats/1.jpg"}}')
        image = os.path.abspath(path.parent / image)  # an absolute path stays as it is
        if image not in seen:
            seen.add(image)
            paths.append(image)
    if not paths:
        raise SearchIndexError(f"{path}: no lines listing an image")
    return paths


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gallery_fingerprint(paths: list[str]) -> str:
    """Hash of the ordered gallery listing: equal listings cut into equal chunks."""
    return _sha256("\n".join(paths).encode())


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of a model directory's weights file: the same bytes embed the same way."""
    path = Path(model_dir) / checkpoint.WEIGHTS_NAME
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise SearchIndexError(f"{path}: cannot read the model weights ({e})") from None
    return "sha256:" + digest.hexdigest()


# ----------------------------------------------------------------------------- the search structure


def default_nlist(n: int) -> int:
    """IVF cells for n vectors: ~4 sqrt(n), but at least 39 training vectors per cell."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def make_faiss_index(
    vectors: np.ndarray, exact_below: int = EXACT_BELOW, nlist: int | None = None, nprobe: int = NPROBE, seed: int = 0
) -> faiss.Index:
    """A faiss inner-product index holding `vectors` (N, E), row i under id i.

    Exact `IndexFlatIP` when N < exact_below, else `IndexIVFFlat` with `nlist` cells (default
    `default_nlist(N)`) trained by spherical k-means on a seeded sample of TRAIN_PER_CELL
    vectors per cell, searching `nprobe` cells per query (see the module docstring for the
    trade-off). Vectors should be unit length, so that scores are cosines.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (N, E); got shape {vectors.shape}")
    N, E = vectors.shape
    if N < exact_below or N == 0:
        index = faiss.IndexFlatIP(E)
        index.add(vectors)
        return index
    nlist = nlist or default_nlist(N)
    if not 1 <= nlist <= N:
        raise ValueError(f"nlist={nlist} must be between 1 and the number of vectors ({N})")
    if nprobe < 1:
        raise ValueError(f"nprobe={nprobe} must be at least 1")
    quantizer = faiss.IndexFlatIP(E)
    index = faiss.IndexIVFFlat(quantizer, E, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps `quantizer` alive
    index.cp.seed = seed
    sample_size = min(N, TRAIN_PER_CELL * nlist)
    sample = vectors if sample_size == N else vectors[np.sort(np.random.default_rng(seed).choice(N, sample_size, replace=False))]
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nprobe, nlist)
    return index


def _describe_faiss(index: faiss.Index) -> dict[str, Any]:
    ivf = _ivf(index)
    if ivf is None:
        return {"type": "IndexFlatIP", "exact": True}
    return {"type": "IndexIVFFlat", "exact": False, "nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}


def _ivf(index: faiss.Index) -> Any:
    """The IVF part of `index`, or None for an exact index."""
    return faiss.try_extract_index_ivf(index)


# ----------------------------------------------------------------------------- building


def _stem(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


def _finished_chunk(out: Path, chunk: int, expected: list[str], dim: int) -> dict[str, Any] | None:
    """The record of `chunk` when its files are whole and hold exactly the `expected` images
    (less the ones recorded as skipped), else None: it has to be embedded (again)."""
    meta_path, array_path = out / f"{_stem(chunk)}.json", out / f"{_stem(chunk)}.npy"
    if not (meta_path.is_file() and array_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shape = np.load(array_path, mmap_mode="r").shape
        skipped = {item["path"] for item in meta["skipped"]}
        paths = meta["paths"]
    except (OSError, ValueError, KeyError, TypeError):  # damaged from outside: embed it again
        return None
    if paths != [p for p in expected if p not in skipped] or shape != (len(paths), dim):
        return None
    return meta


def _check_or_start_manifest(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to continue an index of another gallery, model or chunking; else (re)write the manifest."""
    path = out / MANIFEST_NAME
    if path.is_file():
        old = _read_manifest(out)
        old.setdefault("image_fit", "stretch")  # (an index begun by mmt 0.1 stretched its images)
        checks = (
            ("model_fingerprint", "model weights", "the run's model changed since indexing started"),
            ("image_fit", "image fit", "the model's vision.image_fit changed since indexing started"),
            ("gallery", "gallery listing", "images were added, removed or renamed since indexing started"),
            ("chunk_size", "chunk_size", f"pass chunk_size={old.get('chunk_size')} to continue it"),
        )
        for key, what, why in checks:
            if old.get(key) != identity[key]:
                raise SearchIndexError(
                    f"{path}: this index was started with different {what} ({why}); "
                    "delete the folder or choose another output folder to build a new index"
                )
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise SearchIndexError(f"{out}: not empty and has no {MANIFEST_NAME}; choose an empty or new folder for the index")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({**identity, "status": "building"}, indent=2) + "\n")


@torch.inference_mode()
def _embed_chunk(model, paths: list[str], size: Fit, batch_size: int, skip_bad: bool, device: torch.device, bar: tqdm):
    """(embeddings (n, E) float32, embedded paths, skipped [{"path", "error"}]) of one chunk."""
    embeddings, kept, skipped = [], [], []
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path, size))
                kept.append(path)
            except ImageError as e:
                if not skip_bad:
                    raise ImageError(e.name, f"{e.detail} (run mmt index with --skip-bad to leave it out)", e.kind) from None
                skipped.append({"path": path, "error": str(e)})
        if images:
            pixels = to_pixels(np.stack(images)).to(device)  # (B, 3, H, W)
            embeddings.append(model.embed_images(pixels).float().cpu().numpy())
        bar.update(min(batch_size, len(paths) - start))
    dim = model.config.embed_dim
    return (np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)), kept, skipped


def build_index(
    run_dir: str | Path,
    images: str | Path,
    out: str | Path,
    batch_size: int = 64,
    chunk_size: int = 1024,
    progress: bool = True,
    skip_bad: bool = False,
    exact_below: int = EXACT_BELOW,
    nlist: int | None = None,
    nprobe: int = NPROBE,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Embed the gallery `images` with the retrieval model of `run_dir` into the index folder `out`.

    Args:
        run_dir: a retrieval or pretrain run, or its saved model directory.
        images: a folder of images (recursive) or a JSON Lines file of {"image": path, ...}.
        out: the index folder; an unfinished index of the same gallery and model is continued.
        batch_size: images per forward pass.
        chunk_size: images per chunk file, the unit of resuming.
        progress: show a progress bar.
        skip_bad: skip unreadable or missing images (counted and listed) instead of raising
            ImageError naming the first one.
        exact_below, nlist, nprobe: choice of search structure, see `make_faiss_index`.
        device: where to embed ("cpu", "cuda", ...); default cuda when available.
        overrides: model.* settings changed, as `--set` does (the weights stay the run's).

    Returns a report: count (images in the index), gallery (images listed), embedded (by this
    call), resumed (found done), skipped and skipped_paths, index (faiss type and settings),
    seconds.
    """
    started = time.perf_counter()
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size={batch_size} and chunk_size={chunk_size} must be at least 1")
    out = Path(out)
    gallery = list_gallery(images)
    model_dir = checkpoint.model_directory(run_dir)
    predictor = load(model_dir, overrides=overrides)  # its errors name what is wrong with run_dir
    if predictor.task != "retrieval":
        raise CheckpointError(f"{run_dir}: a {predictor.task} model; indexing needs a retrieval or pretrain run")
    model = predictor.model
    fingerprint = model_fingerprint(model_dir)
    target = choose_device(device or "auto")
    model.to(target)
    dim, size = model.config.embed_dim, model.config.vision.image_size
    num_chunks = math.ceil(len(gallery) / chunk_size)
    identity = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_dir": os.path.abspath(model_dir),
        "model_fingerprint": fingerprint,
        "embed_dim": dim,
        "image_size": size,
        "image_fit": model.config.vision.image_fit,
        "gallery": {"count": len(gallery), "fingerprint": gallery_fingerprint(gallery)},
        "gallery_source": os.path.abspath(images),
        "chunk_size": chunk_size,
        "num_chunks": num_chunks,
    }
    _check_or_start_manifest(out, identity)
    for leftover in out.iterdir():  # temporary files of a build killed mid-write
        if _TEMP_FILE.match(leftover.name):
            leftover.unlink(missing_ok=True)

    slices = [gallery[c * chunk_size : (c + 1) * chunk_size] for c in range(num_chunks)]
    chunks = [_finished_chunk(out, c, slices[c], dim) for c in range(num_chunks)]
    resumed = sum(len(slices[c]) for c, meta in enumerate(chunks) if meta is not None)
    with tqdm(total=len(gallery), initial=resumed, disable=not progress, desc="index", unit="img", dynamic_ncols=True) as bar:
        embedded = _embed_missing(model, out, slices, chunks, chunk_size, batch_size, skip_bad, target, bar)
    vectors = np.concatenate([np.load(out / f"{_stem(c)}.npy") for c in range(num_chunks)])  # (N, E)
    index = make_faiss_index(vectors, exact_below=exact_below, nlist=nlist, nprobe=nprobe)
    atomic_write(out / FAISS_NAME, lambda tmp: faiss.write_index(index, tmp))
    skipped_paths = [item["path"] for meta in chunks for item in meta["skipped"]]
    report = {
        "count": int(index.ntotal),
        "gallery": len(gallery),
        "embedded": embedded,
        "resumed": resumed,
        "skipped": len(skipped_paths),
        "skipped_paths": skipped_paths,
        "index": {"file": FAISS_NAME, **_describe_faiss(index)},
    }
    manifest = {**identity, "status": "complete", **{k: report[k] for k in ("count", "skipped", "skipped_paths", "index")}}
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return {"out": str(out), **report, "seconds": round(time.perf_counter() - started, 3)}


def _embed_missing(
    model, out: Path, slices: list[list[str]], chunks: list[dict | None], chunk_size: int, batch_size: int, skip_bad: bool,
    device: torch.device, bar: tqdm,
) -> int:
    """Embed and write every chunk not finished yet (`chunks[c]` None), filling in its record;
    returns how many images were embedded. A chunk's .json is written after its .npy."""
    embedded = 0
    for c, meta in enumerate(chunks):
        if meta is not None:
            continue
        vectors, kept, skipped = _embed_chunk(model, slices[c], Fit.of(model.config.vision), batch_size, skip_bad, device, bar)

        def write_array(tmp: str, vectors: np.ndarray = vectors) -> None:
            with open(tmp, "wb") as fh:  # np.save(name) would append ".npy" to the temporary name
                np.save(fh, vectors.astype(np.float32))

        atomic_write(out / f"{_stem(c)}.npy", write_array)
        chunks[c] = {"chunk": c, "start": c * chunk_size, "paths": kept, "skipped": skipped}
        atomic_write_text(out / f"{_stem(c)}.json", json.dumps(chunks[c], indent=1) + "\n")
        embedded += len(kept)
    return embedded


# ----------------------------------------------------------------------------- searching


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise SearchIndexError(f"{path}: not found; is {directory} an index folder made by `mmt index`?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SearchIndexError(f"{path}: cannot read the manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SearchIndexError(f"{path}: not a manifest of an mmt image index (its \"format\" is not {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise SearchIndexError(f"{path}: index format version {manifest.get('version')}; this mmt reads version {FORMAT_VERSION}")
    return manifest


class SearchIndex:
    """A finished index folder: faiss search over the gallery's embeddings, results as paths.

    `search` takes query embeddings; `search_text` / `search_image` embed the query with the
    model named in the manifest, loaded on first use and checked against the weights
    fingerprint the gallery was embedded with.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], index: faiss.Index, paths: list[str]):
        self.directory, self.manifest, self.index, self.paths = directory, manifest, index, paths
        self._model = None
        self._tokenizer = None

    @classmethod
    def load(cls, index_dir: str | Path) -> "SearchIndex":
        directory = Path(index_dir)
        manifest = _read_manifest(directory)
        if manifest.get("status") != "complete":
            raise SearchIndexError(
                f"{directory / MANIFEST_NAME}: the index is unfinished; run `mmt index` (build_index) again with the same "
                "gallery and run to finish it (chunks already embedded are kept)"
            )
        paths: list[str] = []
        for c in range(manifest["num_chunks"]):
            path = directory / f"{_stem(c)}.json"
            try:
                paths += json.loads(path.read_text())["paths"]
            except (OSError, ValueError, KeyError) as e:
                raise SearchIndexError(f"{path}: missing or damaged chunk listing ({e}); rebuild the index") from None
        faiss_path = directory / FAISS_NAME
        if not faiss_path.is_file():
            raise SearchIndexError(f"{faiss_path}: not found; run `mmt index` (build_index) again to rebuild it")
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError as e:  # faiss's message ends with the reason
            raise SearchIndexError(f"{faiss_path}: cannot read the faiss index ({str(e).rsplit('Error: ', 1)[-1]})") from None
        if index.ntotal != len(paths) or index.d != manifest["embed_dim"]:
            raise SearchIndexError(
                f"{directory / FAISS_NAME}: holds {index.ntotal} vectors of dimension {index.d}, but the chunks list "
                f"{len(paths)} images of dimension {manifest['embed_dim']}; run `mmt index` (build_index) again to rebuild it"
            )
        return cls(directory, manifest, index, paths)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nprobe(self) -> int | None:
        """IVF cells scanned per query; None for an exact index."""
        ivf = _ivf(self.index)
        return None if ivf is None else int(ivf.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        """Set the cells scanned per query (clipped to nlist); an exact index ignores it."""
        if value < 1:
            raise ValueError(f"nprobe={value} must be at least 1")
        ivf = _ivf(self.index)
        if ivf is not None:
            ivf.nprobe = min(int(value), int(ivf.nlist))

    def search(self, query_vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[list[str]]]:
        """The k best gallery images of each query by inner product (cosine for unit vectors).

        query_vectors: (Q, E) or (E,) float. Returns scores (Q, min(k, len(self))) best first,
        and the paths of each row; where an approximate index finds fewer than k images in
        the cells it scans, that row's paths are shorter and its missing scores -inf.
        """
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(query_vectors, dtype=np.float32)))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {queries.shape}; {self.directory} holds vectors of dimension {self.dim}")
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), [[] for _ in queries]
        scores, ids = self.index.search(queries, k)  # (Q, k) each
        scores[ids < 0] = -np.inf
        return scores, [[self.paths[i] for i in row if i >= 0] for row in ids.tolist()]

    def _load_model(self):
        if self._model is None:
            model_dir = Path(self.manifest["model_dir"])
            if model_fingerprint(model_dir) != self.manifest["model_fingerprint"]:
                raise SearchIndexError(
                    f"{model_dir / checkpoint.WEIGHTS_NAME}: not the weights {self.directory} was built with "
                    "(the run trained on since); rebuild the index with this model to query it"
                )
            self._model, self._tokenizer = load_for_inference(model_dir)
        return self._model, self._tokenizer

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """(N, E) unit-length embeddings of query texts, by the gallery's model."""
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("query text is empty")
        model, tokenizer = self._load_model()
        return embed_texts(model, tokenizer, list(texts)).numpy().astype(np.float32)

    @torch.inference_mode()
    def embed_image(self, path: str | Path) -> np.ndarray:
        """(1, E) unit-length embedding of a query image (ImageError names an unreadable file)."""
        model, _ = self._load_model()
        fit = Fit(self.manifest["image_size"], self.manifest.get("image_fit", "stretch"))  # as the gallery was (0.1: stretched)
        pixels = to_pixels(np.stack([load_image(path, fit)]))  # (1, 3, H, W)
        return model.embed_images(pixels).float().numpy()

    def search_text(self, text: str, k: int = 10) -> list[dict[str, Any]]:
        """The k gallery images that best match `text`: [{"rank": 1, "path", "score"}, ...]."""
        return hits(*self.search(self.embed_text([text]), k))

    def search_image(self, path: str | Path, k: int = 10) -> list[dict[str, Any]]:
        """The k gallery images most similar to the image at `path` (itself first, if indexed)."""
        return hits(*self.search(self.embed_image(path), k))


def hits(scores: np.ndarray, paths: list[list[str]]) -> list[dict[str, Any]]:
    """The first query's results of `SearchIndex.search` as [{"rank": 1, "path", "score"}, ...]."""
    return [{"rank": r + 1, "path": p, "score": float(s)} for r, (p, s) in enumerate(zip(paths[0], scores[0]))]


def search(index_dir: str | Path, text: str | None = None, image: str | Path | None = None, k: int = 10) -> list[dict[str, Any]]:
    """Search an index folder by a text or by an image (exactly one of them).

    Returns the k best hits, best first, as [{"rank": 1, "path": ..., "score": cosine}, ...].
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one query: text=... or image=...")
    index = SearchIndex.load(index_dir)
    return index.search_text(text, k) if text is not None else index.search_image(image, k)
