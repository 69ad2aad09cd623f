"""A first question about a video clip: glm4v_mtmd against transformers' fastest dtype on this machine.

What a user waits for: the clip sampled, sized and resized (the processor's rules), every frame pair
through the vision tower, then the prefill of all the pairs' tokens and the question. Each side runs in a
fresh process, alternating (package, transformers, transformers, package, ...). transformers' video
processor needs torchvision, which cannot be installed beside the local CPU torch: its side gets the
processor's ``pixel_values_videos`` from ``glm4v_mtmd.preprocess_video`` (bit-exact to it, see
tests/test_video.py) untimed, so its time to first token is ``get_video_features`` + prefill only, while
the package's includes its preprocessing. Writes ``results/<date>-<host>-<cpu>-video[-quick].json``.

    python bench/video.py --quick   # 4 s of 854x480 at 30 fps: 5 pairs of 510 tokens, ~4-8 min
    python bench/video.py           # 10 s of 1280x720 at 30 fps: 10 pairs of 1196 tokens, ~60 min

Model: ``make_model.py --preset quick`` (the real GLM-4.1V vision tower, a small text model) at the precision
``glm4v_mtmd.preferred_float_type()`` picks for this CPU (BF16 with AVX512_BF16, else F16); the processor
variant is GLM-4.1V's (2 frames/s).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from dataclasses import asdict, dataclass

from make_model import build
from report import ratio, save_results, summary
from run import SCRATCH, col, machine, run_worker

import glm4v_mtmd

HERE = pathlib.Path(__file__).resolve().parent
HF_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class Plan:
    width: int
    height: int
    seconds: float
    pairs: int
    n_ctx: int


QUICK = Plan(854, 480, 4.0, 1, 4096)
FULL = Plan(1280, 720, 10.0, 2, 16384)
SOURCE_FPS = 30.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short 480p clip, one pair of runs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pairs", type=int, help="override the number of run pairs")
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH, help="models go here")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.pairs:
        plan = Plan(**{**asdict(plan), "pairs": args.pairs})
    precision = glm4v_mtmd.preferred_float_type()  # what from_pretrained picks on this CPU (bf16 or f16)
    files = build("quick", args.scratch / "models", [precision])
    model, mmproj = files[precision]
    clip = {"width": plan.width, "height": plan.height, "seconds": plan.seconds, "source_fps": SOURCE_FPS}
    # transformers' dtype: the faster on this very clip, one cold run each. A small clip is not enough: it
    # weighs the dtypes' first-call costs, which the real clip amortises (first_image.py saw float32 picked
    # on AMX from a small image although bfloat16 encodes the real one 3.5x faster).
    probes = []
    for dtype in HF_DTYPES:
        probes.append(run_worker("video_transformers", {"hf_dir": files["hf_dir"][0], "dtype": dtype,
                                                        "n_threads": args.threads, "variant": "glm4v", **clip}))
        print(f"  transformers {dtype} probe: {probes[-1]['ttft_ms']:.0f} ms", file=sys.stderr)
    hf_dtype = min(probes, key=lambda p: p["ttft_ms"])["dtype"]
    runs: dict[str, list[dict]] = {"package": [], "transformers": []}
    for i in range(plan.pairs):
        order = ("package", "transformers") if i % 2 == 0 else ("transformers", "package")
        for side in order:
            if side == "package":
                out = run_worker("video_package", {"model": model, "mmproj": mmproj, "n_ctx": plan.n_ctx,
                                                   "n_threads": args.threads, "seed": i, **clip})
            else:
                out = run_worker("video_transformers", {"hf_dir": files["hf_dir"][0], "dtype": hf_dtype,
                                                        "n_threads": args.threads, "variant": "glm4v", **clip})
            runs[side].append(out)
            print(f"  run {i + 1}/{plan.pairs} {side}: {out['pairs']} pairs, encode {out['encode_ms']:.0f} ms, "
                  f"ttft {out['ttft_ms']:.0f} ms", file=sys.stderr, flush=True)
    pkg, hf = runs["package"], runs["transformers"]
    name = f"package {precision.upper()} / transformers {hf_dtype}"
    result = [
        ratio(f"encode ms per frame pair, {name}", col(pkg, "encode_ms_per_pair"), col(hf, "encode_ms_per_pair"),
              "<= 0.8"),
        ratio(f"prefill ms (all pairs + question), {name}", col(pkg, "prefill_ms"), col(hf, "prefill_ms"), "<= 0.8"),
        ratio(f"time to first token ms (package incl. preprocessing), {name}", col(pkg, "ttft_ms"),
              col(hf, "ttft_ms"), "<= 0.8"),
    ]
    table = [(f"package {k}", "ms", summary(col(pkg, k))) for k in ("preprocess_ms", "encode_ms_per_pair",
                                                                    "prefill_ms", "ttft_ms")]
    table += [(f"transformers {hf_dtype} {k}", "ms", summary(col(hf, k))) for k in ("encode_ms_per_pair",
                                                                                   "prefill_ms", "ttft_ms")]
    mode = "quick" if args.quick else "full"
    data = {"mode": mode, "plan": asdict(plan), "machine": machine(args.threads),
            "cpu_features": sorted(glm4v_mtmd.cpu_features()), "preferred_float_type": precision,
            "transformers_fastest_dtype": hf_dtype,
            "transformers_probes": probes, "runs": runs}
    save_results(HERE / "results", "-video" + ("-quick" if args.quick else ""), data, result, table,
                 f"video - {mode} - {data['machine']['cpu'][:40]}")


if __name__ == "__main__":
    main()
