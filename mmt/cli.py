"""The `mmt` command line: parses, calls the library, prints. Nothing here imports torch until a
command needs it, so that `mmt --help` answers at once.

Conventions, the same for every command: the run directory (or model directory) is the first
argument after the command (after the task for `mmt train`); `--set key=value` changes a setting
of whatever a command builds or loads; `--out` is where a command writes its result; the
decoding flags (`--beam`, `--sample`, `--top-k`, ...) mean the same for `eval` and `predict`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mmt import __version__
from mmt.config import Range
from mmt.errors import CheckpointError, ConfigError, TrainingError
from mmt.extras import MissingExtra

log = logging.getLogger("mmt")

# ----------------------------------------------------------------------------- helpers


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new one's destination and says so once."""

    def __init__(self, option_strings, dest, instead: str, **kwargs):
        self.instead = instead
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"mmt: {option_string} is deprecated and will be removed in the next release; {self.instead}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _in(bounds: Range, kind: type = int):
    """An argparse type: a number of `kind` within `bounds` (the ranges the configs use), so
    that a flag out of range is refused by its name before any work."""

    def parse(text: str):
        value = kind(text)  # (a ValueError: argparse says "invalid <kind> value")
        if not bounds.holds(value):
            raise argparse.ArgumentTypeError(f"{value!r} is out of range (must be {bounds})")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT, AMOUNT = _in(Range(1)), _in(Range(0))


def _add_set(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"change a setting, repeatable, e.g. {example}")


def _add_decoding(parser: argparse.ArgumentParser) -> None:
    """The decoding flags of `eval` and `predict`; unset ones keep the run's own settings."""
    group = parser.add_argument_group(
        "decoding (captioning, generative VQA, text to image)", "unset flags keep the run's settings (generation.* in its run_config.json)"
    )
    group.add_argument("--beam", type=COUNT, metavar="N", help="beam search of width N (1: greedy)")
    group.add_argument("--length-penalty", type=float, metavar="A", help="beam score = log p / length ** A")
    group.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy/beam decoding")
    group.add_argument("--temperature", type=_in(Range(0, low_open=True), float), help="sampling: logits / temperature")
    group.add_argument("--top-k", type=AMOUNT, metavar="K", help="sampling: keep the K most likely tokens (0: all)")
    group.add_argument("--top-p", type=_in(Range(0, 1, low_open=True), float), metavar="P", help="sampling: nucleus threshold")
    group.add_argument("--num-return", type=COUNT, metavar="N", help="texts returned per input (beams or samples)")
    group.add_argument("--seed", type=int, help="sampling seed")
    group.add_argument("--max-new-tokens", type=COUNT, metavar="N", help="at most N tokens (also capped by the model)")
    group.add_argument("--guidance", type=_in(Range(0), float), metavar="S", help="text to image: classifier-free guidance scale (1: off)")


_DECODING = {
    "beam": "num_beams", "length_penalty": "length_penalty", "sample": "do_sample", "temperature": "temperature",
    "top_k": "top_k", "top_p": "top_p", "num_return": "num_return", "seed": "seed", "max_new_tokens": "max_new_tokens",
    "guidance": "guidance_scale",
}


def _decoding(args: argparse.Namespace) -> dict:
    """GenerationConfig fields the decoding flags set. Asking for sampling (or for beams) leaves
    out the other, whatever the run's own settings say."""
    chosen = {field: getattr(args, flag) for flag, field in _DECODING.items() if getattr(args, flag) is not None}
    if chosen.get("do_sample") and "num_beams" not in chosen:
        chosen["num_beams"] = 1
    if chosen.get("num_beams", 1) > 1 and "do_sample" not in chosen:
        chosen["do_sample"] = False
    return chosen


def _decoding_overrides(args: argparse.Namespace) -> list[str]:
    return [f"generation.{field}={json.dumps(value)}" for field, value in _decoding(args).items()]


# ----------------------------------------------------------------------------- train


def _run_config(args: argparse.Namespace, run_dir: Path):
    """The run config: the run's own when resuming, else defaults <- preset <- --config <- --set."""
    from mmt import config, registry
    from mmt.tasks import task_class

    config_class = task_class(args.task).run_config
    if args.resume:
        given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config), ("--init", args.init),
                 ("--init-text", args.init_text), ("--init-vision", args.init_vision), ("--allow-partial", args.allow_partial)) if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: a resumed run keeps the settings it started with; only --set changes them")
        path = run_dir / "run_config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found; --resume needs a run directory made by `mmt train`")
        data = config.read_data(path)
        if data.pop("task", args.task) != args.task:
            raise ConfigError(f"{path}: this run trained another task; use `mmt train <its task> {run_dir} --resume`")
        from mmt.api import saved_run_config

        return config.apply_overrides(saved_run_config(config_class, data, path), args.set)
    cfg = config_class()
    if args.preset:
        model = registry.preset(args.preset)
        if not isinstance(model, type(cfg.model)):
            fitting = [name for name in registry.preset_names() if isinstance(registry.preset(name), type(cfg.model))]
            raise ConfigError(f"preset {args.preset!r} is not a model of `mmt train {args.task}`; its presets: {', '.join(fitting)}")
        cfg.model = model
    if args.init:
        from mmt.checkpoint import model_directory, read_config
        from mmt.train import init_architecture

        read_config(model_directory(args.init))  # fail now, with the file named, if it is not a model
        if not args.preset:  # the source's own architecture
            cfg.model = init_architecture(cfg.model, args.init)
        cfg.train.init = str(args.init)
    if args.config:  # the file's keys override the preset's
        data = config.read_data(args.config)
        try:
            cfg = config.merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}") from None
    cfg = config.apply_overrides(cfg, args.set)
    cfg.train.allow_partial = cfg.train.allow_partial or args.allow_partial
    if cfg.train.allow_partial and not cfg.train.init:
        raise ConfigError("--allow-partial (train.allow_partial) applies to a run started with --init RUN_DIR; none was given")
    for key in ("init_text", "init_vision"):  # Hugging Face directories (or names), read when training starts (mmt.interop)
        if getattr(args, key, None):
            setattr(cfg.train, key, str(getattr(args, key)))
        if getattr(cfg.train, key):
            from mmt.interop.runs import directory

            setattr(cfg.train, key, directory(getattr(cfg.train, key)))
    return cfg


def _train(args: argparse.Namespace) -> int:
    from mmt.tasks import TASKS, task_class
    from mmt.train import train

    if args.task not in TASKS:
        raise ConfigError(f"task {args.task!r} is not available (available: {', '.join(TASKS)})")
    if isinstance(args.resume, str):  # the old spelling, --resume RUN_DIR
        print(f"mmt: --resume RUN_DIR is deprecated; write mmt train {args.task} {args.resume} --resume", file=sys.stderr)
        args.run_dir = args.run_dir or args.resume
    run_dir = Path(args.run_dir or args.old_run_dir or f"runs/{args.task}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts one from scratch: give one of them")
    cfg = _run_config(args, run_dir)
    task = task_class(args.task)(cfg)
    try:
        result = train(task, run_dir, resume=bool(args.resume), progress=not args.no_progress, overwrite=args.overwrite)
    except KeyboardInterrupt:
        from mmt.trainer_state import latest_checkpoint

        last = latest_checkpoint(run_dir)
        where = (f"continue from {last} with `mmt train {args.task} {run_dir} --resume`" if last
                 else "no checkpoint was written yet: start it again")
        print(f"\nmmt train: interrupted; {where}", file=sys.stderr)
        return 130
    if result:
        print(task.format_result(result))
    print(f"run directory: {run_dir}")
    return 0


# ----------------------------------------------------------------------------- eval, predict, inspect


def _saved_task(run_dir: Path, overrides: list[str]):
    """(the task with the run's own settings and `overrides`, the model, its tokenizer, the model
    directory) of a saved run or model directory."""
    from mmt import checkpoint, config
    from mmt.api import run_settings, saved_run_config
    from mmt.tasks import TASK_OF_MODEL, task_class

    directory = checkpoint.model_directory(run_dir)
    model_type, model_cfg = checkpoint.read_config(directory)
    settings, settings_file = run_settings(run_dir)
    name = TASK_OF_MODEL[model_type]
    if model_type == "retrieval" and settings.get("task") == "pretrain":
        name = "pretrain"
    cls = task_class(name)
    if settings:  # the data and decoding the run was made with; the weights' own model config
        cfg = saved_run_config(cls.run_config, settings, settings_file)
    else:
        log.warning(f"no run_config.json in {run_dir}: testing on the default data settings")
        cfg = cls.run_config()
    cfg.model = model_cfg
    cfg = config.apply_overrides(cfg, overrides)
    model, tokenizer, _ = checkpoint.load_for_inference(directory, cfg.model)
    return cls(cfg), model, tokenizer, directory


def _eval(args: argparse.Namespace) -> int:
    from mmt import checkpoint

    run_dir = Path(args.run_dir)
    model_type, model_cfg = checkpoint.read_config(checkpoint.model_directory(run_dir))
    writes = model_type in ("caption", "t2i") or getattr(model_cfg, "head", "") == "generate"
    if _decoding(args) and not writes:
        raise ConfigError(f"the decoding flags apply to models that write (captioning, generative VQA, text to image); {run_dir} holds a {model_type} model")
    if args.rerank_k and model_type != "retrieval":
        raise ConfigError(f"--rerank-k applies to retrieval and pretraining runs; {run_dir} holds a {model_type} model")
    overrides = args.set + _decoding_overrides(args) + ([f"model.rerank_k={args.rerank_k}"] if args.rerank_k else [])
    from mmt.devices import autocast, autocast_dtype, choose_device, describe

    device = choose_device(args.device)
    dtype = autocast_dtype(args.precision, device)
    task, model, tokenizer, directory = _saved_task(run_dir, overrides)
    log.info(f"evaluating on {describe(device, dtype)}")
    out = Path(args.out) if args.out else run_dir / "eval.json"
    with autocast(device, dtype):
        result, report = task.test(model.to(device), tokenizer, directory, out)
    print(report)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mmt.api import load

    predictor = load(args.run_dir, device=args.device, dtype=args.precision, overrides=args.set)
    decoding = _decoding(args)
    labels = args.labels.split(",") if args.labels else None
    from mmt.data.images import image_files, is_image_set

    several = args.image is not None and is_image_set(args.image)
    if args.input or several:
        from mmt.predict import predict_file, predict_images

        if not args.out:
            raise ConfigError(f"{'--input' if args.input else 'a folder or pattern of images'} needs --out (the JSON Lines file the results go to)")
        if args.input:
            summary, unit = predict_file(predictor, args.input, args.out, labels, args.template, decoding), "lines"
        else:
            if predictor.task == "vqa" and not args.question:
                raise ConfigError("a VQA model answers a question: give --question TEXT (asked of every image)")
            images = image_files(args.image)
            summary = predict_images(predictor, images, args.out, args.question, labels, args.template, decoding)
            unit = "images"
        for error in summary.errors:
            print(error, file=sys.stderr)
        failed = f"; {len(summary.errors)} failed" if summary.errors else ""
        print(f"answered {summary.answered} of {summary.lines} {unit} into {args.out}{failed}")
        return 1 if summary.errors else 0
    if not args.image:
        raise ConfigError("give --image IMG (and --question TEXT for VQA), or --input IN.jsonl --out OUT.jsonl")
    if predictor.task == "vqa":
        if not args.question:
            raise ConfigError("a VQA model answers a question: give --question TEXT")
        result = predictor.answer(args.image, args.question, **decoding)
    elif predictor.task == "caption":
        result = predictor.caption(args.image, **decoding)
    else:
        if not labels:
            raise ConfigError(f"{predictor.directory} is a retrieval model: give --labels \"a,b,c\" to classify the image among them")
        result = predictor.classify(args.image, labels, args.template)
    if args.json:
        print(json.dumps(result))
    elif "labels" in result:
        for item in result["labels"]:
            print(f"{item['score']:.4f}  {item['label']}")
    elif "caption" in result:
        for item in result.get("captions", [result]):
            print(f"{item['caption']}  (score {item['score']:.3f})")
    else:
        for item in result.get("answers", [result]):
            print(f"{item['answer']}  (score {item['score']:.3f})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mmt import checkpoint, config

    directory = checkpoint.model_directory(args.run_dir)  # a run, its model/, or a checkpoint directory
    model_type, cfg = checkpoint.read_config(directory)
    if any(not o.startswith("model.") for o in args.set):
        raise ConfigError("inspect takes model.* settings only")
    model = checkpoint.from_pretrained(directory, cfg=config.apply_overrides(cfg, [o.split(".", 1)[1] for o in args.set]))
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = "with" if (directory / checkpoint.TOKENIZER_NAME).is_file() else "without"
    print(f"{directory}: {model_type} model, {n_params:,} parameters, weights load cleanly ({tokenizer} a tokenizer)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mmt import demo

    result = demo.run(steps=args.steps, out_dir=args.out, overrides=args.set)
    return 0 if result["identical_after_reload"] else 1


# ----------------------------------------------------------------------------- score, index, search


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
        args.run_dir, args.images, args.out, batch_size=args.batch_size, skip_bad=args.skip_bad, progress=not args.no_progress,
        overrides=args.set,
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
    if args.nprobe is not None:
        index.nprobe = args.nprobe
    n = args.num_results
    hits = index.search_text(args.text, n) if args.text is not None else index.search_image(args.image, n)
    if args.json:
        print(json.dumps(hits))
    else:
        for hit in hits:
            print(f"{hit['rank']:3d}  {hit['score']:.4f}  {hit['path']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from mmt.serve.app import Limits, serve

    serve(args.run_dirs, args.index, args.host, args.port, Limits(max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000), args.device)
    return 0


# ----------------------------------------------------------------------------- data


def _data_check(args: argparse.Namespace) -> int:
    from mmt.data.formats import check_dataset, format_report, load_source

    source = load_source(
        args.source, image_root=args.image_root, kind=args.kind, skip_bad=args.skip_bad, annotations=args.annotations, split=args.split
    )
    report = check_dataset(source, load=not args.headers_only, skip_bad=args.skip_bad)
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def _data_pack(args: argparse.Namespace) -> int:
    from mmt.data.formats.shards import pack

    summary = pack(args.source, args.out, image_root=args.image_root, kind=args.kind, shard_size=args.shard_size, skip_bad=args.skip_bad)
    skipped = summary["skipped"]["total"]
    print(f"packed {summary['num_samples']} records into {summary['num_shards']} shards in {args.out}"
          + (f"; {skipped} bad records skipped" if skipped else ""))
    return 0


def _data_preview(args: argparse.Namespace) -> int:
    from mmt.data.worlds.preview import preview_shapes, preview_sort_of_clevr

    previews = {"sort-of-clevr": preview_sort_of_clevr, "shapes": preview_shapes}
    if args.dataset not in previews:
        raise ConfigError(f"unknown dataset {args.dataset!r} (available: {', '.join(previews)})")
    path = previews[args.dataset](args.out, num_scenes=args.scenes, seed=args.seed)
    print(f"wrote {path}")
    return 0


def _data_export(args: argparse.Namespace) -> int:
    from mmt.data.worlds.export import export_world

    files = export_world(args.world, args.out, num_scenes=args.scenes, seed=args.seed, split=args.split)
    print(f"wrote {args.scenes} scenes to {args.out}/ (scene-000.png ...) with {', '.join(f.name for f in files)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from mmt.export import export_run

    manifest = export_run(args.run_dir, args.out, format=args.format)
    print(f"wrote {args.out}/: {', '.join(manifest['files'])} ({manifest['model_type']} model, {args.format})")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from mmt.api import load
    from mmt.explain import explain, render
    from mmt.predict import check_output

    predictor = load(args.run_dir, device=args.device, overrides=args.set)
    if predictor.task == "vqa" and not args.question:
        raise ConfigError(f"{predictor.directory} is a VQA model: give --question TEXT")
    if predictor.task == "retrieval" and not args.text:
        raise ConfigError(f"{predictor.directory} is a retrieval model: give --text TEXT to match the image with")
    layer = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
    head = int(args.head) if args.head.isdigit() else args.head
    out = Path(args.out)
    check_output(None, out)
    explained = explain(predictor, args.image, question=args.question, text=args.text, method=args.method, layer=layer, head=head)
    render(explained).save(out)
    print(", ".join(f"{k}: {v}" for k, v in explained.result.items() if isinstance(v, (str, int, float))))
    print(f"wrote {out} ({len(explained.maps)} map{'s' if len(explained.maps) > 1 else ''})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from mmt.report import write_report

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder for report.html")
    path = write_report(args.run_dir, out, per_kind=args.examples)
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- the parser


def _generate(args: argparse.Namespace) -> int:
    from mmt.api import load

    if not args.text:
        raise ConfigError("give at least one --text SENTENCE to draw")
    out = Path(args.out)
    if out.is_file():
        raise ConfigError(f"--out {out}: is a file; give a folder for the images")
    predictor = load(args.run_dir, device=args.device, dtype=args.precision)
    if predictor.task != "t2i":
        raise ConfigError(f"{args.run_dir} holds a {predictor.task} model; `mmt generate` draws with a t2i model (`mmt train t2i`)")
    decoding = _decoding(args)
    decoding.pop("num_return", None)  # --num says how many
    drawn = predictor.generate_images(args.text, num=args.num, **decoding)
    import numpy as np

    from mmt.tasks.t2i import grid_image

    out.mkdir(parents=True, exist_ok=True)
    for t, (text, images) in enumerate(zip(args.text, drawn)):
        for i, image in enumerate(images):
            image.save(out / f"text{t}-{i}.png")
        print(f"{text!r}: {out / f'text{t}-*.png'}")
    grid = grid_image(np.stack([[np.asarray(image) for image in images] for images in drawn]))
    grid.save(out / "grid.png")
    print(f"grid (a row per text): {out / 'grid.png'}")
    return 0


def _add_train(commands) -> argparse.ArgumentParser:
    train = commands.add_parser("train", help="train a task model (built-in data or your own)")
    train.add_argument("task", help="vqa, caption, retrieval, pretrain, vqvae (image tokenizer) or t2i (text to image)")
    train.add_argument("run_dir", nargs="?", help="where the run is written (default runs/TASK)")
    train.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
        help="continue the run from its last checkpoint (`--resume RUN_DIR`, without the positional run directory, is the old spelling)",
    )
    train.add_argument(
        "--overwrite", action="store_true",
        help="start from scratch in a directory that holds a run (what mmt wrote there is removed: checkpoints, "
        "final model, logs, evaluations) or things mmt did not write (left as they are)",
    )
    train.add_argument("--preset", help="named model preset, e.g. vqa-small, seed-vqa, caption-small")
    train.add_argument("--config", help="JSON/YAML file with model/data/train sections")
    _add_set(train, "train.steps=500")
    train.add_argument("--init", metavar="RUN_DIR", help="start from another run's model (e.g. pretrain): its architecture (unless --preset) and weights")
    train.add_argument("--allow-partial", action="store_true", help="with --init: start even if some of the source's weights do not fit this model")
    train.add_argument("--init-text", metavar="HF_DIR", help="text tower (architecture, weights, tokenizer) from a Hugging Face BERT-family directory, or minilm (the pretrained extra)")
    train.add_argument("--init-vision", metavar="HF_DIR", help="image tower (architecture, weights) from a Hugging Face ViT or CLIP directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--run-dir", dest="old_run_dir", action=_Deprecated, instead="give the run directory after the task: mmt train TASK RUN_DIR",
        help=argparse.SUPPRESS,
    )
    train.set_defaults(run=_train)
    return train


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default: a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp16", "fp32"],
                        help="fp32 (default), or bf16/fp16 autocast; auto: bf16 where the hardware has it, fp16 on other GPUs")


def _add_use(commands) -> None:
    evaluate = commands.add_parser("eval", help="score a run on its test data (VQA: accuracy per question type; captioning: caption metrics and truth; retrieval: Recall@K)")
    evaluate.add_argument("run_dir", help="a run directory or a model directory")
    evaluate.add_argument("--out", help="JSON file for the scores (default RUN_DIR/eval.json)")
    _add_set(evaluate, "data.num_test=50, source.test=test.jsonl, model.rerank_adds_contrastive=false")
    evaluate.add_argument("--rerank-k", type=AMOUNT, metavar="K", help="retrieval: re-rank K contrastive candidates with the matching head (default: the model's)")
    _add_decoding(evaluate)
    _add_device(evaluate)
    evaluate.set_defaults(run=_eval)

    generate = commands.add_parser("generate", help="draw images from sentences with a text-to-image run")
    generate.add_argument("run_dir", help="a t2i run directory or model directory")
    generate.add_argument("--text", action="append", default=[], metavar="SENTENCE", help="what to draw (repeat for several)")
    generate.add_argument("--num", type=COUNT, default=4, help="images per sentence (default 4)")
    generate.add_argument("--out", required=True, help="folder for the PNG images and grid.png")
    _add_decoding(generate)
    _add_device(generate)
    generate.set_defaults(run=_generate)

    predict = commands.add_parser("predict", help="answer questions about images, caption images, or classify them zero-shot")
    predict.add_argument("run_dir", help="a run directory or a model directory")
    predict.add_argument("--image", help='an image file; or a folder of images (searched recursively) or a quoted pattern ("photos/*.jpg"), with --out')
    predict.add_argument("--question", help="the question (VQA)")
    predict.add_argument("--input", help='JSON Lines of {"image": PATH} (+ "question": TEXT for VQA); paths relative to the file')
    predict.add_argument("--out", help="with --input or several images: the JSON Lines file of results, one line per input line or image")
    predict.add_argument("--labels", help='retrieval / pretrain runs: classify zero-shot among these comma-separated labels, e.g. "red,blue,green"')
    predict.add_argument("--template", default="{}", help='prompt each label is put into, e.g. "the largest object is {}" (default "{}")')
    predict.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_set(predict, "generation.max_new_tokens=10")
    _add_decoding(predict)
    predict.add_argument("--output", dest="out", action=_Deprecated, instead="use --out", help=argparse.SUPPRESS)
    _add_device(predict)
    predict.set_defaults(run=_predict)

    explain = commands.add_parser("explain", help="where the model looked: heat maps over an image for an answer, each caption word, or a match")
    explain.add_argument("run_dir", help="a run directory or model directory")
    explain.add_argument("--image", required=True, help="the image file")
    explain.add_argument("--question", help="VQA: the question whose answer is explained")
    explain.add_argument("--text", help="retrieval: the text whose match with the image is explained")
    explain.add_argument("--out", required=True, help="PNG file: the image with each map over it (a captioner: one panel per word)")
    explain.add_argument("--method", default="attention", choices=["attention", "gradient", "gradcam"],
                         help="cross-modal attention weights (default; retrieval: gradient), gradient x input, or Grad-CAM")
    explain.add_argument("--layer", default="auto", help="attention: auto (default: first for VQA, mean for captions), first, last, mean, or a layer number")
    explain.add_argument("--head", default="mean", help="attention: mean over heads (default) or a head number")
    explain.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    _add_set(explain, "model.rerank_k=32")
    explain.set_defaults(run=_explain)
    report = commands.add_parser("report", help="one self-contained HTML page of a run: curves, evaluation, test examples with heat maps")
    report.add_argument("run_dir", help="a run directory, finished or still training")
    report.add_argument("--out", required=True, help="folder for report.html")
    report.add_argument("--examples", type=COUNT, default=6, help="right (and wrong) test examples to show (default 6 each)")
    report.set_defaults(run=_report)
    inspect = commands.add_parser("inspect", help="load a saved run or model directory and report on it")
    inspect.add_argument("run_dir")
    _add_set(inspect, "model.rerank_k=32")
    inspect.set_defaults(run=_inspect)
    export = commands.add_parser("export", help="export a run's model for another runtime (ONNX graphs with an export.json manifest)")
    export.add_argument("run_dir", help="a run directory or a model directory")
    export.add_argument("--format", default="onnx", help="onnx (the only format so far)")
    export.add_argument("--out", required=True, help="a new (or empty) folder for the graphs, export.json and the tokenizer")
    export.set_defaults(run=_export)

    demo = commands.add_parser("demo", help="train a tiny captioner, save, reload and caption new images")
    demo.add_argument("--steps", type=COUNT, default=150, help="training steps (default 150)")
    demo.add_argument("--out", help="directory for the saved model (default: a new temporary directory)")
    _add_set(demo, "decoder.depth=3")
    demo.set_defaults(run=_demo)


def _add_score(commands) -> None:
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


def _add_search(commands) -> None:
    index = commands.add_parser("index", help="embed a gallery of images with a retrieval run, for `mmt search` (resumable)")
    index.add_argument("run_dir", help="a retrieval or pretrain run (or its model directory)")
    index.add_argument("--images", required=True, help='the gallery: a folder of images (searched recursively) or JSON Lines of {"image": PATH}')
    index.add_argument("--out", required=True, help="the index folder; running again after an interruption continues it")
    index.add_argument("--batch-size", type=COUNT, default=64)
    index.add_argument("--skip-bad", action="store_true", help="skip and count unreadable images instead of stopping")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_set(index, "model.rerank_k=32")
    index.set_defaults(run=_index)

    search = commands.add_parser("search", help="find the images of an index that best match a text or an image")
    search.add_argument("index_dir", help="an index folder made by `mmt index` (it names the model it was made with)")
    search.add_argument("--text", help='query text, e.g. "a red circle left of a blue square"')
    search.add_argument("--image", help="query image")
    search.add_argument("--num-results", "-n", type=COUNT, default=10, metavar="N", help="results to return (default 10)")
    search.add_argument("--nprobe", type=COUNT, help="large indexes: inverted lists scanned per query (more: slower, better recall)")
    search.add_argument("--json", action="store_true", help="print the results as JSON")
    search.add_argument("-k", dest="num_results", type=COUNT, action=_Deprecated, instead="use --num-results N (-n N)", help=argparse.SUPPRESS)
    search.set_defaults(run=_search)

    serve = commands.add_parser("serve", help="serve runs over HTTP: a JSON API with dynamic batching, and a web page (docs/usage/serve.md)")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs to serve, each named by its folder, or NAME=RUN_DIR")
    serve.add_argument("--index", action="append", default=[], metavar="DIR", help="an `mmt index` folder to search (repeatable)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=COUNT, default=32, metavar="N", help="requests served in one model call (1: no batching)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, metavar="MS", help="how long a batch waits for more requests")
    serve.add_argument("--device", default="auto", help="auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N")
    serve.set_defaults(run=_serve)


def _add_data(commands) -> None:
    data = commands.add_parser("data", help="built-in datasets; checking and packing your own")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    preview = data_commands.add_parser("preview", help="draw scenes with their captions, questions and answers")
    preview.add_argument("dataset", help="sort-of-clevr or shapes")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--scenes", type=COUNT, default=6)
    preview.add_argument("--seed", type=AMOUNT, default=0)
    preview.set_defaults(run=_data_preview)
    export = data_commands.add_parser("export", help="write built-in scenes as PNG files with their questions (and captions) as JSON Lines")
    export.add_argument("world", help="sort-of-clevr or shapes")
    export.add_argument("--out", required=True, help="a new (or empty) folder for scene-NNN.png, questions.jsonl and, for shapes, captions.jsonl")
    export.add_argument("--scenes", type=COUNT, default=10, help="how many scenes (default 10)")
    export.add_argument("--split", default="test", help="which split's scenes: test (default; never trained on), train, or val (shapes)")
    export.add_argument("--seed", type=AMOUNT, default=0, help="the data seed of the runs the scenes should match (default 0)")
    export.set_defaults(run=_data_export)
    check = data_commands.add_parser("check", help="validate a data set (COCO captions, Karpathy split, VQA v2, JSON Lines): records and every image")
    check.add_argument("source", help="captions_*.json, dataset_coco.json, VQA v2 questions or annotations JSON, or a .jsonl file")
    check.add_argument("--image-root", help="the folder the data set's image paths are relative to (COCO, Karpathy, VQA v2; JSON Lines paths are relative to the file)")
    check.add_argument("--kind", help="skip format detection: coco, karpathy, vqa or jsonl")
    check.add_argument("--annotations", help="VQA v2: the annotations file, when not beside the questions under its official name")
    check.add_argument("--split", help="Karpathy: which split (train, val, test; default train with restval)")
    check.add_argument("--skip-bad", action="store_true", help="count bad records instead of stopping at the first (exit code 1 if any)")
    check.add_argument("--headers-only", action="store_true", help="check image headers and sizes without decoding every image (fast)")
    check.add_argument("--out", help="also write the report to this JSON file")
    check.add_argument("--images", dest="image_root", action=_Deprecated, instead="use --image-root DIR", help=argparse.SUPPRESS)
    check.set_defaults(run=_data_check)
    pack = data_commands.add_parser("pack", help="write a data set as tar shards in the webdataset layout, for streaming")
    pack.add_argument("source", help="anything `mmt data check` reads")
    pack.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar and index.json")
    pack.add_argument("--image-root", help="the folder the data set's image paths are relative to (COCO, Karpathy, VQA v2)")
    pack.add_argument("--kind", help="skip format detection: coco, karpathy, vqa or jsonl")
    pack.add_argument("--shard-size", type=COUNT, default=1000, help="records per shard (default 1000)")
    pack.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    pack.add_argument("--images", dest="image_root", action=_Deprecated, instead="use --image-root DIR", help=argparse.SUPPRESS)
    pack.set_defaults(run=_data_pack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmt", description="Transformer-based multimodal (vision + language) learning.")
    parser.add_argument("--version", action="version", version=f"mmt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.train_parser = _add_train(commands)
    _add_use(commands)
    _add_score(commands)
    _add_search(commands)
    _add_data(commands)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line's arguments. `mmt train` takes its options before, between or after its
    positional arguments (mmt train vqa --preset vqa-small runs/x)."""
    parser = build_parser()
    if argv and argv[0] == "train":
        args = parser.train_parser.parse_intermixed_args(argv[1:])
        args.command = "train"
        return args
    return parser.parse_args(argv)


class _Console(logging.Handler):
    """The library's log messages, printed through tqdm (so that a progress bar stays intact):
    information to stdout, warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stdout if record.levelno < logging.WARNING else sys.stderr)


def _console_logging() -> None:
    if not any(isinstance(h, _Console) for h in log.handlers):
        log.addHandler(_Console())
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    _console_logging()
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ValueError, KeyError, FileNotFoundError, TrainingError, MissingExtra) as e:  # (ImageError, DataError: ValueErrors)
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmt {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
