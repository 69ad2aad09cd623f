"""Decode-only A/B: ``llama-mtmd-cli`` against ``Session.generate``, many alternating pairs.

``run.py``'s full mode measures decode in 3-5 rounds of ~3 minutes each; on a noisy machine that
median moves by more than the 3 % the decode target allows. This runs only the decode: the 1 B
text model (Q4_K_M), the quick preset's projector and a 112x112 image (a few image tokens, so the
encode is short), 256 greedy tokens with EOS ignored, each run in a fresh process, CLI and package
alternating (``run.py``'s rounds with the ``decode`` worker). Prints the median / min / max of the
per-pair ratios and the ratio of the mean rates; writes the pairs to
``bench/results/<date>-<host>-<cpu>-decode-ab.json``.

    python bench/decode_ab.py --pairs 20     # ~15 minutes on 2 cores (after run.py has built the models)
    python bench/decode_ab.py --pairs 8 --prompt-repeats 23    # decode after a ~1,000-token prompt

``--prompt-repeats N`` repeats the question N times, so the decode attends over a KV cache about as
long as after run.py's 1024x768 image (~1,000 tokens) without paying that image's encode each run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from dataclasses import asdict

from cli_target import RunSpec, build_cli, cli_build_dir
from PIL import Image
from report import ratio, result_stem
from run import HERE, SCRATCH, col, interleaved

import glm4v_mtmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH)
    ap.add_argument("--prompt-repeats", type=int, default=1, help="repeat the question to lengthen the KV cache")
    args = ap.parse_args()
    models = args.scratch / "models" / "gguf"
    image = args.scratch / "bench-112x112.png"
    Image.open(glm4v_mtmd.sample_image()).convert("RGB").resize((112, 112)).save(image)
    spec = RunSpec(str(models / "glm4v-bench-1b-Q4_K_M.gguf"), str(models / "mmproj-glm4v-bench-quick-F16.gguf"),
                   str(image), " ".join(["Describe this picture: its objects and colours."] * args.prompt_repeats),
                   256, 4096, args.threads)
    runs = interleaved(build_cli(cli_build_dir(args.scratch)), spec, args.pairs, False, package_kind="decode")
    cli, pkg = col(runs["cli"], "decode_tok_s"), col(runs["package"], "decode_tok_s")
    r = ratio("decode tok/s, package / CLI", pkg, cli, higher_is_better=True)
    result = {"median": r.median, "min": r.low, "max": r.high,
              "ratio_of_means": statistics.mean(pkg) / statistics.mean(cli)}
    print("pairs", len(pkg), result)
    suffix = "" if args.prompt_repeats == 1 else f"-x{args.prompt_repeats}"
    out = HERE / "results" / f"{result_stem('-decode-ab' + suffix)}.json"
    out.write_text(json.dumps({"what": "decode tok/s, Session.generate / llama-mtmd-cli, alternating fresh processes",
                               "spec": asdict(spec), "engine": glm4v_mtmd.engine_info()["engine_commit"],
                               "prompt_tokens": runs["package"][0]["prompt_tokens"],
                               "package_over_cli": result,
                               "pairs": [{"cli": c, "pkg": p} for c, p in zip(cli, pkg)]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
