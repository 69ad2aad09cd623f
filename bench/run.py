"""Side-by-side benchmark: glm4v_mtmd vs llama-mtmd-cli (same engine source, flags, weights).

Every measurement runs the sides in rounds with a rotating order (CLI, package[, llama-cpp-python];
package, ...; each run is a fresh process so load order and peak RSS are per run) and reports the
median of the per-round ratios with their spread. llama-cpp-python is measured when installed
(TTFT of a first and a follow-up question, streamed decode); transformers (torch CPU) gives
reference numbers. Writes ``bench/results/<date>-<host>-<cpu>.json``, a PNG chart of the ratios next to
it and prints a Markdown table.

    python bench/run.py --quick      # ~0.2 B text model, 448x336 image, 5 rounds: ~6.5 min on 2 cores
    python bench/run.py --pairs 3    # ~1 B text model (q4_k_m), 1024x768 image: ~38 min on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

from cli_target import RunSpec, build_cli, cli_build_dir, run_cli, run_measured
from make_model import PRESETS, build
from PIL import Image
from report import Ratio, ratio, save_results, summary

import glm4v_mtmd

HERE = pathlib.Path(__file__).resolve().parent
SCRATCH = pathlib.Path(os.environ.get("GLM4V_BENCH_SCRATCH", pathlib.Path.home() / ".cache" / "glm4v-mtmd" / "bench"))
# ~40 text tokens with the random checkpoint's byte-level tokenizer (about one token per byte).
PROMPT_TEXT = "Describe this picture: its objects and colours."


@dataclass(frozen=True)
class Plan:
    """What a run measures; ``--quick`` and the full run differ only here."""

    preset: str
    outtype: str
    image_size: tuple[int, int]
    n_tokens: int
    pairs: int
    n_ctx: int
    hf_tokens: int
    hf_dtypes: tuple[str, ...]


QUICK = Plan("quick", "q4_k_m", (448, 336), 128, 5, 2048, 8, ("bfloat16", "float32"))
FULL = Plan("1b", "q4_k_m", (1024, 768), 256, 5, 4096, 32, ("bfloat16", "float32"))


def make_image(size: tuple[int, int], path: pathlib.Path) -> pathlib.Path:
    """The package's sample picture stretched to ``size`` (a real photo, not noise)."""
    with Image.open(glm4v_mtmd.sample_image()) as img:
        img.convert("RGB").resize(size, Image.BICUBIC).save(path)
    return path


def run_worker(kind: str, spec: dict[str, Any], env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run ``workers.py kind`` in a fresh interpreter (``env``: variables added to this process's);
    its JSON result plus its peak RSS."""
    cmd = [sys.executable, str(HERE / "workers.py"), kind, json.dumps(spec)]
    stdout, _, wall, rss = run_measured(cmd, {**os.environ, **env} if env else None)
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": wall, "peak_rss": rss}


def read_through(paths: list[str]) -> None:
    """Read the model files so each run starts with them in the page cache (the kernel may
    reclaim them between runs; a cold read would be charged to whichever side runs next)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def interleaved(binary: pathlib.Path, spec: RunSpec, pairs: int, with_lcp: bool,
                package_kind: str = "package") -> dict[str, list[dict]]:
    """Rounds of one run per side, the order rotating (CLI, package; package, CLI; ... and with
    llama-cpp-python measured: CLI, package, llama-cpp-python; package, llama-cpp-python, CLI; ...).
    The package side runs ``workers.py package_kind``."""
    sides = ["cli", "package"] + (["llama_cpp_python"] if with_lcp else [])
    kinds = {"package": package_kind, "llama_cpp_python": "llama_cpp_python"}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(pairs):
        order = sides[i % len(sides):] + sides[:i % len(sides)]
        for side in order:
            read_through([spec.model, spec.mmproj])
            if side == "cli":
                runs[side].append(run_cli(binary, spec))
            else:
                runs[side].append(run_worker(kinds[side], {**asdict(spec), "seed": i}))
            print(f"  round {i + 1}/{pairs} {side}: done", file=sys.stderr, flush=True)
    return runs


def transformers_reference(plan: Plan, hf_dir: str, image: str, threads: int) -> list[dict]:
    """transformers numbers for each dtype (skipped with a note when it cannot run)."""
    results = []
    for dtype in plan.hf_dtypes:
        spec = {"hf_dir": hf_dir, "image": image, "dtype": dtype, "n_threads": threads, "n_tokens": plan.hf_tokens}
        try:
            results.append(run_worker("transformers", spec))
        except (RuntimeError, subprocess.SubprocessError) as exc:
            results.append({"dtype": dtype, "error": str(exc)[-500:]})
    return results


def memory_model(plan: Plan, files: list[str], buffers_mib: float) -> dict[str, float]:
    """Expected resident bytes: both GGUF files + the f16 KV cache + the compute buffers."""
    shape = PRESETS[plan.preset]
    head_dim = shape.hidden // shape.heads
    kv = plan.n_ctx * shape.layers * 2 * shape.kv_heads * head_dim * 2
    file_bytes = sum(pathlib.Path(f).stat().st_size for f in files)
    return {"file_bytes": file_bytes, "kv_bytes": kv, "compute_buffer_bytes": buffers_mib * 2**20,
            "expected_bytes": file_bytes + kv + buffers_mib * 2**20}


def col(runs: list[dict], key: str) -> list[float]:
    """One measured quantity across runs."""
    return [float(r[key]) for r in runs]


def ratios(cli: list[dict], pkg: list[dict], hf: list[dict], lcp: list[dict], expected: float) -> list[Ratio]:
    """The issue's targets (package vs CLI, follow-up vs first) and its report-only ratios."""
    out = [
        ratio("decode tok/s, package / CLI", col(pkg, "decode_tok_s"), col(cli, "decode_tok_s"), ">= 0.97",
              higher_is_better=True),
        ratio("prompt+image eval ms, package / CLI", col(pkg, "prompt_ms"), col(cli, "prompt_ms"), "<= 1.03"),
        ratio("image encode ms, package / CLI", col(pkg, "encode_ms"), col(cli, "encode_ms"), "<= 1.03"),
        ratio("follow-up TTFT / first TTFT", col(pkg, "ttft_follow_up_ms"), col(pkg, "ttft_first_ms"), "<= 0.1"),
    ]
    if lcp:
        out += [
            ratio("decode tok/s streamed (wall clock), package / llama-cpp-python", col(pkg, "decode_stream_tok_s"),
                  col(lcp, "decode_stream_tok_s"), higher_is_better=True),
            ratio("follow-up TTFT, package / llama-cpp-python", col(pkg, "ttft_follow_up_ms"),
                  col(lcp, "ttft_follow_up_ms")),
            ratio("llama-cpp-python follow-up TTFT / its first TTFT", col(lcp, "ttft_follow_up_ms"),
                  col(lcp, "ttft_first_ms")),
        ]
    for ref in (r for r in hf if "error" not in r):
        out.append(ratio(f"decode tok/s, package / transformers {ref['dtype']}", col(pkg, "decode_tok_s"),
                         [ref["decode_tok_s"]], higher_is_better=True))
        out.append(ratio(f"image encode ms, cold (first picture of the process), package / transformers "
                         f"{ref['dtype']}", col(pkg, "encode_ms"), [ref["encode_ms"]]))
        out.append(ratio(f"image encode ms, warm (second picture), package / transformers {ref['dtype']}",
                         col(pkg, "second_encode_ms"), [ref["second_encode_ms"]]))
    out.append(ratio("peak RSS, package / (files + KV + buffers)", col(pkg, "peak_rss"), [expected]))
    out.append(ratio("peak RSS, package / CLI", col(pkg, "peak_rss"), col(cli, "peak_rss")))
    return out


def absolutes(cli: list[dict], pkg: list[dict], hf: list[dict], lcp: list[dict], mem: dict[str, float],
              model_bytes: int) -> list[tuple[str, str, dict[str, float]]]:
    """Medians behind the ratios, plus decode bandwidth (text GGUF bytes read per token x tok/s)."""
    rows = []
    for side, runs in (("package", pkg), ("CLI", cli)):
        gbs = [model_bytes * t / 1e9 for t in col(runs, "decode_tok_s")]
        rows += [(f"{side} image encode" + (", cold" if side == "package" else ""), "ms",
                  summary(col(runs, "encode_ms"))),
                 (f"{side} prompt+image eval", "ms", summary(col(runs, "prompt_ms"))),
                 (f"{side} decode", "tok/s", summary(col(runs, "decode_tok_s"))),
                 (f"{side} decode bandwidth", "GB/s", summary(gbs)),
                 (f"{side} peak RSS", "MiB", summary([b / 2**20 for b in col(runs, "peak_rss")]))]
    rows += [("package image encode, warm", "ms", summary(col(pkg, "second_encode_ms"))),
             ("package engine preprocessing of the image", "ms", summary(col(pkg, "preprocess_ms"))),
             ("package TTFT, first question", "ms", summary(col(pkg, "ttft_first_ms"))),
             ("package TTFT, follow-up", "ms", summary(col(pkg, "ttft_follow_up_ms"))),
             ("package decode, streamed (wall clock)", "tok/s", summary(col(pkg, "decode_stream_tok_s")))]
    if lcp:
        rows += [("llama-cpp-python TTFT, first question", "ms", summary(col(lcp, "ttft_first_ms"))),
                 ("llama-cpp-python TTFT, follow-up", "ms", summary(col(lcp, "ttft_follow_up_ms"))),
                 ("llama-cpp-python decode, streamed (wall clock)", "tok/s",
                  summary(col(lcp, "decode_stream_tok_s"))),
                 ("llama-cpp-python decode, its engine clock", "tok/s", summary(col(lcp, "engine_decode_tok_s")))]
    rows.append(("files + KV + compute buffers", "MiB", summary([mem["expected_bytes"] / 2**20])))
    for ref in (r for r in hf if "error" not in r):
        rows += [(f"transformers {ref['dtype']} get_image_features, cold", "ms", summary([ref["encode_ms"]])),
                 (f"transformers {ref['dtype']} get_image_features, warm", "ms", summary([ref["second_encode_ms"]])),
                 (f"transformers {ref['dtype']} decode", "tok/s", summary([ref["decode_tok_s"]]))]
    return rows


def peers(lcp: list[dict], skipped: bool) -> dict[str, str]:
    """What happened to each optional peer."""
    if lcp:
        return {"llama-cpp-python": f"measured: version {lcp[0]['version']}"}
    if skipped:
        return {"llama-cpp-python": "installed, skipped (--no-llama-cpp-python)"}
    return {"llama-cpp-python": "not installed: skipped"}


def machine(threads: int) -> dict[str, Any]:
    """The machine the numbers came from."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "engine": glm4v_mtmd.engine_info()}


def main() -> None:
    """Build everything needed, measure, write results/<date>-<host>-<cpu>.json + .png, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small text model and image, 5 pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pairs", type=int, help="override the number of A/B pairs")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp-python", action="store_true", help="skip llama-cpp-python even when installed")
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH, help="models and the CLI build go here")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.pairs:
        plan = Plan(**{**asdict(plan), "pairs": args.pairs})

    files = build(plan.preset, args.scratch / "models", [plan.outtype])
    binary = build_cli(cli_build_dir(args.scratch))
    image = make_image(plan.image_size, args.scratch / f"bench-{plan.image_size[0]}x{plan.image_size[1]}.png")
    model, mmproj = files[plan.outtype]
    spec = RunSpec(model, mmproj, str(image), PROMPT_TEXT, plan.n_tokens, plan.n_ctx, args.threads)
    with_lcp = importlib.util.find_spec("llama_cpp") is not None and not args.no_llama_cpp_python
    runs = interleaved(binary, spec, plan.pairs, with_lcp)
    cli, pkg, lcp = runs["cli"], runs["package"], runs.get("llama_cpp_python", [])
    hf = [] if args.no_transformers else transformers_reference(plan, files["hf_dir"][0], str(image), args.threads)

    mem = memory_model(plan, [model, mmproj], statistics_median(col(pkg, "compute_buffers_mib")))
    result = ratios(cli, pkg, hf, lcp, mem["expected_bytes"])
    table = absolutes(cli, pkg, hf, lcp, mem, pathlib.Path(model).stat().st_size)
    write_results(plan, args, spec, {**runs, "transformers": hf}, mem, result, table,
                  peers(lcp, args.no_llama_cpp_python))


def statistics_median(values: list[float]) -> float:
    """Median (0 for no values)."""
    return summary(values)["median"] if values else 0.0


def numeric_summary(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Median/min/max of every numeric field of repeated runs."""
    return {k: summary(col(runs, k)) for k, v in runs[0].items() if isinstance(v, (int, float))}


def write_results(plan: Plan, args: argparse.Namespace, spec: RunSpec, runs: dict[str, list[dict]],
                  mem: dict[str, float], result: list[Ratio], table: list[tuple[str, str, dict[str, float]]],
                  peer_notes: dict[str, str]) -> None:
    """results/<date>-<host>-<cpu>[-quick].json, the chart next to it, and the Markdown tables on stdout."""
    mode = "quick" if args.quick else "full"
    data = {
        "mode": mode, "plan": asdict(plan), "spec": asdict(spec), "machine": machine(args.threads), "peers": peer_notes,
        "memory_model": mem,
        "summary": {side: numeric_summary(r) for side, r in runs.items() if r and side != "transformers"},
        "runs": runs,
    }
    save_results(HERE / "results", "-quick" if args.quick else "", data, result, table,
                 f"glm4v_mtmd ratios - {mode} - {data['machine']['cpu'][:60]}")

if __name__ == "__main__":
    main()
