"""Batched decoding: aggregate tok/s of N contexts of one Model generating at once.

For N in 1, 2, 4, 8 concurrent contexts (threads) of one ``Model(n_parallel=8)``, each with its own
prompt, the aggregate decode rate (N x tokens / wall time of the generation phase) is measured
beside two baselines from the same run:

- the same work done one after another (the N generations in sequence, same contexts);
- llama.cpp's own ``llama-batched-bench`` built from the package's engine tree with the package's
  engine options (bench/cli/CMakeLists.txt), same model, threads, batch sizes, flash attention and
  KV type, at the same sequence counts (its S_TG column).

Targets (issue: "One model, many conversations"): aggregate at 4 >= 2.5x the single-sequence rate;
>= 0.95x the engine tool at every count. Writes ``bench/results/<date>-<host>-<cpu>-batched.json``.

    python bench/batched.py            # quick F16 bench model, 128 prompt + 128 generated tokens, 3 rounds
    python bench/batched.py --rounds 1 --tokens 32   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from typing import Any

from cli_target import cli_build_dir, run_measured
from make_model import build
from report import ratio, save_results, summary

import glm4v_mtmd
from glm4v_mtmd import GenerationConfig, Model, Tokens

HERE = pathlib.Path(__file__).resolve().parent
SCRATCH = pathlib.Path(os.environ.get("GLM4V_BENCH_SCRATCH", pathlib.Path.home() / ".cache" / "glm4v-mtmd" / "bench"))
COUNTS = (1, 2, 4, 8)


# ------------------------------------------------------------------------------------- llama-batched-bench


def _engine_pin() -> tuple[str, str]:
    """(sdist file name, sha256) of the pinned engine source, read from cmake/engine_source.cmake."""
    text = (HERE.parent / "cmake" / "engine_source.cmake").read_text(encoding="utf-8")
    version = re.search(r'GLM4V_ENGINE_PACKAGE_VERSION "([^"]+)"', text).group(1)
    sha = re.search(r'GLM4V_ENGINE_SHA256 "([0-9a-f]+)"', text).group(1)
    return f"llama_cpp_python-{version}.tar.gz", sha


def pinned_sdist() -> pathlib.Path:
    """The pinned engine source distribution (the build's download, or pip's), its sha256 checked."""
    name, sha = _engine_pin()
    source_dir = pathlib.Path(glm4v_mtmd.engine_info()["source_dir"])
    sdist = source_dir.parent.parent / "downloads" / name
    if not sdist.exists():
        dl = SCRATCH / "downloads"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dl),
                        name.split("-")[0].replace("_", "-") + "==" + name.split("-")[1].removesuffix(".tar.gz")],
                       check=True, stdout=subprocess.DEVNULL)
        sdist = dl / name
    if hashlib.sha256(sdist.read_bytes()).hexdigest() != sha:
        raise RuntimeError(f"{sdist} does not have the pinned sha256 {sha}")
    return sdist


def batched_bench_sources(out: pathlib.Path) -> pathlib.Path:
    """tools/batched-bench's sources from the pinned source distribution."""
    if (out / "batched-bench.cpp").exists():
        return out
    sdist = pinned_sdist()
    name = sdist.name
    prefix = f"{name.removesuffix('.tar.gz')}/vendor/llama.cpp/tools/batched-bench/"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for file in ("main.cpp", "batched-bench.cpp"):
            data = tar.extractfile(prefix + file)
            assert data is not None
            (out / file).write_bytes(data.read())
    return out


def build_batched_bench(build_dir: pathlib.Path, jobs: int = 2) -> pathlib.Path:
    """Configure and build ``llama-batched-bench`` next to the CLI (a no-op when up to date)."""
    sources = batched_bench_sources(build_dir / "batched-bench-src")
    source = glm4v_mtmd.engine_info()["source_dir"]
    subprocess.run(["cmake", "-S", str(HERE / "cli"), "-B", str(build_dir), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DGLM4V_ENGINE_DIR={source}",
                    f"-DGLM4V_BATCHED_BENCH_DIR={sources}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-batched-bench", "-j", str(jobs)],
                   check=True)
    return build_dir / "llama-batched-bench"


def run_batched_bench(binary: pathlib.Path, model: str, args: argparse.Namespace) -> dict[int, float]:
    """S_TG (aggregate decode tok/s) per sequence count from one llama-batched-bench run."""
    cmd = [str(binary), "-m", model, "-c", str(args.n_ctx * max(COUNTS)), "-b", "2048", "-ub", "512",
           "-npp", str(args.prompt), "-ntg", str(args.tokens), "-npl", ",".join(map(str, COUNTS)),
           "-t", str(args.threads), "-tb", str(args.threads), "-fa", "on", "--output-format", "jsonl"]
    stdout, stderr, _, _ = run_measured(cmd)
    rows = [json.loads(line) for line in (stdout + "\n" + stderr).splitlines() if line.startswith("{\"n_kv_max\"")]
    return {int(r["pl"]): float(r["speed_tg"]) for r in rows}


# ------------------------------------------------------------------------------------- the package


def prompts(model: Model, n: int, length: int) -> list[Tokens]:
    """``n`` different prompts of ``length`` ids (as llama-batched-bench draws random tokens)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [Tokens(rng.integers(0, model.n_vocab, size=length)) for _ in range(n)]


def run_package(model: Model, n: int, args: argparse.Namespace) -> dict[str, float]:
    """Aggregate decode tok/s of ``n`` contexts generating together, and the same work in sequence."""
    config = GenerationConfig(max_tokens=args.tokens, temperature=0.0, top_k=0, top_p=1.0,
                              repetition_penalty=1.0, ignore_eos=True)
    ps = prompts(model, n, args.prompt)
    contexts = [model.context() for _ in range(n)]
    try:
        # Sequential: each context evaluates its prompt, then generates alone.
        seq_s = 0.0
        for ctx, p in zip(contexts, ps):
            ctx.reset()
            ctx.evaluate([p])
            t0 = time.perf_counter()
            ctx.generate([p], config)  # reuses the evaluated prompt (one cell re-evaluated for its logits)
            seq_s += time.perf_counter() - t0
        # Together: the prompts are evaluated first, then all contexts generate at once.
        for ctx, p in zip(contexts, ps):
            ctx.reset()
            ctx.evaluate([p])
        barrier = threading.Barrier(n + 1)
        done: list[float] = []

        def worker(ctx: Any, p: Tokens) -> None:
            barrier.wait()
            ctx.generate([p], config)
            done.append(time.perf_counter())

        threads = [threading.Thread(target=worker, args=(c, p)) for c, p in zip(contexts, ps)]
        for t in threads:
            t.start()
        steps0 = model.engine_steps
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = max(done) - t0
        steps1 = model.engine_steps
    finally:
        for ctx in contexts:
            ctx.close()
    total = n * args.tokens
    return {"together_tok_s": total / wall, "sequential_tok_s": total / seq_s,
            "steps": steps1[0] - steps0[0], "requests": steps1[1] - steps0[1]}


# ------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=512, help="KV cells per sequence")
    args = ap.parse_args()

    files = build("quick", SCRATCH / "models", ["f16"])
    model_path, mmproj_path = files["f16"]
    binary = build_batched_bench(cli_build_dir(SCRATCH))

    runs: dict[int, dict[str, list[float]]] = {n: {"pkg": [], "seq": [], "tool": [], "shared": []} for n in COUNTS}
    with Model(model_path, mmproj_path, n_ctx=args.n_ctx, n_parallel=max(COUNTS), n_threads=args.threads,
               flash_attn=True, kv_cache_type="f16") as model:
        for rnd in range(args.rounds):
            # Rotate which side goes first, so neither always runs on a warmer machine.
            order = ["tool", "pkg"] if rnd % 2 == 0 else ["pkg", "tool"]
            for side in order:
                if side == "tool":
                    for n, tok_s in run_batched_bench(binary, model_path, args).items():
                        runs[n]["tool"].append(tok_s)
                else:
                    for n in COUNTS:
                        r = run_package(model, n, args)
                        runs[n]["pkg"].append(r["together_tok_s"])
                        runs[n]["seq"].append(r["sequential_tok_s"])
                        runs[n]["shared"].append(1.0 - r["steps"] / max(1, r["requests"]))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{n}: {runs[n]['pkg'][-1]:.1f} (tool {runs[n]['tool'][-1]:.1f})" for n in COUNTS), file=sys.stderr)

    single = runs[1]["pkg"]
    ratios = [ratio("aggregate at 4 vs 1 sequence", runs[4]["pkg"], single, ">= 2.5", higher_is_better=True)]
    ratios += [ratio(f"package vs llama-batched-bench at {n}", runs[n]["pkg"], runs[n]["tool"], ">= 0.95",
                     higher_is_better=True) for n in COUNTS]
    ratios += [ratio(f"together vs one after another at {n}", runs[n]["pkg"], runs[n]["seq"], None,
                     higher_is_better=True) for n in COUNTS if n > 1]
    table = []
    for n in COUNTS:
        table += [(f"package, {n} together", "tok/s", summary(runs[n]["pkg"])),
                  (f"package, {n} one after another", "tok/s", summary(runs[n]["seq"])),
                  (f"llama-batched-bench, {n}", "tok/s", summary(runs[n]["tool"])),
                  (f"requests sharing a step, {n}", "fraction", summary(runs[n]["shared"]))]
    data = {"benchmark": "batched", "engine": glm4v_mtmd.engine_info(), "cpu": sorted(glm4v_mtmd.cpu_features()),
            "settings": {**vars(args), "model": model_path, "flash_attn": True, "kv_cache_type": "f16",
                         "n_batch": 2048, "n_ubatch": 512, "counts": COUNTS},
            "runs": {str(n): v for n, v in runs.items()},
            "medians": {str(n): {k: statistics.median(v) for k, v in runs[n].items()} for n in COUNTS}}
    save_results(HERE / "results", "-batched", data, ratios, table, "Batched decoding: N contexts of one model")


if __name__ == "__main__":
    main()
