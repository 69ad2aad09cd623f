"""Decode-only A/B: ``llama-mtmd-cli`` against ``Session.generate``, many alternating pairs.

``run.py``'s full mode measures decode in 3-5 rounds of ~3 minutes each; on a noisy machine that
median moves by more than the 3 % the decode target allows. This runs only the decode: the 1 B
text model (Q4_K_M), the quick preset's projector and a 112x112 image (a few image tokens, so the
encode is short), 256 greedy tokens with EOS ignored, each run in a fresh process, CLI and package
alternating. Prints each pair and the median / min / max of the per-pair ratios and the ratio of
the mean rates; writes the pairs to ``bench/results/<date>-<host>-decode-ab.json``.

    python bench/decode_ab.py --pairs 20     # ~15 minutes on 2 cores (after run.py has built the models)
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import socket
import statistics
import subprocess
import sys
from dataclasses import asdict

from cli_target import RunSpec, build_cli, run_cli
from PIL import Image
from run import HERE, SCRATCH, read_through

import glm4v_mtmd

PACKAGE = r'''
import json, sys
from PIL import Image
from glm4v_mtmd import Session, GenerationConfig
s = json.loads(sys.argv[1])
with Session(s["model"], s["mmproj"], n_ctx=s["n_ctx"], n_threads=s["n_threads"]) as S:
    r = S.generate(["[gMASK]<sop><|user|>\n", Image.open(s["image"]).convert("RGB"), s["text"] + "<|assistant|>\n"],
                   GenerationConfig(max_tokens=s["n_tokens"], temperature=0.0, ignore_eos=True))
print(json.dumps({"decode_tok_s": r.timings.decode_tokens_per_s, "n": r.timings.generated_tokens}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scratch", type=pathlib.Path, default=SCRATCH)
    args = ap.parse_args()
    models = args.scratch / "models" / "gguf"
    image = args.scratch / "bench-112x112.png"
    Image.open(glm4v_mtmd.sample_image()).convert("RGB").resize((112, 112)).save(image)
    spec = RunSpec(str(models / "glm4v-bench-1b-Q4_K_M.gguf"), str(models / "mmproj-glm4v-bench-quick-F16.gguf"),
                   str(image), "Describe this picture: its objects and colours.", 256, 4096, args.threads)
    binary = build_cli(args.scratch / "cli-build")
    rows = []
    for i in range(args.pairs):
        pair = {}
        for side in (("cli", "pkg") if i % 2 == 0 else ("pkg", "cli")):
            read_through([spec.model, spec.mmproj])
            if side == "cli":
                pair[side] = run_cli(binary, spec)["decode_tok_s"]
            else:
                out = subprocess.run([sys.executable, "-c", PACKAGE, json.dumps(asdict(spec))],
                                     capture_output=True, text=True, check=True)
                pair[side] = json.loads(out.stdout.strip().splitlines()[-1])["decode_tok_s"]
        rows.append(pair)
        print(i, pair, pair["pkg"] / pair["cli"], flush=True)
    r = [p["pkg"] / p["cli"] for p in rows]
    result = {"median": statistics.median(r), "min": min(r), "max": max(r),
              "ratio_of_means": statistics.mean(p["pkg"] for p in rows) / statistics.mean(p["cli"] for p in rows)}
    print("pairs", len(r), result)
    out = HERE / "results" / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-decode-ab.json"
    out.write_text(json.dumps({"what": "decode tok/s, Session.generate / llama-mtmd-cli, alternating fresh processes",
                               "spec": asdict(spec), "engine": glm4v_mtmd.engine_info()["engine_commit"],
                               "package_over_cli": result, "pairs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
