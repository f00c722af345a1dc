"""Real data formats: COCO captions, Karpathy splits, VQA v2, JSON Lines, and webdataset shards of
any of them. Every reader checks what it reads and names the file, record and key of a problem
(`records.DataError`); `load_source` reads any of them, `check_dataset` checks every image."""

from mmt.data.formats.records import DataError
from mmt.data.formats.source import FORMATS, DataReport, Source, check_dataset, detect_format, format_report, load_source

__all__ = ["FORMATS", "DataError", "DataReport", "Source", "check_dataset", "detect_format", "format_report", "load_source"]
