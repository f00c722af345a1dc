"""Real data formats: COCO captions, Karpathy splits, VQA v2, JSON Lines, and webdataset shards of
any of them. Every reader checks what it reads and names the file, record and key of a problem
(`records.DataError`); `load_source` reads any of them, `check_dataset` checks every image.

The names of `source.py` are imported on first use: a reader imported on its own (and
`mmt.metrics.vqa`, which `vqa_v2` itself imports) does not pull in every other reader."""

from __future__ import annotations

import importlib
from typing import Any

from mmt.data.formats.records import DataError

_FROM_SOURCE = ("FORMATS", "DataReport", "Source", "check_dataset", "detect_format", "format_report", "load_source")

__all__ = ["DataError", *_FROM_SOURCE]


def __getattr__(name: str) -> Any:
    if name in _FROM_SOURCE:
        return getattr(importlib.import_module("mmt.data.formats.source"), name)
    raise AttributeError(f"module 'mmt.data.formats' has no attribute {name!r}")
