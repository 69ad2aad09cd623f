"""Measurements that run in their own process (so each side's peak RSS is its own).

``python workers.py KIND SPEC_JSON`` (``package``, ``decode``, ``transformers``, ``llama_cpp_python``, ``video_*``,
``stream_llama_cpp_python``, ``first_image_package``, ``first_image_transformers``) prints one JSON
object on the last line of stdout. ``run.py``, ``decode_ab.py``, ``stream.py`` and
``first_image.py`` start them; they are not a public API.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

# A package built for another CPU class (first_image.py --isa) is imported instead of the installed
# one: its directory goes first on the path, and a development install's editable finder, which
# would still win, is dropped.
_PACKAGE_DIR = os.environ.get("GLM4V_MTMD_PACKAGE_DIR")
if _PACKAGE_DIR:
    sys.path.insert(0, _PACKAGE_DIR)
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]

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


def _streamed(chunks: Any, t0: float) -> tuple[float, float]:
    """(time to the first chunk, wall-clock decode tokens/s between the first and last chunk) of a
    stream yielding one chunk per token; the rate counts the forward passes in that span."""
    stamps = [time.perf_counter() for _ in chunks]
    n = len(stamps)
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else 0.0
    return stamps[0] - t0, rate


def _follow_up(session: Any, image: Image.Image, seed: int, n_tokens: int) -> dict[str, float]:
    """Time to first token of a first question about a new image and of a follow-up about it; the
    follow-up's answer is streamed for ``n_tokens`` tokens (wall-clock decode rate as a user sees it)."""
    from glm4v_mtmd import GenerationConfig

    session.reset()
    img = _perturbed(image, seed)
    first, t_first = _timed_generate(session, [PREFIX, img, FIRST_QUESTION + SUFFIX], 1)
    history = FIRST_QUESTION + SUFFIX + first.text + "<|user|>\n" + FOLLOW_UP + SUFFIX
    config = GenerationConfig(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, rate = _streamed(session.stream([PREFIX, img, history], config), t0)
    return {"ttft_first_ms": 1000 * t_first, "ttft_follow_up_ms": 1000 * ttft,
            "second_encode_ms": first.timings.encode_ms,  # a second picture of the process ("warm")
            "follow_up_reused_cells": session.last_reused, "decode_stream_tok_s": rate}


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
        out = {"load_s": load_s, "preprocess_ms": t.preprocess_ms, "encode_ms": t.encode_ms, "prompt_ms": t.prompt_ms,
               "prompt_tokens": t.prompt_tokens, "decode_ms": t.decode_ms,
               "generated_tokens": t.generated_tokens, "decode_tok_s": t.decode_tokens_per_s,
               **_follow_up(s, image, spec.get("seed", 0), spec["n_tokens"])}
    out["compute_buffers_mib"] = sum(float(m) for line in collect.lines for m in _BUFFER.findall(line))
    return out


def decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Only the CLI's request through ``Session.generate``: its decode rate (``decode_ab.py``)."""
    from glm4v_mtmd import Session

    image = Image.open(spec["image"]).convert("RGB")
    with Session(spec["model"], spec["mmproj"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"]) as s:
        result, _ = _timed_generate(s, [PREFIX, image, spec["text"] + SUFFIX], spec["n_tokens"])
    t = result.timings
    return {"decode_tok_s": t.decode_tokens_per_s, "generated_tokens": t.generated_tokens,
            "prompt_tokens": t.prompt_tokens}


# llama-cpp-python's multimodal chat handler with GLM-4.xV's prompt format (the same text as PREFIX /
# SUFFIX above; the handler puts mtmd's image marker where the image URL is).
_GLM_CHAT_FORMAT = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image_url' %}{{ c.image_url.url }}{% else %}{{ c.text }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}<|assistant|>\n"
)


def _banned_tokens(llm: Any) -> dict[int, float]:
    """A -inf logit bias for llama-cpp-python (a per-token Python callback there) on end-of-generation
    tokens (the package side ignores EOS in C), on tokens without text (so that every token streams
    one chunk) and on tokens that are not valid UTF-8 on their own. With random weights most of the
    byte-level vocabulary is not, and llama-cpp-python's stream then re-detokenizes the undecodable
    tail on every token (quadratic: 25,579 detokenize calls for 256 tokens of the tiny model), which
    would measure random bytes rather than text."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def allowed(i: int) -> bool:
        try:
            text = llm.detokenize([i]).decode("utf-8")
        except UnicodeDecodeError:
            return False
        return bool(text) and not llama_cpp.llama_vocab_is_eog(vocab, i)

    return {i: float("-inf") for i in range(llm.n_vocab()) if not allowed(i)}


def llama_cpp_python(spec: dict[str, Any]) -> dict[str, Any]:
    """The package worker's TTFT and decode measurements through llama-cpp-python
    (``Llava15ChatHandler``, its generic mtmd handler, with the GLM prompt format): a first question
    about the image streamed for ``n_tokens`` tokens (time to first token, wall-clock decode rate),
    then a follow-up question about the same image, with :func:`_banned_tokens`; the projector is
    loaded before the clock starts, as the package's Session does."""
    import base64

    import llama_cpp
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class GlmChatHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = _GLM_CHAT_FORMAT

    with open(spec["image"], "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    t0 = time.perf_counter()
    handler = GlmChatHandler(clip_model_path=spec["mmproj"], verbose=False)
    llm = llama_cpp.Llama(spec["model"], chat_handler=handler, n_ctx=spec["n_ctx"], n_batch=2048,
                          n_threads=spec["n_threads"], n_threads_batch=spec["n_threads"], flash_attn=True,
                          verbose=False)
    handler._init_mtmd_context(llm)  # otherwise the first chat call loads the projector
    load_s = time.perf_counter() - t0
    banned = _banned_tokens(llm)

    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": FIRST_QUESTION}]}
    pieces: list[str] = []

    def collect(chunks: Any) -> Any:  # one chunk per token: the role and finish chunks carry no content
        for chunk in chunks:
            if chunk["choices"][0]["delta"].get("content"):
                pieces.append(chunk["choices"][0]["delta"]["content"])
                yield chunk

    t0 = time.perf_counter()
    ttft, rate = _streamed(collect(llm.create_chat_completion(
        [first], max_tokens=spec["n_tokens"], temperature=0.0, logit_bias=banned, stream=True)), t0)
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    follow = [first, {"role": "assistant", "content": "".join(pieces)}, {"role": "user", "content": FOLLOW_UP}]
    t0 = time.perf_counter()
    llm.create_chat_completion(follow, max_tokens=1, temperature=0.0)
    t_follow = time.perf_counter() - t0
    return {"load_s": load_s, "ttft_first_ms": 1000 * ttft, "ttft_follow_up_ms": 1000 * t_follow,
            "decode_stream_tok_s": rate, "engine_decode_tok_s": 1000 * perf.n_eval / perf.t_eval_ms,
            "engine_decode_runs": perf.n_eval, "version": llama_cpp.__version__}


def stream_llama_cpp_python(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench/stream.py``'s measurement through llama-cpp-python: ``create_completion(stream=True)``
    of ``spec["prompt"]`` (the package's rendered chat prompt) with the same sampling and a stop
    string, wall-clock tokens/s against the engine's own prompt + decode time of the same run (its
    sampling time is not in that clock: the sampler chain is private to each call), with
    :func:`_banned_tokens`."""
    import llama_cpp

    llm = llama_cpp.Llama(spec["model"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"],
                          n_threads_batch=spec["n_threads"], flash_attn=True, verbose=False)
    banned = _banned_tokens(llm)
    runs = []
    for n in [64] + [n for n in spec["tokens"] for _ in range(spec["runs"])]:  # the first is a warm-up
        llm.reset()  # evaluate the prompt again, as the package's runs do after Session.reset()
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        start = time.perf_counter()
        for _ in llm.create_completion(spec["prompt"], max_tokens=n, temperature=1.0, top_k=0, top_p=1.0,
                                       min_p=0.0, repeat_penalty=1.0, seed=len(runs), stop=[spec["stop"]],
                                       logit_bias=banned, stream=True):
            pass
        wall = time.perf_counter() - start
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        engine_s = (perf.t_p_eval_ms + perf.t_eval_ms) / 1000
        runs.append({"tokens": n, "decoded": perf.n_eval, "wall_s": wall, "engine_s": engine_s,
                     "tok_s": n / wall, "engine_tok_s": n / engine_s,
                     "ratio": engine_s / wall, "overhead_us_per_token": (wall - engine_s) / n * 1e6})
    return {"version": llama_cpp.__version__, "runs": runs[1:], "tokens_biased_out": len(banned),
            "n_vocab": llm.n_vocab()}


def _sync(device: str) -> None:
    """Wait for the GPU's queued work, so a wall-clock timer covers it (no-op on the CPU)."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _hf_decode(model: Any, tokenizer: Any, n_tokens: int, device: str = "cpu") -> float:
    """Greedy decode tokens/s of a text prompt: (N - 1) / (time(N tokens) - time(1 token))."""
    import torch

    ids = tokenizer(PREFIX + FIRST_QUESTION + SUFFIX, return_tensors="pt").input_ids.to(device)

    def gen(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        _sync(device)
        return time.perf_counter() - t0

    gen(2)  # warm-up
    t1, tn = gen(1), gen(n_tokens)
    return (n_tokens - 1) / (tn - t1)


def _hf_image_features(model: Any, image_path: str, dtype: Any) -> tuple[float, float]:
    """Milliseconds of ``get_image_features`` on the processor's pixel values: the first full-size call
    of the process ("cold", after the same small warm-up call as first_image_transformers) and the
    second ("warm")."""
    import torch

    import glm4v_mtmd

    pre = glm4v_mtmd.preprocess(image_path)
    pixels = torch.from_numpy(pre.pixel_values).to(dtype)
    grid = torch.tensor([pre.grid])
    times = []
    with torch.inference_mode():
        model.get_image_features(pixel_values=pixels[:64], image_grid_thw=torch.tensor([[1, 8, 8]]))
        for _ in range(2):
            t0 = time.perf_counter()
            model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
            times.append(time.perf_counter() - t0)
    return 1000 * times[0], 1000 * times[1]


def transformers_(spec: dict[str, Any]) -> dict[str, Any]:
    """Reference numbers from transformers (torch CPU) for one dtype."""
    import torch
    import transformers

    torch.set_num_threads(spec["n_threads"])
    dtype = getattr(torch, spec["dtype"])
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_dir"])
    cold, warm = _hf_image_features(model, spec["image"], dtype)
    return {"dtype": spec["dtype"], "encode_ms": cold, "second_encode_ms": warm,
            "decode_tok_s": _hf_decode(model, tokenizer, spec["n_tokens"]),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def _package_ran() -> dict[str, Any]:
    """Which package and engine build this process ran, and the CPU features its engine uses."""
    import glm4v_mtmd

    info = glm4v_mtmd.engine_info()
    return {"package": os.path.dirname(glm4v_mtmd.__file__), "cpu_features": sorted(glm4v_mtmd.cpu_features()),
            "system_info": info["system_info"], "patches": info["patches"], "backends": info["backends"],
            "preferred_float_type": glm4v_mtmd.preferred_float_type()}


def package_info(spec: dict[str, Any]) -> dict[str, Any]:
    """What ``_package_ran`` records, alone (first_image.py asks it of an --isa build)."""
    return _package_ran()


def first_image_package(spec: dict[str, Any]) -> dict[str, Any]:
    """First encounter with an image: encode, prefill (image + text tokens) and decode, one request."""
    from glm4v_mtmd import Session

    source = Image.open(spec["image"]).convert("RGB")
    seed = spec.get("seed", 0)
    with Session(spec["model"], spec["mmproj"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"],
                 n_gpu_layers=spec.get("n_gpu_layers")) as s:
        result, _ = _timed_generate(s, [PREFIX, _perturbed(source, seed), spec["text"] + SUFFIX], spec["n_tokens"])
        t = result.timings
        out = {"preprocess_ms": t.preprocess_ms, "encode_ms": t.encode_ms, "prefill_ms": t.prompt_ms,
               "prompt_tokens": t.prompt_tokens, "decode_tok_s": t.decode_tokens_per_s,
               "generated_tokens": t.generated_tokens, "ran": _package_ran()}
        if spec.get("second_image"):
            # Another picture (one pixel differs: the embedding cache misses) in a new conversation
            # of the same session: a first encounter with that image, after the process's first.
            s.reset()
            second, _ = _timed_generate(s, [PREFIX, _perturbed(source, seed + 1000), spec["text"] + SUFFIX], 1)
            out |= {"second_encode_ms": second.timings.encode_ms, "second_prefill_ms": second.timings.prompt_ms}
    return out


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
    device = spec.get("device", "cpu")
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(spec["hf_dir"], dtype=dtype).eval().to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_dir"])
    pre = glm4v_mtmd.preprocess(spec["image"])
    pixels = torch.from_numpy(pre.pixel_values).to(device=device, dtype=dtype)
    grid = torch.tensor([pre.grid], device=device)
    inputs = {k: v.to(device) for k, v in _hf_prompt(tokenizer, pre.n_tokens, spec["text"]).items()}
    with torch.inference_mode():
        if spec.get("warmup", True):  # one small call: lazy initialisation is not charged to the image
            model.get_image_features(pixel_values=pixels[:64], image_grid_thw=torch.tensor([[1, 8, 8]], device=device))
    encode_ms, prefill_ms = _hf_encode_prefill(model, pixels, grid, inputs, device)
    out = {"dtype": spec["dtype"], "encode_ms": encode_ms, "prefill_ms": prefill_ms,
           "prompt_tokens": int(inputs["input_ids"].shape[1]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "ran": {"device": torch.cuda.get_device_name() if device != "cpu" else "cpu",
                   "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
                   "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                   "MKL_ENABLE_INSTRUCTIONS": os.environ.get("MKL_ENABLE_INSTRUCTIONS")}}
    if spec.get("n_tokens"):
        out["decode_tok_s"] = _hf_decode(model, tokenizer, spec["n_tokens"], device)
    if spec.get("second_image"):  # the same steps again in this process (transformers caches nothing)
        encode_ms, prefill_ms = _hf_encode_prefill(model, pixels, grid, inputs, device)
        out |= {"second_encode_ms": encode_ms, "second_prefill_ms": prefill_ms}
    return out


def _hf_encode_prefill(model: Any, pixels: Any, grid: Any, inputs: dict[str, Any],
                       device: str = "cpu") -> tuple[float, float]:
    """Milliseconds of ``get_image_features``, then of the language model over the prompt with those
    features (``mm_encoder_outputs``: no second encode)."""
    import torch

    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        features = model.model.get_image_features(pixels, grid, return_dict=True)
        _sync(device)
        t1 = time.perf_counter()
        model(**inputs, image_grid_thw=grid, mm_encoder_outputs={"image": features}, logits_to_keep=1)
        _sync(device)
        t2 = time.perf_counter()
    return 1000 * (t1 - t0), 1000 * (t2 - t1)


def make_clip(width: int, height: int, seconds: float, fps: float) -> np.ndarray:
    """A synthetic clip: the package's sample picture at ``width`` x ``height``, panning a few pixels per frame."""
    import glm4v_mtmd

    base = np.asarray(Image.open(glm4v_mtmd.sample_image()).convert("RGB").resize((width + 64, height), Image.BICUBIC))
    n = int(round(seconds * fps))
    return np.stack([base[:, (k * 64) // max(n - 1, 1):][:, :width] for k in range(n)])


VIDEO_QUESTION = "What happens in this video?"


def video_package(spec: dict[str, Any]) -> dict[str, Any]:
    """A first question about a clip: preprocess (sample, size, resize), encode every frame pair, prefill."""
    from glm4v_mtmd import GenerationConfig, Session
    from glm4v_mtmd._prompt import CallStats

    clip = make_clip(spec["width"], spec["height"], spec["seconds"], spec["source_fps"])
    clip[0, 0, 0] = spec.get("seed", 0) % 256  # new content: the embedding cache misses
    with Session(spec["model"], spec["mmproj"], n_ctx=spec["n_ctx"], n_threads=spec["n_threads"]) as s:
        stats = CallStats()  # the engine's own encode time, as chat() reports it in timings.encode_ms
        t0 = time.perf_counter()
        video = s.model._encode_video(clip, stats, source_fps=spec["source_fps"])
        t1 = time.perf_counter()
        config = GenerationConfig(max_tokens=1, temperature=0.0, ignore_eos=True)
        result = s.generate([PREFIX, video, VIDEO_QUESTION + SUFFIX], config)
        t2 = time.perf_counter()
    encode_ms = stats.encode_ms
    return {"pairs": len(video.pairs), "tokens_per_pair": video.pairs[0].n_tokens,
            "resized": list(video.resized_size), "frames": len(video.frame_indices),
            "encode_ms": encode_ms, "encode_ms_per_pair": encode_ms / len(video.pairs),
            "preprocess_ms": 1000 * (t1 - t0) - encode_ms, "prefill_ms": result.timings.prompt_ms,
            "prompt_tokens": result.timings.prompt_tokens, "ttft_ms": 1000 * (t2 - t0)}


def video_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' side of ``video_package``: ``get_video_features`` on the processor's
    ``pixel_values_videos`` (made by glm4v_mtmd.preprocess_video, bit-exact to the processor, which
    needs torchvision; not timed here), then the language model over the prompt with those features."""
    import torch
    import transformers

    import glm4v_mtmd

    torch.set_num_threads(spec["n_threads"])
    dtype = getattr(torch, spec["dtype"])
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(spec["hf_dir"], dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["hf_dir"])
    clip = make_clip(spec["width"], spec["height"], spec["seconds"], spec["source_fps"])
    pre = glm4v_mtmd.preprocess_video(clip, source_fps=spec["source_fps"], variant=spec["variant"])
    pixels, grid = torch.from_numpy(pre.pixel_values).to(dtype), torch.tensor([pre.grid])
    prompt = (PREFIX + "<|begin_of_video|>" + pre.placeholder_text() + "<|end_of_video|>" + VIDEO_QUESTION + SUFFIX)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    # every <|image|> here is inside the video: token type 2 (processing_glm4v.create_mm_token_type_ids)
    video_types = (ids == image_id).int() * 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": video_types}
    with torch.inference_mode():
        model.get_image_features(pixel_values=pixels[:64], image_grid_thw=torch.tensor([[1, 8, 8]]))  # warm-up
        t0 = time.perf_counter()
        features = model.model.get_video_features(pixels, grid, return_dict=True)
        t1 = time.perf_counter()
        model(**inputs, video_grid_thw=grid, mm_encoder_outputs={"video": features}, logits_to_keep=1)
        t2 = time.perf_counter()
    encode_ms = 1000 * (t1 - t0)
    return {"dtype": spec["dtype"], "pairs": pre.n_pairs, "tokens_per_pair": pre.tokens_per_pair,
            "encode_ms": encode_ms, "encode_ms_per_pair": encode_ms / pre.n_pairs, "prefill_ms": 1000 * (t2 - t1),
            "ttft_ms": encode_ms + 1000 * (t2 - t1), "prompt_tokens": int(ids.shape[1]),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


KINDS = {"package": package, "decode": decode, "transformers": transformers_, "llama_cpp_python": llama_cpp_python,
         "stream_llama_cpp_python": stream_llama_cpp_python, "first_image_package": first_image_package,
         "first_image_transformers": first_image_transformers, "video_package": video_package,
         "video_transformers": video_transformers, "package_info": package_info}


def main() -> None:
    """``workers.py KIND SPEC_JSON`` with KIND one of :data:`KINDS`."""
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(KINDS[kind](spec)))


if __name__ == "__main__":
    main()
