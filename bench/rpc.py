"""ggml RPC overhead: the text model's layers on two local ``glm4v-mtmd rpc-server`` processes
against the same model run locally, in alternating rounds.

Each round loads the model once per side (local; then ``rpc_servers=[a, b]``, ``tensor_split=[1, 1]``),
evaluates a text prompt of about ``--prompt-tokens`` tokens and generates ``--tokens`` greedy tokens
(EOS ignored); prompt eval and decode rates come from the package's own per-call timings. A last,
untimed pass goes through a counting TCP relay in front of each server and reports the bytes that
cross the network per generated token and per prompt token, both directions.

On one machine the servers share the client's cores, so the ratio is an upper bound on the
overhead of the protocol itself (no wire latency): ``--threads`` is given to the client and to each
server. Writes ``bench/results/<date>-<host>-<cpu>-rpc-<preset>.json`` and its chart.

    python bench/make_model.py --preset quick --out ~/.cache/glm4v-mtmd/bench/models --outtype f16
    python bench/rpc.py --rounds 3                  # --preset 1b: 20 layers, closer to a real model's step
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from report import ratio, save_results, summary
from run import HERE, SCRATCH

import glm4v_mtmd
from glm4v_mtmd import GenerationConfig, Session
from glm4v_mtmd.rpc import probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def servers(n: int, threads: int) -> Iterator[list[str]]:
    procs, eps = [], []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "glm4v_mtmd", "rpc-server", "--port", str(port),
                                           "-t", str(threads)], stdout=subprocess.DEVNULL, cwd="/"))
            eps.append(f"127.0.0.1:{port}")
        for ep in eps:
            for _ in range(300):
                try:
                    probe(ep, timeout=1.0)
                    break
                except glm4v_mtmd.ModelLoadError:
                    time.sleep(0.1)
        yield eps
    finally:
        for p in procs:
            p.kill()
            p.wait()


class Relay:
    """A TCP relay on a free loopback port in front of ``target``, counting bytes each way."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = 0  # client -> server
        self.received = 0  # server -> client
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.endpoint = f"127.0.0.1:{self.srv.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b, attr in ((client, upstream, "sent"), (upstream, client, "received")):
                threading.Thread(target=self._pipe, args=(a, b, attr), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, attr: str) -> None:
        try:
            while data := src.recv(1 << 20):
                setattr(self, attr, getattr(self, attr) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def total(self) -> int:
        return self.sent + self.received


def one_run(text: str, proj: str, prompt: str, cfg: GenerationConfig, threads: int, **extra: object) -> dict:
    with Session(text, proj, n_ctx=4096, n_threads=threads, **extra) as s:
        tm = s.generate(prompt, cfg).timings
        return {"prompt_tokens": tm.prompt_tokens, "prompt_tok_s": 1000 * tm.prompt_tokens / tm.prompt_ms,
                "generated_tokens": tm.generated_tokens, "decode_tok_s": 1000 * tm.generated_tokens / tm.decode_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--preset", choices=("quick", "1b"), default="quick",
                    help="make_model.py preset whose F16 pair (in the scratch dir) is measured")
    ap.add_argument("--model", default=None, help="text GGUF (default: the preset's F16 in the scratch dir)")
    ap.add_argument("--mmproj", default=None)
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH)
    args = ap.parse_args()
    gguf = args.scratch / "models" / "gguf"
    text = args.model or str(gguf / f"glm4v-bench-{args.preset}-F16.gguf")
    proj = args.mmproj or str(gguf / f"mmproj-glm4v-bench-{args.preset}-F16.gguf")
    if not pathlib.Path(text).exists():
        sys.exit(f"{text} is missing: python bench/make_model.py --preset {args.preset} "
                 f"--out {args.scratch / 'models'} --outtype f16")
    # about --prompt-tokens tokens of text (the random vocabulary is byte-level: ~1 token per byte)
    words = "the quick brown fox jumps over a lazy dog while seven red boxes sit on the table " * 200
    prompt = ["[gMASK]<sop><|user|>\n" + words[: args.prompt_tokens] + "<|assistant|>\n"]
    cfg = GenerationConfig(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    rounds = []
    with servers(2, args.threads) as eps:
        for r in range(args.rounds):
            local = one_run(text, proj, prompt, cfg, args.threads)
            remote = one_run(text, proj, prompt, cfg, args.threads, rpc_servers=eps, tensor_split=[1, 1])
            rounds.append({"local": local, "rpc": remote})
            print(f"round {r + 1}: decode {remote['decode_tok_s']:.1f} / {local['decode_tok_s']:.1f} tok/s, "
                  f"prompt {remote['prompt_tok_s']:.0f} / {local['prompt_tok_s']:.0f} tok/s (rpc / local)")
        relays = [Relay(ep) for ep in eps]
        with Session(text, proj, n_ctx=4096, n_threads=args.threads, rpc_servers=[r.endpoint for r in relays],
                     tensor_split=[1, 1]) as s:
            before = sum(r.total() for r in relays)
            ev = s.evaluate(prompt)
            after_prompt = sum(r.total() for r in relays)
            res = s.generate(prompt, cfg)  # the prompt's cells are reused: this is the generation alone
            after_gen = sum(r.total() for r in relays)
        traffic = {"prompt_tokens": len(ev.tokens), "bytes_per_prompt_token": (after_prompt - before) / len(ev.tokens),
                   "generated_tokens": len(res.token_ids),
                   "bytes_per_generated_token": (after_gen - after_prompt) / max(1, len(res.token_ids))}
    dec = ratio("decode tok/s, rpc / local", [x["rpc"]["decode_tok_s"] for x in rounds],
                [x["local"]["decode_tok_s"] for x in rounds], target=">= 0.8", higher_is_better=True)
    pre = ratio("prompt eval tok/s, rpc / local", [x["rpc"]["prompt_tok_s"] for x in rounds],
                [x["local"]["prompt_tok_s"] for x in rounds], target=">= 0.8", higher_is_better=True)
    quantities = (("decode", "decode_tok_s"), ("prompt eval", "prompt_tok_s"))
    table = [(f"{side}, {what}", "tok/s", summary([x[side][key] for x in rounds]))
             for side in ("local", "rpc") for what, key in quantities]
    table += [("network per generated token", "KiB", summary([traffic["bytes_per_generated_token"] / 1024])),
              ("network per prompt token", "KiB", summary([traffic["bytes_per_prompt_token"] / 1024]))]
    data = {"benchmark": "rpc", "what": "two local rpc-server processes (tensor_split 1,1) against the local run, "
            "alternating rounds; the servers share this machine's cores with the client",
            "engine": glm4v_mtmd.engine_info(), "cpu": sorted(glm4v_mtmd.cpu_features()),
            "settings": {**{k: str(v) for k, v in vars(args).items()}, "model": text, "mmproj": proj},
            "traffic": traffic, "rounds": rounds}
    save_results(HERE / "results", "-rpc" + ("" if args.model else f"-{args.preset}"), data, [dec, pre], table,
                 "Layers on two local RPC servers against the local run")


if __name__ == "__main__":
    main()
