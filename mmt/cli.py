"""The `mmt` command line. Each sub-command is a small function over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mmt.checkpoint import CheckpointError
from mmt.config import ConfigError
from mmt.train import TrainingError


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


def _tasks() -> dict:
    """Trainable tasks: name -> (run config class, task class)."""
    from mmt.tasks.caption import CaptionRunConfig, CaptionTask
    from mmt.tasks.retrieval import PretrainRunConfig, PretrainTask, RetrievalRunConfig, RetrievalTask
    from mmt.tasks.vqa import VQARunConfig, VQATask

    return {
        "vqa": (VQARunConfig, VQATask),
        "caption": (CaptionRunConfig, CaptionTask),
        "retrieval": (RetrievalRunConfig, RetrievalTask),
        "pretrain": (PretrainRunConfig, PretrainTask),
    }


def _run_config(args: argparse.Namespace):
    """The run config: the run's own when resuming, else defaults <- preset <- --config <- --set."""
    from mmt import config, registry

    config_class = _tasks()[args.task][0]
    if args.resume:
        path = Path(args.run_dir) / "run_config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; --resume needs a run directory made by `mmt train`")
        data = json.loads(path.read_text())
        if data.pop("task", args.task) != args.task:
            raise ConfigError(f"{path}: this run trained another task; use `mmt train <its task> --resume`")
        return config.apply_overrides(config.from_dict(config_class, data), args.set)
    cfg = config_class()
    if args.preset:
        cfg.model = registry.preset(args.preset)
    if args.config:  # the file's keys override the preset's
        data = config.read_data(args.config)
        try:
            cfg = config.merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}") from None
    cfg = config.apply_overrides(cfg, args.set)
    if args.init:
        from mmt.checkpoint import model_directory, read_config

        read_config(model_directory(args.init))  # fail now, with the file named, if it is not a model
        cfg.train.init = str(args.init)
    return cfg


def _print_result(task: str, result: dict) -> None:
    if task == "vqa":
        from mmt.tasks.vqa import format_table

        print(format_table(result))
    elif task in ("retrieval", "pretrain"):
        from mmt.tasks.retrieval import format_recall

        print(format_recall(result))
    else:
        from mmt.metrics.captions import format_scores

        print(format_scores(result))


def _train(args: argparse.Namespace) -> int:
    from mmt.train import train

    tasks = _tasks()
    if args.task not in tasks:
        print(f"mmt train: task {args.task!r} is not available yet (available: {', '.join(tasks)})", file=sys.stderr)
        return 2
    if args.resume:
        args.run_dir = args.resume
    elif not args.run_dir:
        args.run_dir = f"runs/{args.task}"
    cfg = _run_config(args)
    if not args.resume and Path(args.run_dir, "checkpoints").exists():
        raise ConfigError(f"{args.run_dir} already holds a run; use --resume {args.run_dir} or another --run-dir")
    result = train(tasks[args.task][1](cfg), args.run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if result:
        _print_result(args.task, result)
    print(f"run directory: {args.run_dir}")
    return 0


def _saved_run_config(run_dir: Path, cfg, args: argparse.Namespace):
    """`cfg` with the run's own data (and generation) settings, then --set."""
    from mmt import config

    from mmt.checkpoint import model_directory

    found = [p for p in (run_dir / "run_config.json", model_directory(run_dir) / "run_config.json") if p.is_file()]
    if found:  # evaluate on the test split the run was made with
        saved = json.loads(found[0].read_text())
        cfg = config.merge(cfg, {k: saved[k] for k in ("dataset", "data", "shapes", "generation", "source") if k in saved})
    else:
        print(f"mmt eval: no run_config.json in {run_dir}: evaluating on the default data settings", file=sys.stderr)
    return config.apply_overrides(cfg, args.set)


def _eval(args: argparse.Namespace) -> int:
    from mmt import checkpoint

    run_dir = Path(args.run_dir)
    model_type, _ = checkpoint.read_config(checkpoint.model_directory(run_dir))
    out = Path(args.out) if args.out else (run_dir / "eval.json")
    if model_type == "caption":
        return _eval_caption(run_dir, out, args)
    if model_type == "retrieval":
        return _eval_retrieval(run_dir, out, args)
    from mmt.tasks.vqa import QuestionSet, VQARunConfig, VQATask, counts_by_type, format_table, load_for_inference, load_split

    model, tokenizer, vocab = load_for_inference(run_dir)
    cfg = _saved_run_config(run_dir, VQARunConfig(model=model.config), args)
    test = load_split(cfg, "test")
    result = VQATask(cfg).evaluate(model, QuestionSet(test, tokenizer, vocab, model.config))
    print(format_table(result, counts_by_type(test.questions)))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def _eval_caption(run_dir: Path, out: Path, args: argparse.Namespace) -> int:
    import time

    from mmt.metrics.captions import format_scores, write_coco_references, write_coco_results
    from mmt.tasks.caption import CaptionRunConfig, caption_images, evaluate_captions, load_for_inference, score_references

    model, tokenizer = load_for_inference(run_dir)
    cfg = _saved_run_config(run_dir, CaptionRunConfig(model=model.config), args)
    pixels, references, test = _test_image_texts(cfg, model.config.vision.image_size)
    started = time.perf_counter()
    captions = caption_images(model, tokenizer, pixels, cfg.generation)
    seconds = time.perf_counter() - started
    # METEOR and PTB tokens when Java is present; truth only where there are scene graphs
    if test is None:
        result = score_references(captions, references, meteor=None, tokenize=None)
    else:
        result = evaluate_captions(captions, test, meteor=None, tokenize=None)
    print(f"{len(captions)} test images captioned in {seconds:.1f}s ({_decoding(cfg.generation)})")
    print(format_scores(result))
    results_path = out.with_name(out.stem + "_captions.json")
    write_coco_results(results_path, dict(enumerate(captions)))
    write_coco_references(out.with_name(out.stem + "_references.json"), dict(enumerate(references)))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}; captions (COCO results format) in {results_path}")
    return 0


def _eval_retrieval(run_dir: Path, out: Path, args: argparse.Namespace) -> int:
    import time

    from mmt.tasks.retrieval import SHAPES_CAPTION_GROUPS, RetrievalRunConfig, format_recall, load_for_inference, retrieval_scores

    model, tokenizer = load_for_inference(run_dir)
    cfg = _saved_run_config(run_dir, RetrievalRunConfig(model=model.config), args)
    model.config.rerank_adds_contrastive = cfg.model.rerank_adds_contrastive  # --set model.rerank_adds_contrastive=false
    pixels, captions, shapes_test = _test_image_texts(cfg, model.config.vision.image_size)
    groups = SHAPES_CAPTION_GROUPS if shapes_test is not None else None
    started = time.perf_counter()
    result = retrieval_scores(model, tokenizer, pixels, captions, rerank_k=args.rerank_k, caption_groups=groups)
    seconds = time.perf_counter() - started
    texts = sum(len(c) for c in captions)
    print(f"{len(captions)} test images, {texts} captions, scored in {seconds:.1f}s")
    print(format_recall(result))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def _test_image_texts(cfg, size: int):
    """(pixels, captions per image, the shapes split or None) a caption or retrieval run is
    tested on: source.test (else source.val) for a run on its own data, else the shapes
    world's test split."""
    import dataclasses

    from mmt.data.transforms import to_pixels
    from mmt.tasks.common import load_image_texts, shapes_splits

    source = cfg.source
    if not source.train:
        _, _, test = shapes_splits(dataclasses.replace(cfg.data, num_train=0, num_val=0))
        return to_pixels(test.images), test.captions, test
    path = source.test or source.val
    if not path:
        raise ConfigError("this run trained on source.train with a held-out validation tail; give --set source.test=FILE")
    own = load_image_texts(path, source, size, source.test_split if source.test else source.val_split)
    return own.pixels, own.captions, None


def _decoding(generation) -> str:
    if generation.num_beams > 1:
        return f"beam search, width {generation.num_beams}"
    return "sampling" if generation.do_sample else "greedy"


def _generation_config(args: argparse.Namespace):
    from mmt.generation import GenerationConfig

    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.beam,
        length_penalty=args.length_penalty,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_return=args.num_return,
        seed=args.seed,
    )
    cfg.validate()
    return cfg


def _predict(args: argparse.Namespace) -> int:
    from mmt.predict import predict_file, predict_one

    generation = _generation_config(args)
    labels = args.labels.split(",") if args.labels else None
    if args.input:
        if not args.output:
            raise ConfigError("--input needs --output (where the answers go)")
        return predict_file(args.run_dir, args.input, args.output, generation, labels, args.template)
    if not args.image:
        raise ConfigError("give --image IMG (and --question TEXT for VQA), or --input IN.jsonl --output OUT.jsonl")
    result = predict_one(args.run_dir, args.image, args.question, generation, labels, args.template)
    if args.json:
        print(json.dumps(result))
    elif "label" in result:
        for item in result["labels"]:
            print(f"{item['score']:.4f}  {item['label']}")
    elif "caption" in result:
        for item in result.get("captions", [result]):
            print(f"{item['caption']}  (score {item['score']:.3f})")
    else:
        print(f"{result['answer']}  (score {result['score']:.3f})")
    return 0


def _score(args: argparse.Namespace) -> int:
    from mmt.metrics.captions import format_scores, score_files

    scores = score_files(args.results, args.references)
    print(format_scores(scores))
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _score_vqa(args: argparse.Namespace) -> int:
    from mmt.metrics.vqa import format_vqa_scores, score_files

    scores = score_files(args.results, args.questions, args.annotations, always_normalize=args.always_normalize)
    print(format_vqa_scores(scores, question_types=args.question_types))
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _index(args: argparse.Namespace) -> int:
    from mmt.search import build_index

    summary = build_index(
        args.run_dir, args.images, args.out, batch_size=args.batch_size, skip_bad=args.skip_bad, progress=not args.no_progress
    )
    resumed = f", {summary['resumed']} already there from an interrupted run" if summary["resumed"] else ""
    skipped = f"; {summary['skipped']} unreadable images skipped" if summary["skipped"] else ""
    print(f"indexed {summary['count']} images into {summary['out']} ({summary['embedded']} embedded now{resumed}){skipped}; "
          f"search structure: {summary['index']['type']}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from mmt.search import SearchIndex

    if (args.text is None) == (args.image is None):
        raise ConfigError("give exactly one of --text TEXT or --image IMG")
    index = SearchIndex.load(args.index_dir)
    if args.nprobe:
        index.nprobe = args.nprobe
    hits = index.search_text(args.text, args.k) if args.text is not None else index.search_image(args.image, args.k)
    if args.json:
        print(json.dumps(hits))
    else:
        for hit in hits:
            print(f"{hit['rank']:3d}  {hit['score']:.4f}  {hit['path']}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from mmt.data.records import check_dataset, format_report, load_source

    source = load_source(
        args.source, image_root=args.images, kind=args.kind, skip_bad=args.skip_bad, annotations=args.annotations, split=args.split
    )
    report = check_dataset(source, load=not args.headers_only, skip_bad=args.skip_bad)
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def _data_pack(args: argparse.Namespace) -> int:
    from mmt.data.shards import pack

    summary = pack(args.source, args.out, image_root=args.images, kind=args.kind, shard_size=args.shard_size, skip_bad=args.skip_bad)
    skipped = summary["skipped"]["total"]
    print(f"packed {summary['num_samples']} records into {summary['num_shards']} shards in {args.out}"
          + (f"; {skipped} bad records skipped" if skipped else ""))
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from mmt.data.preview import preview_sort_of_clevr
    from mmt.data.shapes_preview import preview_shapes

    previews = {"sort-of-clevr": preview_sort_of_clevr, "shapes": preview_shapes}
    if args.dataset not in previews:
        raise ConfigError(f"unknown dataset {args.dataset!r} (available: {', '.join(previews)})")
    path = previews[args.dataset](args.out, num_scenes=args.scenes, seed=args.seed)
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
    train.add_argument("task", help="vqa, caption, retrieval or pretrain")
    train.add_argument("--run-dir", help="where the run is written (default runs/<task>)")
    train.add_argument("--preset", help="named model preset, e.g. vqa-small, seed-vqa, caption-small")
    train.add_argument("--config", help="JSON/YAML file with model/data/train sections")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=500")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--init", metavar="RUN_DIR", help="start from the weights of another run (e.g. pretrain) where names and shapes match")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="score a run on its test split (VQA: accuracy per question type; captioning: caption metrics and truth; retrieval: Recall@K)")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--out", help="JSON file for the results (default RUN_DIR/eval.json)")
    evaluate.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="e.g. data.num_test=50 (Sort-of-CLEVR VQA), shapes.num_test=100 (shapes VQA), data.num_test=100 or generation.num_beams=3 (captioning)",
    )
    evaluate.add_argument("--rerank-k", type=int, help="retrieval: re-rank this many contrastive candidates with the matching head (default: the model's)")
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser("predict", help="answer questions about images, or caption images")
    predict.add_argument("run_dir")
    predict.add_argument("--image")
    predict.add_argument("--question", help="the question (VQA runs)")
    predict.add_argument("--json", action="store_true", help="print the result as JSON")
    predict.add_argument("--labels", help='retrieval / pretrain runs: classify zero-shot among these comma-separated labels, e.g. "red,blue,green"')
    predict.add_argument("--template", default="{}", help='prompt each label is put into, e.g. "the largest object is {}" (default "{}")')
    predict.add_argument("--input", help="JSON Lines of {\"image\": PATH} (+ \"question\": TEXT for VQA)")
    predict.add_argument("--output", help="JSON Lines of results, one per input line")
    decoding = predict.add_argument_group(
        "decoding (captioning, generative VQA)",
        "score: summed log-probability of the text; with beam search divided by length ** length-penalty",
    )
    decoding.add_argument("--beam", type=int, default=1, metavar="N", help="beam search of width N (default 1: greedy)")
    decoding.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log p / length ** this")
    decoding.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    decoding.add_argument("--temperature", type=float, default=1.0)
    decoding.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    decoding.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    decoding.add_argument("--num-return", type=int, default=1, metavar="N", help="captions per image (beams or samples)")
    decoding.add_argument("--seed", type=int, help="sampling seed")
    decoding.add_argument("--max-new-tokens", type=int, default=100, help="at most this many tokens (also capped by the model)")
    predict.set_defaults(run=_predict)

    score = commands.add_parser("score", help="score any system's output files")
    score_commands = score.add_subparsers(dest="score_command", required=True)
    captions = score_commands.add_parser("captions", help="BLEU, ROUGE-L, CIDEr-D (+ METEOR with Java) of COCO-format files")
    captions.add_argument("--results", required=True, help='COCO results: [{"image_id": ..., "caption": ...}]')
    captions.add_argument("--references", required=True, help="COCO captions annotations (images + annotations)")
    captions.add_argument("--out", help="also write the scores to this JSON file")
    captions.set_defaults(run=_score)
    vqa = score_commands.add_parser("vqa", help="the official VQA accuracy (VQA v2 rules), overall and per answer type")
    vqa.add_argument("--results", required=True, help='results: [{"question_id": ..., "answer": ...}]')
    vqa.add_argument("--questions", required=True, help="official questions JSON")
    vqa.add_argument("--annotations", required=True, help="official annotations JSON (10 human answers per question)")
    vqa.add_argument("--always-normalize", action="store_true", help="normalise answers even when all humans agree (not the official rule)")
    vqa.add_argument("--question-types", action="store_true", help="also print accuracy per question type")
    vqa.add_argument("--out", help="also write the scores to this JSON file")
    vqa.set_defaults(run=_score_vqa)

    index = commands.add_parser("index", help="embed a gallery of images with a retrieval run, for `mmt search` (resumable)")
    index.add_argument("run_dir", help="a retrieval or pretrain run (or its model directory)")
    index.add_argument("--images", required=True, help='a folder of images (searched recursively) or JSON Lines of {"image": PATH}')
    index.add_argument("--out", required=True, help="index directory; running again after an interruption continues it")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--skip-bad", action="store_true", help="skip and count unreadable images instead of stopping")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="find the images of an index that best match a text or an image")
    search.add_argument("index_dir")
    search.add_argument("--text", help="query text, e.g. \"a red circle left of a blue square\"")
    search.add_argument("--image", help="query image")
    search.add_argument("-k", type=int, default=10, help="results to return (default 10)")
    search.add_argument("--nprobe", type=int, help="large indexes: inverted lists scanned per query (more: slower, better recall)")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.set_defaults(run=_search)

    data = commands.add_parser("data", help="built-in datasets; checking your own")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    preview = data_commands.add_parser("preview", help="draw scenes with their questions and answers")
    preview.add_argument("dataset", help="sort-of-clevr or shapes")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--scenes", type=int, default=6)
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(run=_data_preview)
    check = data_commands.add_parser(
        "check", help="validate a data set (COCO captions, Karpathy split, VQA v2, JSON Lines): records and every image"
    )
    check.add_argument("source", help="captions_*.json, dataset_coco.json, VQA v2 questions or annotations JSON, or a .jsonl file")
    check.add_argument("--images", help="image root (COCO, Karpathy, VQA v2; JSON Lines paths are relative to the file)")
    check.add_argument("--kind", help="skip format detection: coco, karpathy, vqa or jsonl")
    check.add_argument("--annotations", help="VQA v2: the annotations file, when not beside the questions under its official name")
    check.add_argument("--split", help="Karpathy: which split (train, val, test; default train with restval)")
    check.add_argument("--skip-bad", action="store_true", help="count bad records instead of stopping at the first (exit code 1 if any)")
    check.add_argument("--headers-only", action="store_true", help="check image headers and sizes without decoding every image (fast)")
    check.add_argument("--out", help="also write the report to this JSON file")
    check.set_defaults(run=_data_check)
    pack = data_commands.add_parser("pack", help="write a data set as tar shards in the webdataset layout, for streaming")
    pack.add_argument("source", help="anything `mmt data check` reads")
    pack.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and index.json")
    pack.add_argument("--images", help="image root (COCO, Karpathy, VQA v2)")
    pack.add_argument("--kind", help="skip format detection: coco, karpathy, vqa or jsonl")
    pack.add_argument("--shard-size", type=int, default=1000, help="records per shard (default 1000)")
    pack.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    pack.set_defaults(run=_data_pack)

    inspect = commands.add_parser("inspect", help="load a saved model directory and report on it")
    inspect.add_argument("model_dir")
    inspect.set_defaults(run=_inspect)
    return parser


class _Console(logging.Handler):
    """The library's log messages, printed through tqdm (so that a progress bar stays intact):
    information to stdout, warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)


def _console_logging() -> None:
    logger = logging.getLogger("mmt")
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console())
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _console_logging()
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError, TrainingError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
