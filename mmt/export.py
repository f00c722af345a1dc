"""Export a trained model to ONNX, run it with onnxruntime, and check it against PyTorch.

    mmt export RUN_DIR --format onnx --out DIR        # mmt.export.export_run(run_dir, out_dir)

What each model kind becomes (DIR/export.json lists every file's inputs and outputs with
their dynamic axes; the tokenizer and, for VQA, the answer vocabulary are copied beside):

- vqa (classifier head): vqa.onnx, pixels (N, 3, S, S) + question_ids (N, T) -> answer_logits
  (N, A), one image per question.
- retrieval: image_tower.onnx, pixels -> image_embedding (N, E); text_tower.onnx, text_ids
  (N, T) -> text_embedding (N, E); both unit length.
- caption: caption_encoder.onnx, pixels -> each decoder layer's cross-attention keys and values
  (cross_key.i, cross_value.i); caption_step.onnx, the newest token of each row (N, 1), its
  position (1,), each layer's self-attention keys/values of the earlier positions (past_key.i,
  past_value.i: N x H x P x Dh, P = 0 at the first step) and the cross keys/values -> the next
  token's logits (N, V) and the keys/values with the new position (present_key.i,
  present_value.i: P + 1). `OnnxCaptioner` decodes greedily with them in numpy + onnxruntime.

The graphs are traced from the models' own functions with `torch.onnx.export`'s TorchScript
path (`dynamo=False`: the dynamo exporter needs onnxscript, and the models branch in Python on
shapes, which tracing fixes at the example's values), under the literal attention kernel (the
formula written out in plain ONNX ops). The caption step is `mmt.generation.DecoderStep.logits`
over a `GrowingCache` that holds the keys/values given to the graph; the VQA graph computes
every question as it comes (`VQAModel.fuse(distinct_once=False)`: the same arithmetic without
the data-dependent choice to encode repeated questions once). `check_export` runs PyTorch and
onnxruntime side by side and reports the largest differences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmt import checkpoint, extras
from mmt.errors import CheckpointError
from mmt.files import atomic_write_text
from mmt.generation import DecoderStep
from mmt.layers.attention import attention_kernel
from mmt.layers.cache import KV, GrowingCache

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
OPSET = 17
MANIFEST_NAME = "export.json"
TOLERANCE = 1e-4  # check_export: the largest absolute difference from PyTorch allowed

Shape = tuple  # of ints and, for dynamic axes, their names


@dataclasses.dataclass
class GraphSpec:
    """One ONNX file: its inputs and outputs, name -> (dtype, shape); a str in a shape names a
    dynamic axis."""

    file: str
    inputs: dict[str, tuple[str, Shape]]
    outputs: dict[str, tuple[str, Shape]]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        every = {**self.inputs, **self.outputs}
        return {name: {i: axis for i, axis in enumerate(shape) if isinstance(axis, str)} for name, (_, shape) in every.items()}

    def describe(self) -> dict[str, Any]:
        def listed(tensors: dict[str, tuple[str, Shape]]) -> dict[str, Any]:
            return {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in tensors.items()}

        return {"file": self.file, "inputs": listed(self.inputs), "outputs": listed(self.outputs)}


class _Graph(nn.Module):
    """`function` of `model` as a module (what torch.onnx.export traces); the model's parameters
    are its own."""

    def __init__(self, model: nn.Module, function: Callable[..., Any]):
        super().__init__()
        self.model, self.function = model, function

    def forward(self, *inputs: Tensor) -> Any:
        return self.function(*inputs)


class _GivenCache(GrowingCache):
    """A GrowingCache holding the keys/values given to the step graph, whose next position is a
    (1,) tensor (as a static cache's is), so that the traced graph reads both as inputs."""

    def __init__(self, past: Sequence[KV], position: Tensor):
        super().__init__(len(past))
        for layer, kv in zip(self.layers, past, strict=True):
            layer.k, layer.v = kv.k, kv.v
        self.position = position

    @property
    def start(self) -> Tensor:
        return self.position


def _kv_names(prefix: str, depth: int) -> list[str]:
    return [f"{prefix}_{part}.{i}" for i in range(depth) for part in ("key", "value")]


def _flat(kvs: Sequence[KV]) -> tuple[Tensor, ...]:
    return tuple(t for kv in kvs for t in kv)


def _paired(tensors: Sequence[Tensor]) -> list[KV]:
    return [KV(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]


# ----------------------------------------------------------------------------- the graphs


def _vqa_graphs(model, rows: int = 2, length: int = 6) -> list[tuple[GraphSpec, _Graph, tuple[Tensor, ...]]]:
    if model.config.head != "classify":
        raise ValueError("only a VQA classifier (model.head='classify') exports; this model writes its answers (head='generate')")
    cfg = model.config
    S = cfg.vision.image_size
    spec = GraphSpec(
        "vqa.onnx",
        {"pixels": ("float32", ("batch", 3, S, S)), "question_ids": ("int64", ("batch", "question_length"))},
        {"answer_logits": ("float32", ("batch", cfg.num_answers))},
    )
    graph = _Graph(model, lambda pixels, ids: model.answer_logits(pixels, ids, distinct_once=False))
    return [(spec, graph, (_example_pixels(rows, S), _example_ids(rows, length, cfg.text.vocab_size)))]


def _retrieval_graphs(model, rows: int = 2, length: int = 6) -> list[tuple[GraphSpec, _Graph, tuple[Tensor, ...]]]:
    cfg = model.config
    S, E = cfg.vision.image_size, cfg.embed_dim
    images = GraphSpec("image_tower.onnx", {"pixels": ("float32", ("batch", 3, S, S))}, {"image_embedding": ("float32", ("batch", E))})
    texts = GraphSpec(
        "text_tower.onnx", {"text_ids": ("int64", ("batch", "text_length"))}, {"text_embedding": ("float32", ("batch", E))}
    )
    return [
        (images, _Graph(model, model.embed_images), (_example_pixels(rows, S),)),
        (texts, _Graph(model, model.embed_texts), (_example_ids(rows, length, cfg.text.vocab_size),)),
    ]


def _caption_context(model, pixels: Tensor) -> tuple[Tensor, ...]:
    """Each decoder layer's cross-attention keys/values of the images (no pixel mask: no padding)."""
    image_tokens, _ = model.encode_images(pixels)
    return _flat(model.decoder.project_context(image_tokens))


def _caption_step(model, ids: Tensor, position: Tensor, *kv: Tensor) -> tuple[Tensor, ...]:
    """(logits of the token after `ids` (N, 1), each layer's keys/values with the new position):
    `DecoderStep.logits` over the given past keys/values and the images' cross keys/values."""
    depth = len(model.decoder.layers)
    cache = _GivenCache(_paired(kv[: 2 * depth]), position)
    logits = DecoderStep(model.embed, model.decoder, model.lm_head, _paired(kv[2 * depth :]), None, cache).logits(ids)
    return (logits, *_flat(KV(layer.k, layer.v) for layer in cache.layers))


def _caption_graphs(model, rows: int = 2, past: int = 2) -> list[tuple[GraphSpec, _Graph, tuple[Tensor, ...]]]:
    cfg = model.config
    S, depth = cfg.vision.image_size, len(model.decoder.layers)
    attn = model.decoder.layers[0].self_attn
    H, Dh = attn.heads, attn.head_dim
    pixels = _example_pixels(rows, S)
    with torch.no_grad():
        cross = _caption_context(model, pixels)
    N = cross[0].shape[2]
    cross_specs = {name: ("float32", ("batch", H, N, Dh)) for name in _kv_names("cross", depth)}
    encoder = GraphSpec("caption_encoder.onnx", {"pixels": ("float32", ("batch", 3, S, S))}, cross_specs)
    step = GraphSpec(
        "caption_step.onnx",
        {
            "ids": ("int64", ("batch", 1)),
            "position": ("int64", (1,)),
            **{name: ("float32", ("batch", H, "past", Dh)) for name in _kv_names("past", depth)},
            **cross_specs,
        },
        {
            "logits": ("float32", ("batch", cfg.vocab_size)),
            **{name: ("float32", ("batch", H, "present", Dh)) for name in _kv_names("present", depth)},
        },
    )
    # the example decodes position `past` after `past` earlier ones (not 0: attention over one
    # key per query, with nothing before it, may take other branches)
    past_kv = tuple(torch.randn(rows, H, past, Dh) for _ in range(2 * depth))
    step_inputs = (_example_ids(rows, 1, cfg.vocab_size), torch.tensor([past]), *past_kv, *cross)
    return [
        (encoder, _Graph(model, lambda pixels: _caption_context(model, pixels)), (pixels,)),
        (step, _Graph(model, lambda ids, position, *kv: _caption_step(model, ids, position, *kv)), step_inputs),
    ]


GRAPHS = {"vqa": _vqa_graphs, "retrieval": _retrieval_graphs, "caption": _caption_graphs}


def _example_pixels(rows: int, size: int) -> Tensor:
    return torch.rand(rows, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _example_ids(rows: int, length: int, vocab_size: int) -> Tensor:
    ids = torch.randint(7, max(vocab_size, 8), (rows, length), generator=torch.Generator().manual_seed(0))
    return ids.clamp(max=vocab_size - 1)


def _trace(spec: GraphSpec, graph: nn.Module, example: tuple[Tensor, ...], path: Path) -> None:
    with torch.no_grad(), attention_kernel("literal"), warnings.catch_warnings():
        # tracing fixes the models' Python branches on shapes at the example's values, as intended
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*dynamo=False.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # (a vision tower's relative bias indexes its table by offsets shifted to be non-negative)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
        torch.onnx.export(
            graph, example, str(path), input_names=list(spec.inputs), output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False,
        )


# ----------------------------------------------------------------------------- export


def _check_directories(run_dir: Path, out_dir: Path, format: str) -> Path:
    """The run's model directory, after checking the format and that `out_dir` is new or empty."""
    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is not one of: {', '.join(FORMATS)}")
    model_dir = checkpoint.model_directory(run_dir)
    if not (model_dir / checkpoint.CONFIG_NAME).is_file():
        raise CheckpointError(f"{run_dir}: not a run or model directory (no {checkpoint.CONFIG_NAME} in it or in its model/)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not an empty folder; export into a new or empty folder")
    return model_dir


def export_run(run_dir: str | Path, out_dir: str | Path, format: str = "onnx") -> dict[str, Any]:
    """Export the model of a run (or model) directory to `out_dir` (new or empty) as ONNX graphs
    with an export.json manifest, the tokenizer and, for VQA, answers.json (see the module
    docstring); returns the manifest."""
    from mmt.api import load

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_directories(run_dir, out_dir, format)
    onnx = extras.require("onnx", "exporting to ONNX")
    # what mmt.load makes of the run: the model, and the decoding settings the greedy loop keeps
    # (a VQA classifier without its answers.json stops here, naming the file)
    predictor = load(run_dir, device="cpu")
    kind = predictor.task
    if kind not in GRAPHS:
        raise ValueError(f"{predictor.directory}: {kind} models do not export (exported kinds: {', '.join(GRAPHS)})")
    work = out_dir.parent / f".{out_dir.name}.tmp-export"  # out_dir appears whole, or not at all
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        manifest = _export_into(work, predictor, format, onnx)
        os.replace(work, out_dir)  # (an empty out_dir is replaced)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _export_into(work: Path, predictor, format: str, onnx) -> dict[str, Any]:
    from mmt.api import ANSWERS_NAME

    model, model_dir = predictor.model, predictor.directory
    kind, cfg = model.model_type, model.config
    graphs = []
    for spec, graph, example in GRAPHS[kind](model):
        log.info("exporting %s", spec.file)
        _trace(spec, graph, example, work / spec.file)
        onnx.checker.check_model(str(work / spec.file))
        graphs.append(spec.describe())
    shutil.copy2(model_dir / checkpoint.TOKENIZER_NAME, work / checkpoint.TOKENIZER_NAME)
    S = cfg.vision.image_size
    manifest: dict[str, Any] = {
        "format": format,
        "model_type": kind,
        "source": str(model_dir.resolve()),
        "mmt_version": checkpoint._version(),
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}, opset {OPSET}",
        "pixels": f"float32 (batch, 3, {S}, {S}) RGB in [-1, 1] (uint8 / 127.5 - 1), the image fitted to the square "
        f"by '{cfg.vision.image_fit}' (mmt.data.images)",
        "tokenizer": checkpoint.TOKENIZER_NAME,
        "graphs": graphs,
    }
    if kind == "vqa":
        shutil.copy2(model_dir / ANSWERS_NAME, work / ANSWERS_NAME)
        manifest["answers"] = ANSWERS_NAME
        manifest["question_ids"] = (
            f"[CLS] question [SEP], right-padded with [PAD] = {cfg.text.pad_id}, at most {cfg.text.max_len} tokens "
            "(mmt.text.Tokenizer.batch(wrap='cls'))"
        )
    elif kind == "retrieval":
        manifest["text_ids"] = (
            f"[CLS] text [SEP], right-padded with [PAD] = {cfg.text.pad_id}, at most {cfg.text.max_len} tokens "
            "(mmt.text.Tokenizer.batch(wrap='cls'))"
        )
    else:
        generation = predictor.generation
        attn = model.decoder.layers[0].self_attn
        manifest["decoding"] = {
            "bos_id": cfg.bos_id, "eos_id": cfg.eos_id, "pad_id": cfg.pad_id, "never": [cfg.pad_id, cfg.bos_id],
            "max_new_tokens": min(generation.max_new_tokens, cfg.max_len - 1), "layers": len(model.decoder.layers),
            "heads": attn.heads, "head_dim": attn.head_dim,
            "loop": "greedy: ids = [[BOS]]; per step feed the newest token at position t with past_* (empty at t = 0), "
            "take the argmax of the logits without [PAD] and [BOS], [PAD] after [EOS], present_* become past_* "
            "(mmt.export.OnnxCaptioner)",
        }
    manifest["files"] = sorted(p.name for p in work.iterdir()) + [MANIFEST_NAME]
    atomic_write_text(work / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; is {export_dir} a folder written by mmt export?")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- onnxruntime


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of one exported graph; `threads`: its intra-op threads (None:
    onnxruntime's default, one per core)."""
    ort = extras.require("onnxruntime", "running an exported ONNX model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _graph_file(manifest: dict[str, Any], file: str) -> dict[str, Any]:
    return next(g for g in manifest["graphs"] if g["file"] == file)


def _log_softmax(logits: np.ndarray, never: Sequence[int]) -> np.ndarray:
    """Next-token log-probabilities (N, V) in float32, -inf for `never` (as mmt.generation's)."""
    x = logits.astype(np.float32)  # (a copy)
    x[:, list(never)] = -np.inf
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


class OnnxCaptioner:
    """Greedy captions from an exported caption model: numpy and onnxruntime only (the loop of
    `mmt.generation.generate`, num_beams=1)."""

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        self.directory = Path(export_dir)
        self.manifest = read_manifest(export_dir)
        if self.manifest["model_type"] != "caption":
            raise ValueError(f"{export_dir} holds an exported {self.manifest['model_type']} model, not a captioner")
        self.encoder = session(self.directory / "caption_encoder.onnx", threads)
        self.step = session(self.directory / "caption_step.onnx", threads)
        self.decoding = self.manifest["decoding"]
        self.cross_names = list(_graph_file(self.manifest, "caption_encoder.onnx")["outputs"])
        self.past_names = _kv_names("past", self.decoding["layers"])
        self._tokenizer = None

    def generate(self, pixels: np.ndarray, max_new_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, L) starting with [BOS], [PAD] after [EOS], and their summed log-probabilities (B,)
        for pixels (B, 3, S, S) float32 in [-1, 1]."""
        d = self.decoding
        limit = d["max_new_tokens"] if max_new_tokens is None else min(max_new_tokens, d["max_new_tokens"])
        B = len(pixels)
        cross = dict(zip(self.cross_names, self.encoder.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})))
        empty = np.zeros((B, d["heads"], 0, d["head_dim"]), np.float32)
        past = {name: empty for name in self.past_names}
        ids = np.full((B, 1), d["bos_id"], np.int64)
        scores = np.zeros(B, np.float32)
        done = np.zeros(B, bool)
        rows = np.arange(B)
        for t in range(limit):
            logits, *present = self.step.run(None, {"ids": ids[:, -1:], "position": np.array([t], np.int64), **past, **cross})
            logp = _log_softmax(logits, d["never"])
            next_id = logp.argmax(-1)
            scores += np.where(done, np.float32(0), logp[rows, next_id])
            next_id = np.where(done, d["pad_id"], next_id)
            ids = np.concatenate([ids, next_id[:, None]], axis=1)
            done |= next_id == d["eos_id"]
            if done.all():
                break
            past = dict(zip(self.past_names, present))
        return ids, scores

    def caption(self, pixels: np.ndarray) -> list[str]:
        """The greedy caption of each image (pixels as in `generate`)."""
        from mmt.text import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.directory / self.manifest["tokenizer"])
        ids, _ = self.generate(pixels)
        return [self._tokenizer.decode(row) for row in ids]


# ----------------------------------------------------------------------------- the check


def _max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def _text_ids(tokenizer, texts: Sequence[str] | None, rows: int, max_len: int, vocab_size: int, seed: int) -> Tensor:
    """Token ids (N, T) of `texts` ([CLS] text [SEP], padded), or of `rows` random texts of different lengths."""
    if texts is not None:
        return tokenizer.batch(list(texts), max_len, wrap="cls")[0]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len - 1, rows)  # words per text
    ids = np.full((rows, int(lengths.max()) + 2), tokenizer.pad_id, np.int64)
    for row, n in zip(ids, lengths):
        row[0], row[1 : n + 1], row[n + 1] = tokenizer.cls_id, rng.integers(7, max(vocab_size, 8), n), tokenizer.sep_id
    return torch.from_numpy(ids.clip(max=vocab_size - 1))


@torch.no_grad()
def check_export(
    run_dir: str | Path, export_dir: str | Path, images: Sequence[Any] | None = None, texts: Sequence[str] | None = None,
    rows: int = 5, seed: int = 0,
) -> dict[str, Any]:
    """Run the run's PyTorch model (`mmt.load`, on the CPU) and the exported graphs on the same
    inputs: {"max_abs_diff": {output: largest absolute difference}, "ok": all <= TOLERANCE, and
    for a captioner "captions_equal" (greedy captions of `OnnxCaptioner` and
    `Predictor.caption` equal, of "captions"), "mismatches"}.

    Args:
        images: what `Predictor.pixels` reads (paths, arrays, ...); default `rows` random images.
        texts: questions (VQA) or texts (retrieval); default `rows` random token sequences of
            different lengths.
    """
    from mmt.api import load

    predictor = load(run_dir, device="cpu")
    model, tokenizer = predictor.model, predictor.tokenizer
    manifest = read_manifest(export_dir)
    export_dir = Path(export_dir)
    if manifest["model_type"] != model.model_type:
        raise ValueError(f"{export_dir} holds an exported {manifest['model_type']} model, {run_dir} a {model.model_type} model")
    S = predictor.image_size
    if images is None:
        pixels = torch.rand(rows, 3, S, S, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    else:
        pixels = predictor.pixels(images)
    n = len(pixels)
    diffs: dict[str, float] = {}
    result: dict[str, Any] = {"model_type": model.model_type, "rows": n, "max_abs_diff": diffs}
    if model.model_type in ("vqa", "retrieval"):
        text = model.config.text
        ids = _text_ids(tokenizer, texts, n, text.max_len, text.vocab_size, seed)
        if len(ids) != n:
            raise ValueError(f"{len(ids)} texts for {n} images: give one per image")
    if model.model_type == "vqa":
        expected = model.answer_logits(pixels, ids)
        got = session(export_dir / "vqa.onnx").run(None, {"pixels": pixels.numpy(), "question_ids": ids.numpy()})[0]
        diffs["answer_logits"] = _max_diff(expected, got)
        result["answers_equal"] = int((expected.argmax(-1).numpy() == got.argmax(-1)).sum())
    elif model.model_type == "retrieval":
        got = session(export_dir / "image_tower.onnx").run(None, {"pixels": pixels.numpy()})[0]
        diffs["image_embedding"] = _max_diff(model.embed_images(pixels), got)
        got = session(export_dir / "text_tower.onnx").run(None, {"text_ids": ids.numpy()})[0]
        diffs["text_embedding"] = _max_diff(model.embed_texts(ids), got)
    else:
        result.update(_check_captioner(predictor, export_dir, pixels, diffs))
    result["ok"] = all(d <= TOLERANCE for d in diffs.values()) and result.get("captions_equal") == result.get("captions")
    return result


def _check_captioner(predictor, export_dir: Path, pixels: Tensor, diffs: dict[str, float]) -> dict[str, Any]:
    """The captioner's part of `check_export`: cross keys/values; the step's logits and keys/values
    along each image's greedy caption against the model's teacher-forced logits; the captions."""
    model = predictor.model
    captioner = OnnxCaptioner(export_dir)
    cross = captioner.encoder.run(None, {"pixels": pixels.numpy()})
    image_tokens, _ = model.encode_images(pixels)
    expected_cross = _flat(model.decoder.project_context(image_tokens))
    diffs["cross_key_values"] = max(_max_diff(e, g) for e, g in zip(expected_cross, cross))
    ids, scores = captioner.generate(pixels.numpy())
    expected_logits = model.next_token_logits(torch.from_numpy(ids), image_tokens)  # (B, L, V), teacher forced
    d = captioner.decoding
    past = {name: np.zeros((len(ids), d["heads"], 0, d["head_dim"]), np.float32) for name in captioner.past_names}
    worst = 0.0
    for t in range(ids.shape[1]):
        feeds = {"ids": ids[:, t : t + 1], "position": np.array([t], np.int64), **past, **dict(zip(captioner.cross_names, cross))}
        logits, *present = captioner.step.run(None, feeds)
        worst = max(worst, _max_diff(expected_logits[:, t], logits))
        past = dict(zip(captioner.past_names, present))
    diffs["step_logits"] = worst
    options = {"num_beams": 1, "do_sample": False, "num_return": 1, "max_new_tokens": d["max_new_tokens"]}
    expected = predictor.caption(list(pixels), **options)
    got = [predictor.tokenizer.decode(row) for row in ids]
    diffs["caption_scores"] = _max_diff(model.generate(pixels, predictor.decoding(options)).scores[:, 0], scores)
    mismatches = [{"torch": e["caption"], "onnx": g} for e, g in zip(expected, got) if e["caption"] != g]
    return {"captions": len(got), "captions_equal": len(got) - len(mismatches), "mismatches": mismatches, "examples": got[:3]}
