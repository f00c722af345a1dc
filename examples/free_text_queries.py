"""Free-text queries phrased unlike any shapes-world caption, against trained retrieval runs.

Each query has a truth over the test scenes (an object of that colour / shape / size); a run
ranks the 500 test images by cosine similarity and we report precision@10 (share of the
top 10 images the query is true of) beside the share of all test images it is true of.

    python examples/free_text_queries.py runs/scratch runs/minilm
"""

from __future__ import annotations

import sys

import torch

from mmt.data.images import to_pixels
from mmt.tasks.common import ShapesConfig, shapes_splits
from mmt.tasks.retrieval import embed_texts, load_for_inference


def has(colour: str | None = None, shape: str | None = None, size: str | None = None):
    def holds(scene) -> bool:
        return any(
            (colour is None or o.colour == colour) and (shape is None or o.shape == shape) and (size is None or o.size == size)
            for o in scene.objects
        )

    return holds


QUERIES = {  # phrased unlike the captions ("a small red circle ..."), then two controls in their words
    "a crimson disc": has("red", "circle"),
    "something round and scarlet": has("red", "circle"),
    "a big ball": has(shape="circle", size="large"),
    "a tiny box": has(shape="square", size="small"),
    "an emerald plus sign": has("green", "cross"),
    "a golden pyramid": has("yellow", "triangle"),
    "a grey round thing": has("gray", "circle"),
    "violet": has("purple"),
    "control: a red circle": has("red", "circle"),
    "control: a small square": has(shape="square", size="small"),
}


def main(runs: list[str]) -> None:
    _, _, test = shapes_splits(ShapesConfig(num_test=500), only=("test",))
    truth = {q: torch.tensor([holds(s) for s in test.scenes]) for q, holds in QUERIES.items()}
    print(f"{'query':32s} {'base rate':>9s} " + " ".join(f"{r.rstrip('/').split('/')[-1]:>10s}" for r in runs))
    results = {}
    for run in runs:
        model, tokenizer = load_for_inference(run)
        with torch.no_grad():
            images = model.embed_images(to_pixels(test.images))
            texts = embed_texts(model, tokenizer, list(QUERIES))
        top = (texts @ images.T).topk(10, dim=1).indices  # (Q, 10)
        results[run] = {q: truth[q][top[i]].float().mean().item() for i, q in enumerate(QUERIES)}
    for q in QUERIES:
        print(f"{q:32s} {truth[q].float().mean().item():9.2f} " + " ".join(f"{results[r][q]:10.2f}" for r in runs))
    free = [q for q in QUERIES if not q.startswith("control")]
    print(f"{'mean P@10 of the free-text queries':42s} " + " ".join(f"{sum(results[r][q] for q in free) / len(free):10.2f}" for r in runs))


if __name__ == "__main__":
    main(sys.argv[1:])
