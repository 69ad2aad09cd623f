"""Measurements that run in their own process (so each side's peak RSS is its own).

``python workers.py KIND SPEC_JSON`` (``package``, ``transformers``, ``first_image_package``,
``first_image_transformers``) prints one JSON object on the last line of stdout. ``run.py`` and
``first_image.py`` start them; they are not a public API.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

PREFIX = "[gMASK]<sop><|user|>\n"
SUFFIX = "<|assistant|>\n"
FIRST_QUESTION = "What is in this picture?"
FOLLOW_UP = "And what colour is the sky?"
_BUFFER = re.compile(r"compute buffer size\s*=\s*([\d.]+) MiB")


class _Collect(logging.Handler):
    """Keeps the engine's log lines (it reports its buffer sizes there, at DEBUG level)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _perturbed(image: Image.Image, seed: int) -> Image.Image:
    """A copy of ``image`` with one pixel changed: new content, so the embedding cache misses."""
    arr = np.array(image)
    arr[0, 0] = (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)
    return Image.fromarray(arr)


def _timed_generate(session: Any, parts: list[Any], max_tokens: int) -> tuple[Any, float]:
    from glm4v_mtmd import GenerationConfig

    config = GenerationConfig(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    result = session.generate(parts, config)
    return result, time.perf_counter() - t0


def _follow_up(session: Any, image: Image.Image, seed: int) -> dict[str, float]:
    """Time to first token of a first question about a new image and of a follow-up about it."""
    session.reset()
    img = _perturbed(image, seed)
    first, t_first = _timed_generate(session, [PREFIX, img, FIRST_QUESTION + SUFFIX], 1)
    history = FIRST_QUESTION + SUFFIX + first.text + "<|user|>\n" + FOLLOW_UP + SUFFIX
    _, t_follow = _timed_generate(session, [PREFIX, img, history], 1)
    return {"ttft_first_ms": 1000 * t_first, "ttft_follow_up_ms": 1000 * t_follow,
            "follow_up_reused_cells": session.last_reused}


def package(spec: dict[str, Any]) -> dict[str, Any]:
    """One run of glm4v_mtmd: the CLI's request, then the follow-up-question measurement."""
    from glm4v_mtmd import Session

    collect = _Collect()
    logger = logging.getLogger("glm4v_mtmd")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(collect)
    image = Image.open(spec["image"]).convert("RGB")
    t0 = time.perf_counter()
    with Session(spec["model"], spec["mmproj"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"]) as s:
        load_s = time.perf_counter() - t0
        result, _ = _timed_generate(s, [PREFIX, image, spec["text"] + SUFFIX], spec["n_tokens"])
        t = result.timings
        out = {"load_s": load_s, "encode_ms": t.encode_ms, "prompt_ms": t.prompt_ms,
               "prompt_tokens": t.prompt_tokens, "decode_ms": t.decode_ms,
               "generated_tokens": t.generated_tokens, "decode_tok_s": t.decode_tokens_per_s,
               **_follow_up(s, image, spec.get("seed", 0))}
    out["compute_buffers_mib"] = sum(float(m) for line in collect.lines for m in _BUFFER.findall(line))
    return out


def _hf_decode(model: Any, tokenizer: Any, n_tokens: int) -> float:
    """Greedy decode tokens/s of a text prompt: (N - 1) / (time(N tokens) - time(1 token))."""
    import torch

    ids = tokenizer(PREFIX + FIRST_QUESTION + SUFFIX, return_tensors="pt").input_ids

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    gen(2)  # warm-up
    t1, tn = gen(1), gen(n_tokens)
    return (n_tokens - 1) / (tn - t1)


def _hf_image_features(model: Any, image_path: str, dtype: Any) -> float:
    """Milliseconds of ``get_image_features`` on the processor's pixel values (second of two calls)."""
    import torch

    import glm4v_mtmd

    pre = glm4v_mtmd.preprocess(image_path)
    pixels = torch.from_numpy(pre.pixel_values).to(dtype)
    grid = torch.tensor([pre.grid])
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        times.append(time.perf_counter() - t0)
    return 1000 * times[-1]


def transformers_(spec: dict[str, Any]) -> dict[str, Any]:
    """Reference numbers from transformers (torch CPU) for one dtype."""
    import torch
    import transformers

    torch.set_num_threads(spec["n_threads"])
    dtype = getattr(torch, spec["dtype"])
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_dir"])
    return {"dtype": spec["dtype"], "image_features_ms": _hf_image_features(model, spec["image"], dtype),
            "decode_tok_s": _hf_decode(model, tokenizer, spec["n_tokens"]),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def first_image_package(spec: dict[str, Any]) -> dict[str, Any]:
    """First encounter with an image: encode, prefill (image + text tokens) and decode, one request."""
    from glm4v_mtmd import Session

    image = _perturbed(Image.open(spec["image"]).convert("RGB"), spec.get("seed", 0))
    with Session(spec["model"], spec["mmproj"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"]) as s:
        result, _ = _timed_generate(s, [PREFIX, image, spec["text"] + SUFFIX], spec["n_tokens"])
    t = result.timings
    return {"encode_ms": t.encode_ms, "prefill_ms": t.prompt_ms, "prompt_tokens": t.prompt_tokens,
            "decode_tok_s": t.decode_tokens_per_s, "generated_tokens": t.generated_tokens}


def _hf_prompt(tokenizer: Any, n_image_tokens: int, text: str) -> dict[str, Any]:
    """The processor's input ids for PREFIX, one image of ``n_image_tokens``, ``text``, SUFFIX."""
    import torch

    prompt = (PREFIX + "<|begin_of_image|>" + "<|image|>" * n_image_tokens + "<|end_of_image|>"
              + text + SUFFIX)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == image_id).int()}


def first_image_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' side of ``first_image_package``: ``get_image_features``, then the language model
    over the whole prompt with those features (``mm_encoder_outputs``: no second encode), then decode."""
    import torch
    import transformers

    import glm4v_mtmd

    torch.set_num_threads(spec["n_threads"])
    dtype = getattr(torch, spec["dtype"])
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_dir"])
    pre = glm4v_mtmd.preprocess(spec["image"])
    pixels, grid = torch.from_numpy(pre.pixel_values).to(dtype), torch.tensor([pre.grid])
    inputs = _hf_prompt(tokenizer, pre.n_tokens, spec["text"])
    with torch.inference_mode():
        if spec.get("warmup", True):  # one small call: lazy initialisation is not charged to the image
            model.get_image_features(pixel_values=pixels[:64], image_grid_thw=torch.tensor([[1, 8, 8]]))
        t0 = time.perf_counter()
        features = model.model.get_image_features(pixels, grid, return_dict=True)
        t1 = time.perf_counter()
        model(**inputs, image_grid_thw=grid, mm_encoder_outputs={"image": features}, logits_to_keep=1)
        t2 = time.perf_counter()
    out = {"dtype": spec["dtype"], "encode_ms": 1000 * (t1 - t0), "prefill_ms": 1000 * (t2 - t1),
           "prompt_tokens": int(inputs["input_ids"].shape[1]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    if spec.get("n_tokens"):
        out["decode_tok_s"] = _hf_decode(model, tokenizer, spec["n_tokens"])
    return out


KINDS = {"package": package, "transformers": transformers_, "first_image_package": first_image_package,
         "first_image_transformers": first_image_transformers}


def main() -> None:
    """``workers.py KIND SPEC_JSON`` with KIND one of :data:`KINDS`."""
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(KINDS[kind](spec)))


if __name__ == "__main__":
    main()
