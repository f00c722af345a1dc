"""The `mmt` command line. Each sub-command is a small function over the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmt.checkpoint import CheckpointError
from mmt.config import ConfigError


def _demo(args: argparse.Namespace) -> int:
    from mmt import demo

    result = demo.run(steps=args.steps, out_dir=args.out, overrides=args.set)
    return 0 if result["identical_after_reload"] else 1


def _inspect(args: argparse.Namespace) -> int:
    from mmt import checkpoint

    model = checkpoint.from_pretrained(args.model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model_dir}: {model.model_type} model, {n_params:,} parameters, weights load cleanly")
    return 0


def _run_config(args: argparse.Namespace):
    """The run config: the run's own when resuming, else defaults <- preset <- --config <- --set."""
    from mmt import config, registry
    from mmt.tasks.vqa import VQARunConfig

    if args.resume:
        path = Path(args.run_dir) / "run_config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; --resume needs a run directory made by `mmt train`")
        data = json.loads(path.read_text())
        data.pop("task", None)
        return config.apply_overrides(config.from_dict(VQARunConfig, data), args.set)
    cfg = VQARunConfig()
    if args.preset:
        cfg.model = registry.preset(args.preset)
    if args.config:  # the file's keys override the preset's
        data = config.read_data(args.config)
        try:
            cfg = config.merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}") from None
    return config.apply_overrides(cfg, args.set)


def _train(args: argparse.Namespace) -> int:
    from mmt.tasks.vqa import VQATask, format_table
    from mmt.train import train

    if args.task != "vqa":
        print(f"mmt train: task {args.task!r} is not available yet (available: vqa)", file=sys.stderr)
        return 2
    if args.resume:
        args.run_dir = args.resume
    elif not args.run_dir:
        args.run_dir = "runs/vqa"
    cfg = _run_config(args)
    if not args.resume and Path(args.run_dir, "checkpoints").exists():
        raise ConfigError(f"{args.run_dir} already holds a run; use --resume {args.run_dir} or another --run-dir")
    result = train(VQATask(cfg), args.run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if result:
        print(format_table(result))
    print(f"run directory: {args.run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mmt import config
    from mmt.data import sort_of_clevr
    from mmt.tasks.vqa import QuestionSet, VQARunConfig, VQATask, counts_by_type, format_table, load_for_inference

    run_dir = Path(args.run_dir)
    model, tokenizer, vocab = load_for_inference(run_dir)
    cfg = VQARunConfig(model=model.config)
    run_config = run_dir / "run_config.json"
    if run_config.is_file():  # evaluate on the test split the run was made with
        cfg = config.merge(cfg, {"data": json.loads(run_config.read_text()).get("data", {})})
    cfg = config.apply_overrides(cfg, args.set)
    _, test = sort_of_clevr.splits(0, cfg.data.num_test, cfg.data.seed)
    result = VQATask(cfg).evaluate(model, QuestionSet(test, tokenizer, vocab, model.config.text.max_len))
    print(format_table(result, counts_by_type(test.questions)))
    out = Path(args.out) if args.out else (run_dir / "eval.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mmt.predict import predict_file, predict_one

    if args.input:
        if not args.output:
            raise ConfigError("--input needs --output (where the answers go)")
        return predict_file(args.run_dir, args.input, args.output)
    if not args.image or args.question is None:
        raise ConfigError("give --image IMG --question TEXT, or --input Q.jsonl --output A.jsonl")
    result = predict_one(args.run_dir, args.image, args.question)
    print(json.dumps(result) if args.json else f"{result['answer']}  (score {result['score']:.3f})")
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from mmt.data.preview import preview_sort_of_clevr

    if args.dataset != "sort-of-clevr":
        raise ConfigError(f"unknown dataset {args.dataset!r} (available: sort-of-clevr)")
    path = preview_sort_of_clevr(args.out, num_scenes=args.scenes, seed=args.seed)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmt", description="Transformer-based multimodal learning.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny captioner, save, reload and caption new images")
    demo.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    demo.add_argument("--out", help="directory for the saved model (default: a new temporary directory)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    demo.set_defaults(run=_demo)

    train = commands.add_parser("train", help="train a task model on built-in data")
    train.add_argument("task", help="vqa")
    train.add_argument("--run-dir", help="where the run is written (default runs/<task>)")
    train.add_argument("--preset", help="named model preset, e.g. vqa-small, vqa-joint-small, seed-vqa")
    train.add_argument("--config", help="JSON/YAML file with model/data/train sections")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=500")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="accuracy per question type on the test split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--out", help="JSON file for the results (default RUN_DIR/eval.json)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. data.num_test=50")
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser("predict", help="answer questions about images")
    predict.add_argument("run_dir")
    predict.add_argument("--image")
    predict.add_argument("--question")
    predict.add_argument("--json", action="store_true", help="print the answer as JSON")
    predict.add_argument("--input", help="JSON Lines of {\"image\": PATH, \"question\": TEXT}")
    predict.add_argument("--output", help="JSON Lines of answers, one per input line")
    predict.set_defaults(run=_predict)

    data = commands.add_parser("data", help="built-in datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    preview = data_commands.add_parser("preview", help="draw scenes with their questions and answers")
    preview.add_argument("dataset", help="sort-of-clevr")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--scenes", type=int, default=6)
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(run=_data_preview)

    inspect = commands.add_parser("inspect", help="load a saved model directory and report on it")
    inspect.add_argument("model_dir")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
