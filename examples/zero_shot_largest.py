"""Zero-shot classification with a retrieval (or pretraining) run: "which object is the largest?"

The model never trained on this question. Each test image is classified among the 32
colour-shape labels, put into the prompt "the largest object is a {}"; the answer counts
as right when it names the largest object of the scene (scenes without a single largest
object are left out). Chance is 1/32.

    python examples/zero_shot_largest.py runs/retrieval
"""

import sys

import mmt
from mmt.data.worlds import shapes


def main(run_dir: str, num_test: int = 1000) -> None:
    retrieval = mmt.load(run_dir)
    _, _, test = shapes.splits(0, 0, num_test, image_size=retrieval.image_size)
    labels = [f"{colour} {shape}" for colour in shapes.COLOURS for shape in shapes.SHAPES]
    ranked = retrieval.classify(list(test.images), labels, template="the largest object is a {}")
    right = total = 0
    for scene, result in zip(test.scenes, ranked):
        largest = scene.superlative("largest")
        if largest is None:
            continue
        o = scene.objects[largest]
        right += result["label"] == f"{o.colour} {o.shape}"
        total += 1
    print(f"zero-shot 'largest object' accuracy: {right / total:.2%} on {total} test scenes (chance {1 / len(labels):.2%})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
