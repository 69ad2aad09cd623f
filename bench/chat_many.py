"""``Model.chat_many`` over N pictures with one question, against a loop of ``chat`` calls, same run.

The bench's quick F16 model (the real vision tower), N different crops of the package's sample picture,
one question, greedy, a fixed number of answer tokens. The image cache is emptied before each side, so
both encode every picture. Rounds alternate which side goes first. Writes
``bench/results/<date>-<host>-<cpu>-chat-many.json``.

    python bench/chat_many.py                 # 16 pictures, 32 tokens each, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

from make_model import build
from PIL import Image
from report import ratio, save_results, summary

import glm4v_mtmd
from glm4v_mtmd import GenerationConfig, Model

HERE = pathlib.Path(__file__).resolve().parent
SCRATCH = pathlib.Path(os.environ.get("GLM4V_BENCH_SCRATCH", pathlib.Path.home() / ".cache" / "glm4v-mtmd" / "bench"))


def pictures(n: int, side: int) -> list[Image.Image]:
    """``n`` different ``side`` x ``side`` crops of the sample picture."""
    with Image.open(glm4v_mtmd.sample_image()) as img:
        img = img.convert("RGB")
        w, h = img.size
        out = []
        for i in range(n):
            x = (i * 37) % max(1, w - side)
            y = (i * 23) % max(1, h - side)
            out.append(img.crop((x, y, x + side, y + side)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=16)
    ap.add_argument("--side", type=int, default=112)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    model_path, mmproj_path = build("quick", SCRATCH / "models", ["f16"])["f16"]
    config = GenerationConfig(max_tokens=args.tokens, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                              ignore_eos=True)
    question = {"type": "text", "text": "What is in this picture?"}
    convs = [[{"role": "user", "content": [{"type": "image", "image": p}, question]}]
             for p in pictures(args.pictures, args.side)]
    times: dict[str, list[float]] = {"loop": [], "chat_many": []}
    with Model(model_path, mmproj_path, n_ctx=1024, n_parallel=args.parallel, n_threads=args.threads,
               flash_attn=True) as model:
        # The bench checkpoint's template renders text only (llama-mtmd-cli's needs); the package's built-in
        # GLM-4.1V renderer places the image markers.
        model.chat_template = None
        for rnd in range(args.rounds):
            for side in (["loop", "chat_many"] if rnd % 2 == 0 else ["chat_many", "loop"]):
                model.image_cache.clear()
                t0 = time.perf_counter()
                if side == "loop":
                    with model.context() as ctx:
                        texts = [ctx.chat(c, config).text for c in convs]
                else:
                    texts_many = [r.text for r in model.chat_many(convs, config, progress=True)]
                times[side].append(time.perf_counter() - t0)
    # Report only: with F16 weights a batched step may sum in another order than a single one, which can move
    # a greedy choice on the random model (the exact-settings equality is a unit test).
    same = sum(a == b for a, b in zip(texts, texts_many)) / len(texts)
    ratios = [ratio("chat_many time / loop of chat", times["chat_many"], times["loop"], "<= 1.0")]
    table = [(f"{k}, {args.pictures} pictures", "s", summary(v)) for k, v in times.items()]
    data = {"benchmark": "chat_many", "settings": {**vars(args), "model": model_path}, "times_s": times,
            "answers_identical_to_the_loop": same,
            "engine": glm4v_mtmd.engine_info(), "cpu": sorted(glm4v_mtmd.cpu_features())}
    save_results(HERE / "results", "-chat-many", data, ratios, table, "chat_many against a loop of chat")


if __name__ == "__main__":
    main()
