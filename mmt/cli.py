"""The `mmt` command line. Each sub-command is a small function over the library."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmt", description="Transformer-based multimodal learning.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a tiny captioner, save, reload and caption new images")
    demo.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    demo.add_argument("--out", help="directory for the saved model (default: a new temporary directory)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    demo.set_defaults(run=_demo)

    inspect = commands.add_parser("inspect", help="load a saved model directory and report on it")
    inspect.add_argument("model_dir")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"mmt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
