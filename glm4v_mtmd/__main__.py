"""The ``glm4v-mtmd`` command line."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from . import engine_info

    for key, value in engine_info().items():
        print(f"{key}: {value}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import GenerationConfig, Session

    parts: list[object] = ["[gMASK]<sop><|user|>\n"]
    if args.image:
        parts.append(pathlib.Path(args.image))  # a str in a prompt is text
    parts.append(f"{args.prompt}<|assistant|>\n")
    config = GenerationConfig(max_tokens=args.max_tokens, temperature=args.temperature)
    with Session(args.model, args.mmproj, n_ctx=args.n_ctx, n_threads=args.threads,
                 n_gpu_layers=args.n_gpu_layers) as session:
        for chunk in session.stream(parts, config):
            print(chunk.text, end="", flush=True)
    print()
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return 0 if run_selfcheck() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4v-mtmd", description="Run GLM-4.xV vision-language models locally.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the engine's log")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print the engine version and backends")
    info.set_defaults(func=_cmd_info)

    check = sub.add_parser("selfcheck", help="offline check: a tiny random model through the whole pipeline")
    check.set_defaults(func=_cmd_selfcheck)

    run = sub.add_parser("run", help="answer a prompt about an image with a GGUF model pair")
    run.add_argument("--model", required=True, help="text-model GGUF")
    run.add_argument("--mmproj", help="projector GGUF (mmproj-*.gguf)")
    run.add_argument("--image", help="image file")
    run.add_argument("-p", "--prompt", default="Describe this image.")
    run.add_argument("--max-tokens", type=int, default=512)
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--n-ctx", type=int, default=8192)
    run.add_argument("--threads", type=int, default=None)
    run.add_argument("--n-gpu-layers", type=int, default=0)
    run.set_defaults(func=_cmd_run)

    try:
        from .convert import cli as convert_cli
    except ImportError:  # pragma: no cover - converter always ships
        convert_cli = None
    if convert_cli is not None:
        convert_cli.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``glm4v-mtmd`` (and ``python -m glm4v_mtmd``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .errors import Glm4vError

    try:
        return int(args.func(args) or 0)
    except Glm4vError as exc:
        print(f"glm4v-mtmd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
