"""Tasks: the glue between data and the one training loop (the `Task` protocol, `base.py`), one
task per file. Looked up by name here without importing torch, so that the command line's
help stays quick."""

from __future__ import annotations

import importlib

# task name -> (module, Task class)
TASKS = {
    "vqa": ("mmt.tasks.vqa", "VQATask"),
    "caption": ("mmt.tasks.caption", "CaptionTask"),
    "retrieval": ("mmt.tasks.retrieval", "RetrievalTask"),
    "pretrain": ("mmt.tasks.retrieval", "PretrainTask"),
    "vqvae": ("mmt.tasks.t2i", "VQVAETask"),
    "t2i": ("mmt.tasks.t2i", "T2ITask"),
}
# the task that tests a model of each model_type (a pretrained model is a retrieval model)
TASK_OF_MODEL = {"vqa": "vqa", "caption": "caption", "retrieval": "retrieval", "vqvae": "vqvae", "t2i": "t2i"}


def task_class(name: str):
    """The Task class of the task called `name`."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r} (available: {', '.join(TASKS)})")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)
