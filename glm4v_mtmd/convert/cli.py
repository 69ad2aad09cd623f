"""``glm4v-mtmd convert``: the command-line front end of :func:`glm4v_mtmd.convert.convert`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from ..errors import ConversionError
from ._convert import ALL_OUTTYPES, FLOAT_OUTTYPES, convert

__all__ = ["add_parser", "run", "main"]

_DESCRIPTION = (
    "Convert a GLM-4.xV Hugging Face checkpoint (GLM-4.1V, GLM-4.5V, GLM-4.6V, GLM-4.6V-Flash) into a "
    "text-model GGUF and an mmproj GGUF. Prints the two paths."
)


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--outdir", default=".", help="output directory (default: current directory)")
    p.add_argument(
        "--outtype",
        default="f16",
        type=str.lower,
        metavar="TYPE",
        help=f"text model type: {', '.join(ALL_OUTTYPES)} (default: f16; k-quants: engine quantizer)",
    )
    p.add_argument(
        "--mmproj-outtype",
        default=None,
        type=str.lower,
        metavar="TYPE",
        help=f"projector type: {', '.join(FLOAT_OUTTYPES)} (default: --outtype, or f16 for k-quants)",
    )
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return p


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``convert`` sub-command (its ``func`` default is :func:`run`)."""
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint to GGUF", description=_DESCRIPTION
    )
    _configure(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``convert`` command; prints the model and mmproj paths."""
    model, mmproj = convert(
        args.hf_dir,
        args.outdir,
        args.outtype,
        args.mmproj_outtype,
        progress=False if args.no_progress else None,
        quantize_threads=args.threads,
    )
    print(model)
    print(mmproj)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (``python -m glm4v_mtmd.convert.cli``)."""
    parser = _configure(argparse.ArgumentParser(prog="glm4v-mtmd convert", description=_DESCRIPTION))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConversionError as exc:
        print(f"glm4v-mtmd convert: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
