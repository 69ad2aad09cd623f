"""The ``glm4v-mtmd`` command line: run, chat, convert, info, selfcheck."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional, TextIO

DIM, RESET = "\033[2m", "\033[0m"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .hub import DEFAULT_REPO

    p.add_argument("-m", "--model", default=DEFAULT_REPO,
                   help=f"text-model GGUF, a directory or a hub repo id holding the pair (default {DEFAULT_REPO})")
    p.add_argument("--mmproj", help="projector GGUF (default: the mmproj*.gguf next to the model / in the repo)")
    p.add_argument("-q", "--quant", default="Q4_K_M", help="quantization to pick from a directory or repo")
    p.add_argument("--n-ctx", type=int, default=8192, help="context size in KV cells (default 8192)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU (-1 = all)")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-think", action="store_true", help="turn reasoning off (GLM-4.5V/4.6V models)")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")


def _open_session(args: argparse.Namespace) -> Any:
    from . import Session

    kwargs = dict(n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers)
    model = pathlib.Path(args.model)
    if model.is_file():
        mmproj = args.mmproj
        if mmproj is None:
            candidates = sorted(model.parent.glob("mmproj*.gguf"))
            mmproj = str(candidates[0]) if len(candidates) == 1 else None
        return Session(model, mmproj, **kwargs)
    return Session.from_pretrained(args.model, quant=args.quant, mmproj=args.mmproj, **kwargs)


def _config(args: argparse.Namespace, session: Any) -> Any:
    import dataclasses

    config = session.chat_family.defaults
    changes = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                 ("seed", args.seed)) if v is not None}
    return dataclasses.replace(config, **changes)


def _print_reply(session: Any, messages: list[dict], args: argparse.Namespace, out: TextIO) -> str:
    """Stream one reply; reasoning dimmed (or hidden). Returns the answer text."""
    thinking = False if args.no_think else None
    color = out.isatty()
    answer: list[str] = []
    kind = None
    for chunk in session.chat_stream(messages, _config(args, session), thinking=thinking):
        if chunk.kind == "reasoning":
            if args.hide_thinking:
                continue
            text = f"{DIM}{chunk.text}{RESET}" if color else chunk.text
        else:
            if kind == "reasoning" and not args.hide_thinking:
                out.write("\n")
            text = chunk.text
            answer.append(chunk.text)
        kind = chunk.kind
        out.write(text)
        out.flush()
    out.write("\n")
    return "".join(answer).strip()


def _user_message(text: str, images: Sequence[str]) -> dict:
    parts: list[dict] = [{"type": "image", "image": pathlib.Path(p)} for p in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


def _cmd_run(args: argparse.Namespace) -> int:
    with _open_session(args) as session:
        _print_reply(session, [_user_message(args.prompt, args.image)], args, sys.stdout)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    messages: list[dict] = []
    pending: list[str] = list(args.image)
    print("Type a message; /image PATH attaches a picture, /reset clears, /quit ends.", file=sys.stderr)
    with _open_session(args) as session:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                messages, pending = [], []
                continue
            if line.startswith("/image "):
                path = line[len("/image "):].strip()
                if not pathlib.Path(path).is_file():
                    print(f"no such file: {path}", file=sys.stderr)
                else:
                    pending.append(path)
                continue
            messages.append(_user_message(line, pending))
            pending = []
            answer = _print_reply(session, messages, args, sys.stdout)
            messages.append({"role": "assistant", "content": answer})
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import engine_info

    for key, value in engine_info().items():
        print(f"{key}: {value}")
    if args.model:
        from . import Session

        with Session(args.model, n_ctx=256, n_threads=1) as session:
            print(f"model: {args.model}")
            for key in ("general.name", "general.architecture", "general.file_type"):
                print(f"  {key}: {session.metadata(key)}")
            print(f"  n_vocab: {session.n_vocab}, n_embd: {session.n_embd}, chat family: {session.chat_family.name}")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return 0 if run_selfcheck() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm4v-mtmd", description="Run GLM-4.xV vision-language models locally.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the engine's log")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt about images, streaming to the terminal")
    _add_model_args(run)
    run.add_argument("-p", "--prompt", default="Describe this image.", help="the question")
    run.add_argument("-i", "--image", action="append", default=[], help="an image file (repeatable)")
    run.set_defaults(func=_cmd_run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH attaches a picture)")
    _add_model_args(chat)
    chat.add_argument("-i", "--image", action="append", default=[], help="image for the first message")
    chat.set_defaults(func=_cmd_chat)

    info = sub.add_parser("info", help="engine version and backends, and a model's metadata")
    info.add_argument("model", nargs="?", help="a text-model GGUF to describe")
    info.set_defaults(func=_cmd_info)

    check = sub.add_parser("selfcheck", help="offline check: a tiny random model through the whole pipeline")
    check.set_defaults(func=_cmd_selfcheck)

    from .convert import cli as convert_cli

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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
