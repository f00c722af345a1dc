"""A run as one self-contained HTML page (`mmt report RUN_DIR --out DIR`): loss, learning-rate
and metric curves (matplotlib), the evaluation table, and a gallery of test images with the
model's predictions, right and wrong, each with the heat map of where it looked
(`mmt.explain`). Every image is inlined, so the page needs no network and can be mailed.

It reads a finished run (its model/) or one still training (its newest checkpoint, with the
metrics logged so far); a last metrics line cut short by a running writer is left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from mmt import checkpoint
from mmt.api import Predictor, run_settings, saved_run_config
from mmt.errors import CheckpointError
from mmt.extras import require
from mmt.files import atomic_write_text

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
CANDIDATES = 1000  # test examples predicted when looking for right and wrong ones


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl; a torn last line (a writer mid-line) is left out,
    a damaged line before it is an error naming it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning(f"{path}: line {number} is cut short (the run is writing it?); left out")
                break
            raise ValueError(f"{path}: line {number} is not JSON ({e})") from None
    return records


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) evaluation record, by dotted key."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + key] = float(value)
    return out


def plots(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of the training losses, the learning rate and the evaluation metrics."""
    require("matplotlib", "drawing a run report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and "step" in r]
    evals = [(r["step"], _numbers(r["eval"])) for r in records if isinstance(r.get("eval"), dict)]
    drawn = []
    if train:
        figure, (losses, rates) = plt.subplots(1, 2, figsize=(10, 3.2))
        steps = [r["step"] for r in train]
        for key in ["loss", *sorted({k for r in train for k in r if k.endswith("_loss")})]:
            values = [r.get(key) for r in train]
            if any(v is not None for v in values) and not (key != "loss" and values == [r["loss"] for r in train]):
                losses.plot(steps, [math.nan if v is None else v for v in values], label=key)
        losses.set_xlabel("step"), losses.set_title("training loss"), losses.legend(fontsize=8)
        rates.plot(steps, [r.get("lr", math.nan) for r in train])
        rates.set_xlabel("step"), rates.set_title("learning rate")
        drawn.append(("Training", _figure_png(figure)))
        plt.close(figure)
    if evals:
        keys = sorted({k for _, numbers in evals for k in numbers})[:12]
        figure, axis = plt.subplots(figsize=(10, 3.6))
        for key in keys:
            axis.plot([s for s, n in evals], [n.get(key, math.nan) for _, n in evals], marker="o", label=key)
        axis.set_xlabel("step"), axis.set_title("evaluations"), axis.legend(fontsize=7, ncol=3)
        drawn.append(("Evaluation", _figure_png(figure)))
        plt.close(figure)
    return drawn


def _predictor(run_dir: Path, cfg: Any) -> tuple[Predictor | None, str]:
    """The run's final model, else its newest checkpoint (with the run's decoding settings), as
    a Predictor; (None, why) if neither."""
    from mmt import api
    from mmt.trainer_state import latest_checkpoint

    if (checkpoint.model_directory(run_dir) / checkpoint.CONFIG_NAME).is_file():
        return api.load(run_dir, device="cpu"), "the final model"
    last = latest_checkpoint(run_dir)
    tokenizer = checkpoint.load_tokenizer(run_dir)
    if last is None or tokenizer is None:
        return None, "no model yet (no checkpoint)"
    model = checkpoint.from_pretrained(last)
    return Predictor(model, tokenizer, run_dir, getattr(cfg, "generation", None)), f"checkpoint {last.name} (the run is still training)"


def _image_tag(image, width: int = 160) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img width="{width}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _examples(predictor: Predictor, cfg: Any, task: str) -> list[dict[str, Any]]:
    """Up to CANDIDATES test examples: {"image", "question" (VQA), "truth": [...]}."""
    if task == "vqa":
        from mmt.tasks.vqa import load_split

        split = load_split(cfg, "test")
        return [{"image": split.images[q.image_index], "question": q.text, "truth": list(q.human_answers) or [q.answer]}
                for q in split.questions[:CANDIDATES]]
    from mmt.tasks.common import test_image_texts

    pixels, captions, _ = test_image_texts(cfg, predictor.fit)
    return [{"image": pixels[i], "truth": captions[i]} for i in range(min(CANDIDATES, len(captions)))]


def _sheet(predictor: Predictor, example: dict[str, Any], said: Any):
    """(result, picture) of one example: its heat-map sheet (the attention map, else the gradient
    map: a joint fusion has no cross-modal attention), or, for a model no map explains yet (a
    generative VQA head), the image with the prediction alone."""
    from PIL import Image

    from mmt.data.images import from_pixels
    from mmt.explain import explain, render

    text = said if predictor.task == "retrieval" else None
    for method in ("attention", "gradient"):
        try:
            explained = explain(predictor, example["image"], question=example.get("question"), text=text, method=method)
            return explained.result, render(explained, size=160, columns=6)
        except ValueError as e:
            reason = str(e)
    picture = Image.fromarray(from_pixels(predictor.pixels([example["image"]]))[0]).resize((160, 160))
    return {"question": example.get("question"), "answer": said, "map": f"none ({reason})"}, picture


def gallery(predictor: Predictor, cfg: Any, task: str, per_kind: int = 6) -> list[dict[str, Any]]:
    """Test examples with the model's prediction and heat map: the first `per_kind` right and
    `per_kind` wrong ones where the truth decides (VQA: the answer is one of the truth's;
    retrieval: the best match among the examples' first captions is one of the image's own),
    else (captions) the first 2 * `per_kind`. Predictions are made in batches; only the
    examples shown are explained. `task` is the run's (a pretraining run's model is a
    retrieval model)."""
    examples = _examples(predictor, cfg, task)
    task = predictor.task
    images = [e["image"] for e in examples]
    if task == "vqa":
        said = [r["answer"] for r in predictor.answer(images, [e["question"] for e in examples])]
        correct = [s in e["truth"] for s, e in zip(said, examples)]
    elif task == "retrieval":
        options = [e["truth"][0] for e in examples]
        best = (predictor.embed_images(images) @ predictor.embed_texts(options).T).argmax(1).tolist()
        said = [options[b] for b in best]
        correct = [s in e["truth"] for s, e in zip(said, examples)]
    else:
        said, correct = [None] * len(examples), [True] * len(examples)
    right = [i for i, ok in enumerate(correct) if ok][: per_kind * (2 if task == "caption" else 1)]
    wrong = [i for i, ok in enumerate(correct) if not ok][:per_kind]
    shown = []
    for i in right + wrong:
        result, sheet = _sheet(predictor, examples[i], said[i])
        shown.append({**examples[i], "correct": correct[i], "result": result, "sheet": sheet})
    return shown


def _table(result: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in _numbers(result).items())
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def write_report(run_dir: str | Path, out_dir: str | Path, per_kind: int = 6) -> Path:
    """Write out_dir/report.html for the run in `run_dir` (see the module docstring)."""
    from mmt.tasks import task_class

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    settings, settings_file = run_settings(run_dir)
    if not settings:
        raise CheckpointError(f"{run_dir}: no run_config.json; a report needs a run directory made by `mmt train`")
    task = settings.get("task", "")
    cfg = saved_run_config(task_class(task).run_config, settings, settings_file)
    records = read_metrics(run_dir)
    final = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
    last_eval = next((r for r in reversed(records) if isinstance(r.get("eval"), dict)), None)
    done = max((r.get("step", 0) for r in records), default=0)
    predictor, source = _predictor(run_dir, cfg)
    parts = [
        f"<h1>{html.escape(str(run_dir))}</h1>",
        f"<p>task <b>{html.escape(task)}</b>, {done} of {cfg.train.steps} steps logged; predictions from {html.escape(source)}.</p>",
    ]
    for title, png in plots(records):
        parts.append(f'<h2>{title}</h2><img class="plot" src="data:image/png;base64,{png}">')
    if final is not None:
        parts.append(f"<h2>Evaluation (eval.json)</h2>{_table(final)}")
    elif last_eval is not None:
        parts.append(f"<h2>Evaluation at step {last_eval['step']}</h2>{_table(last_eval['eval'])}")
    if predictor is not None:
        parts.append("<h2>Test examples</h2>")
        for item in gallery(predictor, cfg, task, per_kind):
            said = ", ".join(f"{k}: {v}" for k, v in item["result"].items() if isinstance(v, (str, int, float)))
            truth = "; ".join(item["truth"][:3])
            mark = "" if task == "caption" else ('<b class="right">right</b> ' if item["correct"] else '<b class="wrong">wrong</b> ')
            parts.append(
                f'<div class="example">{_image_tag(item["sheet"], width=min(item["sheet"].width, 960))}'
                f'<p>{mark}{html.escape(said)}<br><span class="truth">truth: {html.escape(truth)}</span></p></div>'
            )
    style = ("body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}img.plot{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             ".example{margin:1em 0}.truth{color:#555}.right{color:#070}.wrong{color:#b00}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            f"<title>mmt report: {html.escape(str(run_dir))}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / REPORT_NAME, page)
    return out_dir / REPORT_NAME
