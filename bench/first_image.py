"""First encounter with an image: glm4v_mtmd against transformers' fastest dtype on this machine.

What a user waits for on the first question about a photo: the image encode, then the prefill of
the image and text tokens; then the decode. The package runs with the weight precision
``glm4v_mtmd.preferred_float_type()`` picks from the engine's CPU features (BF16 where the CPU has
BF16 dot products, else F16) and, for comparison, with the other one; transformers (torch CPU)
with each dtype is probed on the real image first (one cold run each) and the faster one is
measured on it, alternating with the package (package, transformers, transformers, package, ...;
each run a fresh process). Each run of the chosen precision and of transformers then takes a second
picture in the same process (a new conversation, report only): the first image of a process
also pays its one-time costs, such as the first touch of the engine's compute buffers. Writes
``results/<date>-<host>-<cpu>-first-image[-quick].json`` and a PNG chart.

    python bench/first_image.py --quick   # GLM-4.1V vision tower, small text model, 448x336: ~3 min
    python bench/first_image.py           # + GLM-4.1V-9B's text layer shape (5 layers), 1008x756: ~20 min
    python bench/first_image.py --pairs 5 # medians of 5 pairs: ~15 min once the model exists
    python bench/first_image.py --isa avx2  # both sides limited to AVX2 (see ISAS): the laptop class
    python bench/first_image.py --quick --gpu  # a GPU build: the package offloaded, transformers on CUDA

``--isa avx2`` measures the CPUs most laptops have (AVX2, FMA, F16C; no AVX512) on a bigger one: the
package is built again for that class alone (``GGML_NATIVE=OFF`` and the flags in ``ISAS``, into the
scratch directory with pip, incremental after the first ~5 minutes) and its workers import that build;
torch is held to AVX2 by ``ATEN_CPU_CAPABILITY``, oneDNN's ``ONEDNN_MAX_CPU_ISA`` and MKL's
``MKL_ENABLE_INSTRUCTIONS`` (MKL runs torch's float32 linear layers and reads only its own variable). Each run records
what it really ran (the engine's CPU features, torch's capability), and the results carry the class in
their name.

Model (``make_model.py --preset first-image``): the real GLM-4.1V vision tower (depth 24, hidden
1536, 12 heads, MLP 4096 wide, merger 4096 -> 13696 -> 4096) and 5 text layers of the 9B model's
shape (hidden 4096, 32 / 2 heads, FFN 13696); random weights. Image: the package's sample picture
stretched to 1008x756 (972 image tokens, 3,888 patches).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from make_model import build
from report import Ratio, ratio, save_results, summary
from run import SCRATCH, col, machine, make_image, run_worker

import glm4v_mtmd

HERE = pathlib.Path(__file__).resolve().parent
PROMPT_TEXT = "Describe this picture: its objects and colours."
HF_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class Plan:
    """What a run measures; ``--quick`` and the full run differ only here."""

    preset: str
    image_size: tuple[int, int]
    n_tokens: int
    pairs: int
    n_ctx: int


# CPU classes a run can be limited to: the engine's CMake flags and torch's environment for each.
ISAS: dict[str, dict[str, dict[str, str]]] = {
    "avx2": {
        "cmake": {"GGML_NATIVE": "OFF", "GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_FMA": "ON",
                  "GGML_F16C": "ON", "GGML_BMI2": "ON", "GGML_AVX_VNNI": "OFF", "GGML_AVX512": "OFF",
                  "GGML_AVX512_VBMI": "OFF", "GGML_AVX512_VNNI": "OFF", "GGML_AVX512_BF16": "OFF",
                  "GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF"},
        # ATEN_CPU_CAPABILITY: torch's own kernels; ONEDNN_MAX_CPU_ISA: oneDNN's; MKL_ENABLE_INSTRUCTIONS:
        # MKL's, which runs torch's float32 linear layers and ignores the other two (without it the GEMMs
        # of an "AVX2" torch use AVX512).
        "torch": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    },
}
REPO = HERE.parent


def isa_package(isa: str, scratch: pathlib.Path) -> pathlib.Path:
    """The package built for CPU class ``isa`` alone (pip, into ``scratch``; incremental): its directory.

    One directory per checkout (CMake ties a build directory to one source directory)."""
    root = scratch / f"isa-{isa}-{hashlib.sha256(str(REPO).encode()).hexdigest()[:8]}"
    site = root / "site"
    defines = [f"-Ccmake.define.{k}={v}" for k, v in ISAS[isa]["cmake"].items()]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(site),
                    f"-Cbuild-dir={root / 'build'}", *defines, str(REPO)], check=True)
    return site


QUICK = Plan("quick", (448, 336), 16, 2, 1024)
# 128 generated tokens: over 32 (~1.3 s here) single decode rates varied by 1.5x on the VM
FULL = Plan("first-image", (1008, 756), 128, 3, 2048)


def probe_transformers(hf_dir: str, image: str, threads: int, env: Optional[dict[str, str]] = None,
                       device: str = "cpu") -> tuple[str, list[dict]]:
    """Each dtype on ``image`` (encode + prefill, cold: what the runs measure); the fastest one's name and all
    results. The real image, not a smaller one: on an AMX CPU torch's bfloat16 pays oneDNN's first-call costs,
    which a small image cannot amortise (2026-12-07, 336x252 probe: bfloat16 5.9 s against float32's 5.7 s;
    1008x756: bfloat16 encodes in 10.6 s, float32 in 36.1 s)."""
    probes = []
    for dtype in HF_DTYPES:
        spec = {"hf_dir": hf_dir, "image": image, "dtype": dtype, "n_threads": threads, "text": PROMPT_TEXT,
                "device": device}
        probes.append(run_worker("first_image_transformers", spec, env))
        print(f"  transformers {dtype} probe: {probes[-1]['encode_ms']:.0f} ms encode", file=sys.stderr)
    fastest = min(probes, key=lambda p: p["encode_ms"] + p["prefill_ms"])
    return fastest["dtype"], probes


def measure(plan: Plan, files: dict[str, list[str]], image: str, threads: int, hf_dtype: str,
            chosen: str, envs: Optional[dict[str, dict[str, str]]] = None, gpu: bool = False) -> dict[str, list[dict]]:
    """``plan.pairs`` pairs of (package with ``chosen`` precision, transformers ``hf_dtype``), alternating,
    plus the package with the other precision once per pair. ``gpu``: the package offloads every layer
    and the projector, transformers runs on CUDA."""
    other = "bf16" if chosen == "f16" else "f16"
    runs: dict[str, list[dict]] = {"package": [], "package_other": [], "transformers": []}
    envs = envs or {}

    def package(precision: str, seed: int) -> dict:
        model, mmproj = files[precision]
        return run_worker("first_image_package", {"model": model, "mmproj": mmproj, "image": image,
                                                  "text": PROMPT_TEXT, "n_tokens": plan.n_tokens,
                                                  "n_ctx": plan.n_ctx, "n_threads": threads, "seed": seed,
                                                  "second_image": precision == chosen,
                                                  "n_gpu_layers": -1 if gpu else 0}, envs.get("package"))

    def transformers(seed: int) -> dict:
        return run_worker("first_image_transformers", {"hf_dir": files["hf_dir"][0], "image": image, "dtype": hf_dtype,
                                                       "n_threads": threads, "text": PROMPT_TEXT,
                                                       "n_tokens": plan.n_tokens, "second_image": True,
                                                       "device": "cuda" if gpu else "cpu"},
                          envs.get("transformers"))

    for i in range(plan.pairs):
        order = ("package", "transformers") if i % 2 == 0 else ("transformers", "package")
        for side in order:
            runs[side].append(package(chosen, i) if side == "package" else transformers(i))
            print(f"  pair {i + 1}/{plan.pairs} {side}: encode {runs[side][-1]['encode_ms']:.0f} ms",
                  file=sys.stderr, flush=True)
        runs["package_other"].append(package(other, i))
    return runs


def time_target(features: list[str], gpu: bool = False) -> str:
    """Issue #22's bound on the encode and prefill ratios for the engine's CPU class: 0.75 where the CPU has
    AVX512_BF16 (the median, so that a slower machine of the class still lands within 0.8), else (and for a GPU
    run) 0.8."""
    return "<= 0.75" if "AVX512_BF16" in features and not gpu else "<= 0.8"


def ratios(runs: dict[str, list[dict]], chosen: str, hf_dtype: str, target: str) -> list[Ratio]:
    """The issue's targets against transformers' fastest dtype (``target`` on encode and prefill), and the
    precision comparison."""
    pkg, hf, other = runs["package"], runs["transformers"], runs["package_other"]
    name = f"package {chosen.upper()} / transformers {hf_dtype}"
    other_name = "bf16" if chosen == "f16" else "f16"
    return [
        ratio(f"image encode ms, cold (first picture of the process), {name}", col(pkg, "encode_ms"),
              col(hf, "encode_ms"), target),
        ratio(f"prefill ms (image + text tokens), {name}", col(pkg, "prefill_ms"), col(hf, "prefill_ms"), target),
        ratio(f"decode tok/s, {name}", col(pkg, "decode_tok_s"), col(hf, "decode_tok_s"), ">= 2",
              higher_is_better=True),
        ratio(f"image encode ms, package {other_name.upper()} / {chosen.upper()}", col(other, "encode_ms"),
              col(pkg, "encode_ms")),
        ratio(f"prefill ms, package {other_name.upper()} / {chosen.upper()}", col(other, "prefill_ms"),
              col(pkg, "prefill_ms")),
        ratio(f"image encode ms, warm (second picture), {name}", col(pkg, "second_encode_ms"),
              col(hf, "second_encode_ms"), target),
        ratio(f"prefill ms, warm (second picture), {name}", col(pkg, "second_prefill_ms"),
              col(hf, "second_prefill_ms"), target),
    ]


def absolutes(runs: dict[str, list[dict]], probes: list[dict], chosen: str, hf_dtype: str) -> list[tuple]:
    """Medians behind the ratios."""
    other = "bf16" if chosen == "f16" else "f16"
    rows = []
    for label, key in ((f"package {chosen.upper()}", "package"), (f"package {other.upper()}", "package_other"),
                       (f"transformers {hf_dtype}", "transformers")):
        rows += [(f"{label} image encode", "ms", summary(col(runs[key], "encode_ms"))),
                 (f"{label} prefill", "ms", summary(col(runs[key], "prefill_ms"))),
                 (f"{label} decode", "tok/s", summary(col(runs[key], "decode_tok_s")))]
        if key != "package_other":
            rows += [(f"{label} second image: encode", "ms", summary(col(runs[key], "second_encode_ms"))),
                     (f"{label} second image: prefill", "ms", summary(col(runs[key], "second_prefill_ms")))]
    for p in probes:
        rows.append((f"transformers {p['dtype']} probe encode + prefill", "ms",
                     summary([p["encode_ms"] + p["prefill_ms"]])))
    return rows


def main() -> None:
    """Build the model, probe, measure, write results/<date>-<host>-<cpu>-first-image[-quick].json + .png."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small text model and image, 2 pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pairs", type=int, help="override the number of pairs")
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH, help="models go here")
    ap.add_argument("--isa", choices=sorted(ISAS), help="limit both sides to this CPU class (see the module doc)")
    ap.add_argument("--gpu", action="store_true",
                    help="a GPU build of the package, every layer offloaded, against transformers on CUDA")
    args = ap.parse_args()
    if args.gpu and args.isa:
        ap.error("--gpu and --isa measure different things; give one")
    if args.gpu and not set(glm4v_mtmd.engine_info()["backends"]) - {"CPU", "RPC"}:
        sys.exit("--gpu: this build of the package has no GPU backend (build it with CMAKE_ARGS=-DGGML_CUDA=on)")
    plan = QUICK if args.quick else FULL
    if args.pairs:
        plan = Plan(**{**asdict(plan), "pairs": args.pairs})

    envs: dict[str, dict[str, str]] = {}
    if args.isa:
        envs = {"package": {"GLM4V_MTMD_PACKAGE_DIR": str(isa_package(args.isa, args.scratch))},
                "transformers": ISAS[args.isa]["torch"]}
        info = run_worker("package_info", {}, envs["package"])
        if any(f.startswith("AVX512") or f.startswith("AMX") for f in info["cpu_features"]):
            sys.exit(f"the --isa {args.isa} build still uses {info['cpu_features']}")
        features, chosen = info["cpu_features"], info["preferred_float_type"]
    else:
        features, chosen = sorted(glm4v_mtmd.cpu_features()), glm4v_mtmd.preferred_float_type()
    print(f"engine CPU features: {' '.join(features)}; preferred precision: {chosen}", file=sys.stderr)
    files = build(plan.preset, args.scratch / "models", ["f16", "bf16"])
    w, h = plan.image_size
    image = str(make_image(plan.image_size, args.scratch / f"bench-{w}x{h}.png"))
    device = "cuda" if args.gpu else "cpu"
    hf_dtype, probes = probe_transformers(files["hf_dir"][0], image, args.threads, envs.get("transformers"), device)
    runs = measure(plan, files, image, args.threads, hf_dtype, chosen, envs, gpu=args.gpu)

    result = ratios(runs, chosen, hf_dtype, time_target(features, args.gpu))
    table = absolutes(runs, probes, chosen, hf_dtype)
    mode = ("quick" if args.quick else "full") + ("-gpu" if args.gpu else "")
    data = {
        "mode": mode, "plan": asdict(plan), "machine": machine(args.threads), "cpu_features": features,
        "gpu": runs["transformers"][0]["ran"]["device"] if args.gpu else None,
        "isa": args.isa, "isa_settings": ISAS.get(args.isa or ""),
        "preferred_float_type": chosen, "transformers_fastest_dtype": hf_dtype, "transformers_probes": probes,
        "runs": runs,
    }
    save_results(HERE / "results", "-first-image" + ("-quick" if args.quick else "") + ("-gpu" if args.gpu else ""),
                 data, result, table,
                 f"first image - {mode} - {data['gpu'] or args.isa or data['machine']['cpu'][:40]} - {chosen}",
                 cpu=args.isa or (re.sub(r"[^a-z0-9]+", "-", data["gpu"].lower()).strip("-") if args.gpu else None))

if __name__ == "__main__":
    main()
