"""The ``glm4v-mtmd`` command line: run, chat, serve, rpc-server, convert, info, selfcheck."""

from __future__ import annotations

import argparse
import functools
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional, TextIO

DIM, RESET = "\033[2m", "\033[0m"
_FLASH = {"auto": None, "on": True, "off": False}


def _add_load_args(p: argparse.ArgumentParser) -> None:
    from .hub import DEFAULT_REPO

    p.add_argument("-m", "--model", default=DEFAULT_REPO,
                   help=f"text-model GGUF, a directory or a hub repo id holding the pair (default {DEFAULT_REPO})")
    p.add_argument("--mmproj", help="projector GGUF (default: the mmproj*.gguf next to the model / in the repo)")
    p.add_argument("-q", "--quant", default=None,
                   help="quantization to pick where a directory or repo holds several (default: the only one, "
                        "else Q4_K_M)")
    p.add_argument("--n-ctx", type=int, default=8192, help="context size in KV cells (default 8192)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available)")
    p.add_argument("--n-gpu-layers", type=int, default=None,
                   help="layers to offload to the GPU or the --rpc servers (-1 = all; default 0, -1 with --rpc)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="ggml RPC servers (`glm4v-mtmd rpc-server` on other machines) that hold the layers")
    p.add_argument("--tensor-split", default=None, metavar="A,B,...",
                   help="share of the layers per --rpc server, e.g. 2,1 (default: by free memory)")
    p.add_argument("--mmproj-device", default=None, metavar="local|HOST:PORT",
                   help="where the vision projector runs: local (default) or one of the --rpc servers")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_load_args(p)
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-think", action="store_true", help="turn reasoning off (GLM-4.5V/4.6V models)")
    p.add_argument("--hide-thinking", action="store_true", help="do not print the reasoning")


def _open(cls: Any, args: argparse.Namespace, **extra: Any) -> Any:
    """A ``Session`` or ``Model`` from ``--model`` (a file, a directory or a hub repo id)."""
    kwargs = dict(n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, **extra)
    if args.rpc:
        kwargs.update(rpc_servers=args.rpc, mmproj_device=args.mmproj_device)
        if args.tensor_split:
            kwargs["tensor_split"] = _floats("--tensor-split", args.tensor_split)
    elif args.tensor_split or args.mmproj_device not in (None, "local"):
        from .errors import ConfigError

        raise ConfigError("--tensor-split and --mmproj-device place work on --rpc servers; give --rpc too")
    model = pathlib.Path(args.model)
    if model.is_file():
        mmproj = args.mmproj
        if mmproj is None:
            candidates = sorted(model.parent.glob("mmproj*.gguf"))
            mmproj = str(candidates[0]) if len(candidates) == 1 else None
        return cls(model, mmproj, **kwargs)
    return cls.from_pretrained(args.model, quant=args.quant, mmproj=args.mmproj, **kwargs)


def _floats(flag: str, text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(f"{flag} {text!r}: comma-separated numbers, e.g. 1,1") from None


def _open_session(args: argparse.Namespace) -> Any:
    from . import Session

    return _open(Session, args)


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
        message = _user_message(args.prompt, args.image)
        videos = []
        for path in args.video:  # encoded here, with a progress bar; the message carries the result
            file = pathlib.Path(path).expanduser()
            video = session.model.encode_video(file, fps=args.video_fps, max_frames=args.video_max_frames,
                                               progress=True)
            width, height = video.original_size
            print(f"{file.name}: {len(video.frame_indices)} frames of {width}x{height} sampled, "
                  f"{len(video.pairs)} pairs of {video.pairs[0].n_tokens} tokens", file=sys.stderr)
            videos.append({"type": "video", "video": video})
        message["content"] = videos + message["content"]
        _print_reply(session, [message], args, sys.stdout)
    return 0


CHAT_HELP = """Commands:
  /image PATH   attach a picture to your next message (repeatable)
  /reset        start a new conversation
  /help         this list
  /quit         end (also Ctrl-D)
A line starting with // is sent as text with one / removed."""


def _attach(session: Any, path: str, out: TextIO) -> Optional[str]:
    """Encode a picture for the next message and say what it is; its path, or None (with the reason)."""
    from .errors import Glm4vError

    file = pathlib.Path(path).expanduser()
    if not path:
        print("usage: /image PATH", file=out)
        return None
    if not file.is_file():
        print(f"no such file: {path}", file=out)
        return None
    try:
        emb = session.model.encode_image(file)  # cached: the next message does not encode it again
    except Glm4vError as exc:
        print(f"cannot attach {file.name}: {exc}", file=out)
        return None
    width, height = emb.original_size
    print(f"attached {file.name} ({width}x{height} pixels, {emb.n_tokens} image tokens)", file=out)
    return str(file)


def _cmd_chat(args: argparse.Namespace) -> int:
    messages: list[dict] = []
    pending: list[str] = []
    with _open_session(args) as session:
        print(f"Model loaded ({pathlib.Path(session.model_path).name}). Type a message; /image PATH attaches a "
              "picture, /help lists the commands.", file=sys.stderr)
        pending = [f for f in (_attach(session, p, sys.stderr) for p in args.image) if f]
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                command, _, rest = line.partition(" ")
                if command in ("/quit", "/exit"):
                    break
                if command == "/reset":
                    messages, pending = [], []
                    print("new conversation", file=sys.stderr)
                elif command == "/image":
                    attached = _attach(session, rest.strip(), sys.stderr)
                    if attached:
                        pending.append(attached)
                elif command == "/help":
                    print(CHAT_HELP, file=sys.stderr)
                else:
                    print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
                continue
            if line.startswith("//"):
                line = line[1:]
            messages.append(_user_message(line, pending))
            pending = []
            answer = _print_reply(session, messages, args, sys.stdout)
            messages.append({"role": "assistant", "content": answer})
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import Model
    from .errors import ConfigError
    from .server import is_loopback, run
    from .server.protocol import Limits

    keys: list[str] = list(args.api_key or [])
    if args.api_key_file:
        try:
            text = pathlib.Path(args.api_key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file}: {exc.strerror}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not keys:
            raise ConfigError(f"--api-key-file {args.api_key_file} holds no key")
    if not is_loopback(args.host) and not keys and not args.insecure:
        raise ConfigError(
            f"--host {args.host} is reachable from other machines: set --api-key (or --api-key-file), "
            "or pass --insecure to serve without one"
        )
    media = None
    if args.media_dir:
        media = pathlib.Path(args.media_dir).resolve()
        if not media.is_dir():
            raise ConfigError(f"--media-dir {args.media_dir}: not a directory")
    if args.max_connections is None:  # every running or waiting request holds one; room for the rest
        args.max_connections = 2 * (args.parallel + args.max_queue) + 32
    for name in ("parallel", "max_queue", "max_images", "max_body_mb", "max_image_mb", "max_connections"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'max_queue' else '>= 1'}")
    from .server.app import ServerOptions

    options = ServerOptions(
        model_name=args.alias or pathlib.Path(args.model).name or args.model,
        api_keys=tuple(keys), cors_origins=tuple(args.cors_origin), max_queue=args.max_queue,
        max_connections=args.max_connections, max_body_bytes=args.max_body_mb << 20,
        limits=Limits(max_images=args.max_images, max_image_bytes=args.max_image_mb << 20,
                      max_image_pixels=args.max_image_pixels, media_dir=media),
        default_thinking=False if args.no_think else None,
        reasoning_field=args.reasoning_field, ui=not args.no_ui,
    )
    template = None
    if args.chat_template_file:
        try:
            template = pathlib.Path(args.chat_template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--chat-template-file {args.chat_template_file}: {exc}") from None
    # Checked before the socket opens, so a bad option never leaves a half-started server.
    loader = functools.partial(_open, Model, args, n_parallel=args.parallel, chat_template=template,
                               max_image_pixels=args.max_image_pixels, flash_attn=_FLASH[args.flash_attn])
    base = f"http://{args.host}:{args.port}"
    print(f"glm4v-mtmd serve: {base}/v1 (loading {args.model})", file=sys.stderr)
    if not args.no_ui:
        print(f"  chat page: {base}/", file=sys.stderr)
    if keys:
        print("  API key required (Authorization: Bearer ...)", file=sys.stderr)
    return run(options, loader, host=args.host, port=args.port, log_level="debug" if args.verbose else "info")


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


def _cmd_rpc_server(args: argparse.Namespace) -> int:
    from .rpc import serve

    serve(args.host, args.port, threads=args.threads, cache_dir=args.cache or None, devices=args.device)
    return 1  # serve() only returns by raising


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
    run.add_argument("--video", action="append", default=[],
                     help="a video file (repeatable; needs the [video] extra, PyAV)")
    run.add_argument("--video-fps", type=float, default=None,
                     help="frames sampled per second (GLM-4.1V/4.5V processor; default 2)")
    run.add_argument("--video-max-frames", type=int, default=None,
                     help="keep at most this many sampled frames (even; fewer than the model's processor gives)")
    run.set_defaults(func=_cmd_run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH attaches a picture)")
    _add_model_args(chat)
    chat.add_argument("-i", "--image", action="append", default=[], help="image for the first message")
    chat.set_defaults(func=_cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [server] extra)")
    _add_load_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--parallel", type=int, default=4, help="conversations decoded at once (default 4)")
    serve.add_argument("--api-key", action="append", help="require this key (Bearer); repeatable")
    serve.add_argument("--api-key-file", help="file with one API key per line")
    serve.add_argument("--media-dir", help="allow file:// image URLs inside this directory (off by default)")
    serve.add_argument("--cors-origin", action="append", default=[],
                       help="allow browser requests from this origin (repeatable; none by default)")
    serve.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a context (default 16)")
    serve.add_argument("--max-connections", type=int,
                       help="open connections at once; past it new requests get 503 "
                            "(default 2 * (parallel + max-queue) + 32)")
    serve.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    serve.add_argument("--max-image-mb", type=int, default=20, help="bytes per image, in MiB (default 20)")
    serve.add_argument("--max-image-pixels", type=int, default=50_000_000,
                       help="pixels per image, checked before decoding (default 50,000,000)")
    serve.add_argument("--max-body-mb", type=int, default=32, help="request body size, in MiB (default 32)")
    serve.add_argument("--alias", help="model name in responses and /v1/models (default: the --model name)")
    serve.add_argument("--no-think", action="store_true",
                       help="reasoning off unless a request turns it on (GLM-4.5V/4.6V)")
    serve.add_argument("--reasoning-field", choices=("both", "reasoning_content", "reasoning"), default="both",
                       help="which field carries the reasoning in replies (default both)")
    serve.add_argument("--chat-template-file", help="Jinja chat template to use instead of the model's")
    serve.add_argument("--flash-attn", choices=sorted(_FLASH), default="auto", help="flash attention (default auto)")
    serve.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    serve.set_defaults(func=_cmd_serve)

    info = sub.add_parser("info", help="engine version and backends, and a model's metadata")
    info.add_argument("model", nargs="?", help="a text-model GGUF to describe")
    info.set_defaults(func=_cmd_info)

    from .rpc import DEFAULT_PORT, _default_cache_dir

    rpc = sub.add_parser("rpc-server", help="lend this machine's CPU/GPU to a model loaded elsewhere (ggml RPC)",
                         description="Serve this machine's devices to glm4v-mtmd clients (--rpc HOST:PORT). "
                                     "The protocol has no authentication: bind loopback (the default) or a "
                                     "trusted private network only. Ctrl-C stops it.")
    rpc.add_argument("--host", default="127.0.0.1", help="IPv4 address to bind (default 127.0.0.1: this machine only)")
    rpc.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    rpc.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all available)")
    rpc.add_argument("-d", "--device", default=None,
                     help="devices to serve, comma-separated engine names (default: every GPU, else the CPU)")
    cache_dir = _default_cache_dir()
    rpc.add_argument("-c", "--cache", nargs="?", const=cache_dir, default=None, metavar="DIR",
                     help=f"keep large tensors on disk so reloads send only hashes (default DIR {cache_dir})")
    rpc.set_defaults(func=_cmd_rpc_server)

    check = sub.add_parser("selfcheck", help="offline check: a tiny random model through the whole pipeline")
    check.set_defaults(func=_cmd_selfcheck)

    from .convert import cli as convert_cli

    convert_cli.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``glm4v-mtmd`` (and ``python -m glm4v_mtmd``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    # huggingface_hub reports its own problems (to stderr when it has no handler): not a second time
    # through ours.
    logging.getLogger("huggingface_hub").propagate = False
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
