"""``glm4v-mtmd serve`` under load, against llama.cpp's ``llama-server`` on the same model and engine.

Both servers run as real processes on loopback, up at the same time and measured in turn (each
measurement on one, then on the other, the order alternating), with the same model (the bench's
quick F16 pair), threads, parallel slots and flash attention; the clients are threads streaming
``/v1/chat/completions`` over raw HTTP (SSE), greedy, EOS ignored, a fixed number of tokens each.
Measured per server:

- 1, 2, 4 and 8 clients at once, each conversation with its own picture (never seen before by
  the server): aggregate tok/s (all completion tokens / the wall time of the round, image encodes
  included: the target), the decode phase's tok/s (from the first streamed text to the last
  reply's end; reported) and TTFT (request sent -> first streamed text) p50 / p95;
- four clients sending one shared picture at once: TTFT p95 (an image encoded once for all, or
  once per slot);
- a follow-up question in the same conversation: its TTFT against the first question's.

llama-cpp-python's server is measured too when it is installed (it is not a dependency).

    python bench/serve.py            # writes bench/results/<date>-<host>-<cpu>-serve.json
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batched import HERE, SCRATCH
from cli_target import cli_build_dir
from llama_server import build_llama_server
from make_model import build
from report import ratio, save_results, summary

import glm4v_mtmd

COUNTS = (1, 2, 4, 8)

# The bench model's own template prints message content as it is; this one places images the
# way the GLM-4.1V template does (for both servers' prompts to hold the picture).
TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|begin_of_image|><|image|>"
    "<|end_of_image|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def picture(seed: int, size: tuple[int, int]) -> str:
    """A PNG data URL of a structured random picture (a new one per seed)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Reply:
    ttft: float
    total: float
    tokens: int
    text: str
    sent: float = 0.0  # perf_counter() when the request was sent


class ServerProcess:
    """A server started as a process, ready when ``/health`` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int) -> None:
        self.name, self.port = name, port
        self.log = open(SCRATCH / f"serve-{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.log.name}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def ask(self, messages: list[dict[str, Any]], tokens: int) -> Reply:
        body = {"model": "bench", "messages": messages, "max_tokens": tokens, "temperature": 0, "top_k": 1,
                "top_p": 1.0, "repeat_penalty": 1.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft, n, text = None, 0, []
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            for choice in obj.get("choices", []):
                d = choice.get("delta", {})
                piece = (d.get("content") or "") + (d.get("reasoning_content") or "")
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(d.get("content") or "")
            if obj.get("usage"):
                n = obj["usage"]["completion_tokens"]
        total = time.perf_counter() - t0
        return Reply(ttft if ttft is not None else total, total, n, "".join(text), t0)


def question(url: str, text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def together(server: ServerProcess, conversations: list[list[dict[str, Any]]],
             tokens: int) -> tuple[float, list[Reply]]:
    """Send the conversations at once; (wall seconds, replies)."""
    replies: list[Any] = [None] * len(conversations)
    barrier = threading.Barrier(len(conversations) + 1)

    def run(i: int) -> None:
        barrier.wait()
        replies[i] = server.ask(conversations[i], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(r is None for r in replies):
        raise RuntimeError(f"{server.name}: a client failed")
    return wall, replies


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def measurements(args: argparse.Namespace) -> list[tuple[str, Callable[[ServerProcess, int], dict[str, Any]]]]:
    """A round's measurements, each ``(key, run(server, seed))``; a run's pictures (seeds ``seed`` to
    ``seed + 19``) are new to the server."""
    size = (args.width, args.height)

    def clients(n: int) -> Callable[[ServerProcess, int], dict[str, Any]]:
        def run(server: ServerProcess, seed: int) -> dict[str, Any]:
            convs = [[question(picture(seed + i, size), f"Describe picture {i}.")] for i in range(n)]
            wall, replies = together(server, convs, args.tokens)
            ttfts = [r.ttft for r in replies]
            # Decode phase: from the first streamed text of any client to the end of the last reply.
            decode_s = max(r.sent + r.total for r in replies) - min(r.sent + r.ttft for r in replies)
            tokens = sum(r.tokens for r in replies)
            return {"tok_s": tokens / wall, "decode_tok_s": tokens / decode_s, "ttft_p50": statistics.median(ttfts),
                    "ttft_p95": p95(ttfts), "tokens": [r.tokens for r in replies]}
        return run

    def shared(server: ServerProcess, seed: int) -> dict[str, Any]:
        url = picture(seed, size)
        wall, replies = together(server, [[question(url, f"Question {i} about it.")] for i in range(4)], args.tokens)
        ttfts = [r.ttft for r in replies]
        return {"ttft_p95": p95(ttfts), "ttft_p50": statistics.median(ttfts),
                "tok_s": sum(r.tokens for r in replies) / wall}

    def follow_up(server: ServerProcess, seed: int) -> dict[str, Any]:
        first_q = [question(picture(seed, size), "What is in this picture?")]
        first = server.ask(first_q, args.tokens)
        follow = server.ask([*first_q, {"role": "assistant", "content": first.text},
                             {"role": "user", "content": "And what colour is it?"}], args.tokens)
        return {"first_ttft": first.ttft, "follow_ttft": follow.ttft}

    return [*((f"clients_{n}", clients(n)) for n in COUNTS), ("shared_4", shared), ("follow_up", follow_up)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="streamed tokens per client")
    ap.add_argument("--parallel", type=int, default=4, help="slots / contexts of each server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048, help="KV cells per slot")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--width", type=int, default=448)
    ap.add_argument("--height", type=int, default=336)
    args = ap.parse_args()

    files = build("quick", SCRATCH / "models", ["f16"])
    model_path, mmproj_path = files["f16"]
    binary = build_llama_server(cli_build_dir(SCRATCH))
    template = SCRATCH / "serve-template.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")

    def ours() -> ServerProcess:
        port = free_port()
        return ServerProcess("glm4v-mtmd", [sys.executable, "-m", "glm4v_mtmd", "serve", "-m", model_path, "--mmproj",
                                            mmproj_path, "--port", str(port), "--parallel", str(args.parallel),
                                            "--n-ctx", str(args.n_ctx), "-t", str(args.threads), "--flash-attn", "on",
                                            "--chat-template-file", str(template)], port)

    def theirs() -> ServerProcess:
        port = free_port()
        return ServerProcess("llama-server", [
            str(binary), "-m", model_path, "--mmproj", mmproj_path, "--port", str(port), "-np", str(args.parallel),
            "-c", str(args.n_ctx * args.parallel), "-t", str(args.threads), "-tb", str(args.threads), "-fa", "on",
            "--jinja", "--chat-template-file", str(template), "--no-webui"], port)

    sides = {"glm4v-mtmd": ours, "llama-server": theirs}
    try:
        import llama_cpp.server  # noqa: F401

        def lcp() -> ServerProcess:
            port = free_port()
            return ServerProcess("llama-cpp-python", [sys.executable, "-m", "llama_cpp.server", "--model", model_path,
                                                      "--clip_model_path", mmproj_path, "--port", str(port),
                                                      "--n_ctx", str(args.n_ctx), "--n_threads", str(args.threads)],
                                 port)

        sides["llama-cpp-python"] = lcp
    except ImportError:
        print("llama-cpp-python is not installed: its server is not measured", file=sys.stderr)

    # Every server is up at once (idle ones wait on their sockets) and each measurement runs on one
    # after the other, in an order that alternates: a drift of the machine's speed, which on a shared VM
    # reaches several per cent within minutes, then falls on both sides of a pair rather than on one.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    servers: dict[str, ServerProcess] = {}
    seed = 1000
    try:
        for name, start in sides.items():
            servers[name] = start()
            servers[name].ask([question(picture(seed, (args.width, args.height)), "Warm up.")], 8)
        seed += 1
        steps = measurements(args)
        for rnd in range(args.rounds):
            record: dict[str, dict[str, Any]] = {name: {} for name in servers}
            for i, (key, run) in enumerate(steps):
                names = list(servers) if (rnd + i) % 2 == 0 else list(reversed(servers))
                for name in names:
                    record[name][key] = run(servers[name], seed)  # the same pictures, new to each server
                seed += 20
            for name in servers:
                runs[name].append(record[name])
                print(f"round {rnd + 1}, {name}: " + ", ".join(f"{n}: {record[name][f'clients_{n}']['tok_s']:.1f} "
                                                                f"tok/s" for n in COUNTS)
                      + f"; shared-4 TTFT p95 {record[name]['shared_4']['ttft_p95']:.2f} s", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()

    def series(name: str, *keys: str) -> list[float]:
        out = []
        for r in runs[name]:
            v: Any = r
            for k in keys:
                v = v[k]
            out.append(float(v))
        return out

    ours_n, base = "glm4v-mtmd", "llama-server"
    ratios = [ratio(f"aggregate tok/s vs llama-server, {n} clients", series(ours_n, f"clients_{n}", "tok_s"),
                    series(base, f"clients_{n}", "tok_s"), ">= 1.0", higher_is_better=True) for n in COUNTS]
    ratios.append(ratio("follow-up TTFT vs first question's", series(ours_n, "follow_up", "follow_ttft"),
                        series(ours_n, "follow_up", "first_ttft"), "<= 0.1"))
    ratios.append(ratio("TTFT p95 vs llama-server, 4 clients, 4 pictures", series(ours_n, "clients_4", "ttft_p95"),
                        series(base, "clients_4", "ttft_p95"), "<= 1.0"))
    ratios.append(ratio("TTFT p95 vs llama-server, 4 clients, one shared picture",
                        series(ours_n, "shared_4", "ttft_p95"), series(base, "shared_4", "ttft_p95"), "<= 0.4"))
    table = []
    for name in sides:
        for n in COUNTS:
            table += [(f"{name}, {n} clients, aggregate", "tok/s", summary(series(name, f"clients_{n}", "tok_s"))),
                      (f"{name}, {n} clients, decode phase", "tok/s",
                       summary(series(name, f"clients_{n}", "decode_tok_s"))),
                      (f"{name}, {n} clients, TTFT p50", "s", summary(series(name, f"clients_{n}", "ttft_p50"))),
                      (f"{name}, {n} clients, TTFT p95", "s", summary(series(name, f"clients_{n}", "ttft_p95")))]
        table += [(f"{name}, shared picture x4, TTFT p95", "s", summary(series(name, "shared_4", "ttft_p95"))),
                  (f"{name}, first question TTFT", "s", summary(series(name, "follow_up", "first_ttft"))),
                  (f"{name}, follow-up TTFT", "s", summary(series(name, "follow_up", "follow_ttft")))]
    home = str(pathlib.Path.home())
    data = {"benchmark": "serve", "engine": glm4v_mtmd.engine_info(), "cpu": sorted(glm4v_mtmd.cpu_features()),
            "settings": {**vars(args), "model": model_path.replace(home, "~"), "flash_attn": True,
                         "counts": COUNTS, "picture": [args.width, args.height], "sides": list(sides)},
            "runs": runs}
    data["engine"] = {k: (v.replace(home, "~") if isinstance(v, str) else v) for k, v in data["engine"].items()}
    save_results(HERE / "results", "-serve", data, ratios, table, "glm4v-mtmd serve vs llama-server")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
