"""onnxruntime against PyTorch on this CPU, in one process, on the graphs `mmt export` writes.

Each given run is exported to a temporary folder and checked first (`mmt.export.check_export`:
the largest absolute differences from PyTorch, and for the captioner whether the greedy
captions of the exported graphs equal `Predictor.caption`'s); then the same inputs go through
both, alternating, and the median time of each is reported with the ratio torch / onnxruntime
(above 1: onnxruntime is faster).

- VQA: answer logits for a batch of 32 Sort-of-CLEVR test questions, one image per question
  (PyTorch: `VQAModel.answer_logits` as `Predictor.answer` calls it, repeated questions
  encoded once; onnxruntime: every row).
- caption: greedy captions of 16 shapes-world test images (PyTorch: `CaptionModel.generate`,
  the gathered CPU step over a growing cache; onnxruntime: `OnnxCaptioner`, the numpy loop
  over the step graph); the ids must be equal.
- retrieval: embeddings of 32 shapes-world test images and of their 32 first captions.

Inputs are made beforehand (image decoding and tokenising are not timed); both run with the
same number of threads (`--threads`, default torch's).

    python benchmarks/onnx_vs_torch.py --vqa RUN --caption RUN --retrieval RUN [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmt import load
from mmt.data.worlds.export import export_world
from mmt.export import OnnxCaptioner, check_export, export_run, session


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def race(name: str, torch_fn, onnx_fn, repeats: int) -> dict:
    """Median ms of each (one warm-up call each, then alternating blocks) and torch / onnxruntime."""
    torch_fn(), onnx_fn()
    torch_ms, onnx_ms = [], []
    for _ in range(2):  # alternate, so that a neighbour's load falls on both
        torch_ms.append(median_ms(torch_fn, repeats))
        onnx_ms.append(median_ms(onnx_fn, repeats))
    row = {"what": name, "torch_ms": min(torch_ms), "onnxruntime_ms": min(onnx_ms)}
    row["ratio"] = row["torch_ms"] / row["onnxruntime_ms"]
    print(f"{name:<44} torch {row['torch_ms']:8.2f} ms   onnxruntime {row['onnxruntime_ms']:8.2f} ms   torch/onnxruntime {row['ratio']:5.2f}x")
    return row


def scenes(world: str, count: int, folder: Path) -> tuple[list[Path], list[dict]]:
    """`count` test scenes of `world` (image paths) and the questions (or captions) about them."""
    export_world(world, folder, num_scenes=count)
    records = [json.loads(line) for line in (folder / ("captions.jsonl" if world == "shapes" else "questions.jsonl")).open()]
    return sorted(folder.glob("scene-*.png")), records


def bench_vqa(run: Path, work: Path, args) -> list[dict]:
    predictor = load(run, device="cpu")
    export_run(run, work / "vqa")
    paths, questions = scenes("sort-of-clevr", 8, work / "vqa-scenes")
    questions = questions[: args.questions]
    images = [work / "vqa-scenes" / q["image"] for q in questions]
    texts = [q["question"] for q in questions]
    print("check:", check_export(run, work / "vqa", images=images, texts=texts))
    pixels = predictor.pixels(images)
    ids, _ = predictor.tokenizer.batch(texts, predictor.model.config.text.max_len, wrap="cls")
    graph = session(work / "vqa" / "vqa.onnx", args.threads)
    feeds = {"pixels": pixels.numpy(), "question_ids": ids.numpy()}

    def with_torch():
        with torch.inference_mode():
            return predictor.model.answer_logits(pixels, ids)

    return [race(f"vqa: answer logits, {len(texts)} questions", with_torch, lambda: graph.run(None, feeds), args.repeats)]


def bench_caption(run: Path, work: Path, args) -> list[dict]:
    predictor = load(run, device="cpu")
    export_run(run, work / "caption")
    paths, _ = scenes("shapes", args.images, work / "caption-scenes")
    result = check_export(run, work / "caption", images=paths)
    print("check:", result)
    pixels = predictor.pixels(paths)
    captioner = OnnxCaptioner(work / "caption", args.threads)
    config = predictor.decoding({"num_beams": 1, "do_sample": False, "num_return": 1,
                                 "max_new_tokens": captioner.decoding["max_new_tokens"]})

    def with_torch():
        with torch.inference_mode():
            return predictor.model.generate(pixels, config)

    expected, (ids, _) = with_torch(), captioner.generate(pixels.numpy())
    if not np.array_equal(expected.ids[:, 0].numpy(), ids):
        raise SystemExit("the exported captioner's greedy ids differ from PyTorch's")
    print(f"greedy ids equal on {len(ids)} images; {ids.shape[1] - 1} steps; e.g. {result['examples'][0]!r}")
    return [race(f"caption: greedy, {len(paths)} images", with_torch, lambda: captioner.generate(pixels.numpy()), args.repeats)]


def bench_retrieval(run: Path, work: Path, args) -> list[dict]:
    predictor = load(run, device="cpu")
    export_run(run, work / "retrieval")
    paths, captions = scenes("shapes", args.images * 2, work / "retrieval-scenes")
    texts = [c["text"][0] for c in captions]
    print("check:", check_export(run, work / "retrieval", images=paths, texts=texts))
    pixels = predictor.pixels(paths)
    ids, _ = predictor.tokenizer.batch(texts, predictor.model.config.text.max_len, wrap="cls")
    images, words = session(work / "retrieval" / "image_tower.onnx", args.threads), session(work / "retrieval" / "text_tower.onnx", args.threads)
    model = predictor.model

    def torch_images():
        with torch.inference_mode():
            return model.embed_images(pixels)

    def torch_texts():
        with torch.inference_mode():
            return model.embed_texts(ids)

    return [
        race(f"retrieval: image embeddings, {len(paths)} images", torch_images, lambda: images.run(None, {"pixels": pixels.numpy()}), args.repeats),
        race(f"retrieval: text embeddings, {len(texts)} texts", torch_texts, lambda: words.run(None, {"text_ids": ids.numpy()}), args.repeats),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqa", type=Path, help="a trained VQA (classifier) run")
    parser.add_argument("--caption", type=Path, help="a trained caption run")
    parser.add_argument("--retrieval", type=Path, help="a trained retrieval run")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads each; median of {args.repeats} calls")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for run, bench in ((args.vqa, bench_vqa), (args.caption, bench_caption), (args.retrieval, bench_retrieval)):
            if run is not None:
                rows += bench(run, work, args)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
