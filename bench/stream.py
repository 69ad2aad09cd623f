"""Streaming overhead: ``Session.chat_stream`` throughput against the engine's own C-side rate, same run.

A user of a thinking model reads thousands of streamed tokens; the binding's cost per token must not
grow with the output. For each output length this runs, alternately, ``chat_stream`` (one engine call
per token, stop strings and the reasoning/answer split active) and ``generate`` (64 tokens per engine
call), and compares each run's wall-clock tokens/s with the rate the engine itself reports for that
same run (prompt + decode + sampling time measured in C). A ratio of 1.0 means no binding overhead.
Where llama-cpp-python is installed, its ``create_completion(stream=True)`` is measured the same way
on the same GGUF and prompt (in a child process: two copies of ggml do not share one).

    python bench/stream.py                    # tiny random model, lengths 128..8192, 3 runs each
    python bench/stream.py --tokens 512 2048  # other lengths

Writes ``bench/results/<date>-<host>-<cpu>-stream.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from report import result_stem

import glm4v_mtmd
from glm4v_mtmd import GenerationConfig, Session
from glm4v_mtmd.chat import build_prompt

HERE = pathlib.Path(__file__).resolve().parent
SCRATCH = pathlib.Path(os.environ.get("GLM4V_BENCH_SCRATCH", pathlib.Path.home() / ".cache" / "glm4v-mtmd" / "bench"))
MESSAGES = [{"role": "user", "content": "Think about it, then answer: what is in a picture of a cat?"}]
STOP = "<|this stop string never occurs|>"


def tiny_model(scratch: pathlib.Path) -> pathlib.Path:
    """The self-check's random checkpoint, converted once (the engine cost per token is ~0.1-5 ms)."""
    from glm4v_mtmd.convert import convert
    from glm4v_mtmd.random_checkpoint import write_random_checkpoint

    out = scratch / "stream-tiny"
    model = out / "gguf" / "tiny-glm4v-F16.gguf"
    if not model.exists():
        hf = write_random_checkpoint(out / "tiny-glm4v")
        model, _ = convert(hf, out / "gguf", outtype="f16", progress=False)
    return model


def one_run(session: Session, mode: str, n_tokens: int, seed: int) -> dict[str, float]:
    config = GenerationConfig(max_tokens=n_tokens, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                              seed=seed, ignore_eos=True, stop=(STOP,))
    session.reset()
    start = time.perf_counter()
    if mode == "chat_stream":
        kinds: dict[str, int] = {}
        for chunk in session.chat_stream(MESSAGES, config, thinking=True):
            kinds[chunk.kind] = kinds.get(chunk.kind, 0) + 1
            timings = chunk.timings
    else:
        timings = session.chat(MESSAGES, config, thinking=True).timings
    wall = time.perf_counter() - start
    t = timings  # the engine's own clocks for this very generation (the last chunk carries them)
    assert t is not None
    engine_s = (t.prompt_ms + t.decode_ms + t.sample_ms) / 1000
    return {"tokens": n_tokens, "wall_s": wall, "engine_s": engine_s, "tok_s": n_tokens / wall,
            "engine_tok_s": n_tokens / engine_s, "ratio": engine_s / wall,
            "overhead_us_per_token": (wall - engine_s) / n_tokens * 1e6}


def summarise(mode: str, n: int, rs: list[dict[str, float]]) -> dict[str, Any]:
    """One table row: the medians of a mode's runs at one length."""
    return {"mode": mode, "tokens": n, "runs": rs,
            **{f"median_{k}": statistics.median(x[k] for x in rs)
               for k in ("tok_s", "engine_tok_s", "ratio", "overhead_us_per_token")},
            "min_ratio": min(x["ratio"] for x in rs), "max_ratio": max(x["ratio"] for x in rs)}


def llama_cpp_python_rows(model: pathlib.Path, prompt: str, args: argparse.Namespace) -> tuple[list[dict], str]:
    """llama-cpp-python's rows (``workers.py stream_llama_cpp_python`` in a child process) and its version."""
    spec = {"model": str(model), "prompt": prompt, "stop": STOP, "tokens": args.tokens, "runs": args.runs,
            "n_ctx": max(args.tokens) + 256, "n_threads": args.threads}
    out = subprocess.run([sys.executable, str(HERE / "workers.py"), "stream_llama_cpp_python", json.dumps(spec)],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    rows = [summarise("llama-cpp-python", n, [r for r in result["runs"] if r["tokens"] == n]) for n in args.tokens]
    return rows, result["version"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH)
    ap.add_argument("--no-llama-cpp-python", action="store_true", help="skip llama-cpp-python even when installed")
    args = ap.parse_args()

    model = tiny_model(args.scratch)
    rows: list[dict[str, Any]] = []
    with Session(model, n_ctx=max(args.tokens) + 256, n_threads=args.threads, flash_attn=True) as session:
        one_run(session, "chat_stream", 64, 0)  # warm-up
        for n in args.tokens:
            runs: dict[str, list[dict[str, float]]] = {"chat_stream": [], "chat": []}
            for r in range(args.runs):
                for mode in ("chat_stream", "chat"):  # A B A B ...
                    runs[mode].append(one_run(session, mode, n, seed=r))
            rows += [summarise(mode, n, rs) for mode, rs in runs.items()]
        prompt = build_prompt(session.model, MESSAGES, True)[0][0]
    if importlib.util.find_spec("llama_cpp") is None:
        peer = "not installed here: not measured"
    elif args.no_llama_cpp_python:
        peer = "installed, skipped (--no-llama-cpp-python)"
    else:
        lcp_rows, version = llama_cpp_python_rows(model, prompt, args)
        rows += lcp_rows
        peer = (f"measured: version {version}, create_completion(stream=True); tokens that end generation, "
                "have no text or are not UTF-8 on their own biased to -inf (workers._banned_tokens)")

    print("| mode | tokens | tok/s | engine tok/s (same runs) | ratio (median, min-max) | overhead µs/token |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['tokens']} | {row['median_tok_s']:.0f} | {row['median_engine_tok_s']:.0f} | "
              f"{row['median_ratio']:.3f} ({row['min_ratio']:.3f}-{row['max_ratio']:.3f}) | "
              f"{row['median_overhead_us_per_token']:.1f} |")
    target = next(r for r in rows if r["mode"] == "chat_stream" and r["tokens"] == max(args.tokens))
    print(f"\nchat_stream at {target['tokens']} tokens: {target['median_ratio']:.3f}x the engine's own rate "
          f"(target >= 0.9)")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{result_stem('-stream')}.json"
    out.write_text(json.dumps({
        "what": "chat_stream / chat throughput vs the engine's own prompt+decode+sample time, same runs",
        "machine": {"host": socket.gethostname(), "cores": os.cpu_count(), "threads": args.threads,
                    "python": platform.python_version(), "engine": glm4v_mtmd.engine_info()["engine_commit"]},
        "model": "random tiny GLM-4.1V (glm4v_mtmd.random_checkpoint), F16, flash attention on",
        "peers": {"llama-cpp-python": peer},
        "target": {"chat_stream_ratio_at_max_tokens": 0.9, "measured": target["median_ratio"]},
        "rows": rows,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
