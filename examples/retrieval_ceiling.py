"""How well could any model retrieve shapes-world images from their captions?

Every shapes caption names every object of its scene, but scenes with the same objects share
their plain listings, and a relation or superlative may hold in several of them. An oracle
that ranks first exactly the scenes a caption is true of and whose every object it names
(checked against the scene graphs by mmt.data.worlds.shapes_truth), ties in random order, gets
text -> image R@1 = 1 / (number of such scenes) on each caption; the mean is a ceiling on
R@1 for a model that reads captions as statements of fact.

    python examples/retrieval_ceiling.py [NUM_TEST]     # about a minute for 1,000 scenes
"""

import sys

import numpy as np

from mmt.data.worlds import shapes
from mmt.data.worlds.shapes_truth import scenes_described
from mmt.tasks.retrieval import SHAPES_CAPTION_GROUPS


def main(num_test: int = 1000) -> None:
    _, _, test = shapes.splits(0, 0, num_test)
    inverse = np.zeros((num_test, 5))
    for i, captions in enumerate(test.captions):
        for j, caption in enumerate(captions):
            described = scenes_described(caption, test.scenes, complete=True)
            assert i in described, f"caption {j} of test image {i} is not true of its own scene: {caption!r}"
            inverse[i, j] = 1 / len(described)
    print(f"oracle text -> image R@1 over {num_test} test images: all captions {inverse.mean():.2%}", end="")
    for group, positions in SHAPES_CAPTION_GROUPS.items():
        print(f", {group} captions {inverse[:, positions].mean():.2%}", end="")
    print()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
