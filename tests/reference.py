"""Reference numbers from Hugging Face transformers for GLM-4.xV checkpoints (tiny test models or real ones).

Everything runs in float32 on the CPU.  Inputs are built exactly like `Glm4vProcessor` would build them, but
without it: `AutoProcessor` needs torchvision (for the video processor), so the PIL image processor
(`Glm4vImageProcessorPil`) is used directly and the image placeholders are expanded by hand.

The llama.cpp reference converter can be run on a checkpoint with `run_reference_converter`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Union

import numpy as np

LLAMA_CPP_DIR_ENV = "GLM4V_LLAMA_CPP_DIR"

Part = Union[str, np.ndarray]

# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def load_reference(hf_dir: str | os.PathLike) -> tuple[Any, Any]:
    """Load (model, tokenizer) from `hf_dir`: float32, eval mode, eager attention (no SDPA kernels)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers import Glm4vForConditionalGeneration as Dense
    from transformers import Glm4vMoeForConditionalGeneration as Moe

    config = AutoConfig.from_pretrained(hf_dir)
    cls = Moe if config.model_type == "glm4v_moe" else Dense
    model = cls.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return model, tokenizer


def load_image_processor(hf_dir: str | os.PathLike) -> Any:
    """The PIL Glm4v image processor of `hf_dir` (preprocessor_config.json); needs no torchvision."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil.from_pretrained(hf_dir)


def _resolve(hf_dir_or_tokenizer: Any) -> tuple[Any, Any]:
    """(tokenizer, image processor) from a checkpoint dir, or from a tokenizer that remembers its dir."""
    from transformers import AutoTokenizer

    if isinstance(hf_dir_or_tokenizer, (str, os.PathLike)):
        hf_dir = hf_dir_or_tokenizer
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    else:
        tokenizer = hf_dir_or_tokenizer
        hf_dir = tokenizer.name_or_path
    return tokenizer, load_image_processor(hf_dir)


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------


def preprocess_images(image_processor: Any, images: Sequence[np.ndarray]) -> tuple[Any, Any]:
    """pixel_values [n_patches, 3*2*14*14] and image_grid_thw [n_images, 3] as torch tensors.

    Glm4vImageProcessorPil.preprocess: smart_resize (a no-op for sides that are multiples of 28 and a token
    count inside [min_pixels, max_pixels]), bicubic resize, rescale 1/255, CLIP mean/std, 2 temporal copies,
    patches in 2x2 merge-block order.
    """
    for img in images:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"images must be HxWx3 uint8 arrays, got {img.dtype} {img.shape}")
    out = image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _expand_text(parts: Sequence[Part], grid_thw: Any, merge_size: int) -> str:
    """The prompt string after Glm4vProcessor's placeholder expansion: each image becomes <|begin_of_image|> +
    N x <|image|> + <|end_of_image|>, N = t*h*w / merge**2 (Glm4vProcessor.replace_image_token, applied to the
    chat template's `<|begin_of_image|><|image|><|end_of_image|>`)."""
    pieces, k = [], 0
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
            continue
        n_tokens = int(grid_thw[k].prod()) // (merge_size**2)
        pieces.append("<|begin_of_image|>" + "<|image|>" * n_tokens + "<|end_of_image|>")
        k += 1
    return "".join(pieces)


def _mm_token_type_ids(input_ids: Any, image_token_id: int, video_start: int, video_end: int) -> Any:
    """Glm4vProcessor.create_mm_token_type_ids: 1 for <|image|> outside a video, 2 inside one, 0 otherwise."""
    import torch

    ids = input_ids
    in_video = torch.cumsum(ids == video_start, -1) > torch.cumsum(ids == video_end, -1)
    types = torch.zeros_like(ids)
    types[(ids == image_token_id) & in_video] = 2
    types[(ids == image_token_id) & ~in_video] = 1
    return types


def build_inputs(hf_dir_or_tokenizer: Any, parts: Sequence[Part]) -> dict[str, Any]:
    """Model inputs for a prompt given as text pieces and images (HxWx3 uint8 arrays) in order.

    Strings are used verbatim (special tokens such as "[gMASK]<sop><|user|>\\n" are parsed; no BOS is added).
    Returns a dict of torch tensors with a batch dimension of 1: input_ids, attention_mask, mm_token_type_ids
    (needed by transformers 5 to compute the M-RoPE positions) and, when there are images, pixel_values and
    image_grid_thw.  Also "text" (the expanded prompt string), "n_image_tokens" (list of int per image) and
    "image_sizes" ((height, width) after smart_resize, per image).  Images are resized exactly as the real
    processor does: a side that is a multiple of 28 is kept only if 2*h*w lies in [min_pixels, max_pixels]
    (12544 ... 9633792), i.e. the image has 8 ... 6144 merged tokens; smaller images are upscaled.
    """
    import torch

    tokenizer, image_processor = _resolve(hf_dir_or_tokenizer)
    images = [p for p in parts if not isinstance(p, str)]
    pixel_values = grid_thw = None
    if images:
        pixel_values, grid_thw = preprocess_images(image_processor, images)
    text = _expand_text(parts, grid_thw, image_processor.merge_size)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    token = tokenizer.convert_tokens_to_ids
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": _mm_token_type_ids(input_ids, token("<|image|>"), token("<|begin_of_video|>"),
                                                token("<|end_of_video|>")),
    }
    if images:
        inputs["pixel_values"] = pixel_values
        inputs["image_grid_thw"] = grid_thw
    inputs["text"] = text
    merge = image_processor.merge_size**2
    grids = [] if grid_thw is None else [[int(v) for v in g] for g in grid_thw]
    inputs["n_image_tokens"] = [t * h * w // merge for t, h, w in grids]
    # Size each image was resized to: differs from the input when smart_resize had to change it (e.g. a 56x56
    # image is below min_pixels = 12544 for 2 frames and becomes 84x84).
    patch = image_processor.patch_size
    inputs["image_sizes"] = [(h * patch, w * patch) for _, h, w in grids]
    return inputs


def _model_kwargs(inputs: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw")
    return {k: inputs[k] for k in keys if k in inputs}


# ------------------------------------------------------------------------------------------------------------
# F16 rounding of the convolutions (mirrors ggml)
# ------------------------------------------------------------------------------------------------------------


def _round_f16(x: Any) -> Any:
    import torch

    return x.to(torch.float16).to(x.dtype)


def _round_first_arg(_module: Any, args: tuple) -> tuple:
    return (_round_f16(args[0]), *args[1:])


@contextlib.contextmanager
def f16_convolutions(model: Any, enabled: bool = True) -> Iterator[None]:
    """Round the inputs and kernels of the Conv3d patch embed and of the downsample Conv2d to float16.

    ggml_conv_2d builds its im2col in F16 (unless the kernel is BF16), and ggml_mul_mat then converts the
    other operand (the kernel) to the F16 vec_dot type as well, so llama.cpp's glm4v graph sees both the
    pixels / the post-layernorm activations and the conv weights rounded to F16.  Biases are added in F32.
    """
    if not enabled:
        yield
        return
    import torch

    visual = model.model.visual
    convs = [visual.patch_embed.proj, visual.downsample]
    saved = [conv.weight.detach().clone() for conv in convs]
    hooks = [conv.register_forward_pre_hook(_round_first_arg) for conv in convs]
    try:
        with torch.no_grad():
            for conv in convs:
                conv.weight.copy_(_round_f16(conv.weight))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for conv, weight in zip(convs, saved):
                conv.weight.copy_(weight)


# ------------------------------------------------------------------------------------------------------------
# Reference numbers
# ------------------------------------------------------------------------------------------------------------


def reference_positions(model: Any, inputs: dict[str, Any]) -> np.ndarray:
    """M-RoPE positions as an int64 array [n_tokens, 3] of (t, h, w), from Glm4vModel.get_rope_index (which
    returns [3, batch, n]).  Text: t = h = w; image token (r, c): (st, st + r, st + c); text after an image
    resumes at st + max(grid_h, grid_w) / merge."""
    import torch

    with torch.no_grad():
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
        )
    return pos[:, 0, :].T.contiguous().numpy().astype(np.int64)


def next_position(model: Any, inputs: dict[str, Any]) -> int:
    """The position the first generated token gets (max over the prompt's positions + 1), like rope_deltas."""
    return int(reference_positions(model, inputs).max()) + 1


def reference_image_features(
    model: Any,
    image: np.ndarray,
    f16_conv: bool = True,
    image_processor: Any = None,
) -> np.ndarray:
    """Merged image embeddings (what replaces the <|image|> tokens) as float32 [n_tokens, text_hidden].

    Glm4vModel.get_image_features -> pooler_output of the vision tower (patch embed, ViT, downsample conv,
    merger).  f16_conv: round the two convolutions like ggml (see `f16_convolutions`; without it the
    features differ from llama.cpp's by ~2e-3 relative, with it by ~1e-4).  `image_processor` defaults to
    the one of the checkpoint the model was loaded from.
    """
    import torch

    processor = image_processor or load_image_processor(model.name_or_path)
    pixel_values, grid_thw = preprocess_images(processor, [image])
    with torch.no_grad(), f16_convolutions(model, f16_conv):
        out = model.model.get_image_features(pixel_values.float(), grid_thw, return_dict=True)
    return torch.cat(list(out.pooler_output), dim=0).float().numpy()


def _cache_kwarg(model: Any) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    """The KV cache of a forward's output, under either of transformers 5's names."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _prefill(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, int]:
    """Run the prompt once; returns (last logits [vocab], cache, next position).

    Positions are passed explicitly ([3, 1, n] from get_rope_index), so the cached decode below does not
    depend on transformers' rope_deltas bookkeeping.
    """
    import torch

    positions = torch.from_numpy(reference_positions(model, inputs).T.copy())[:, None, :]
    kwargs = _model_kwargs(inputs)
    out = model(**kwargs, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), _cache_of(out), int(positions.max()) + 1


def _decode_step(model: Any, token: int, cache: Any, position: int, n_past: int) -> tuple[Any, Any]:
    """Feed one token at (position, position, position); returns (logits [vocab], cache)."""
    import torch

    ids = torch.tensor([[token]], dtype=torch.long)
    pos = torch.full((3, 1, 1), position, dtype=torch.long)
    mask = torch.ones((1, n_past + 1), dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{_cache_kwarg(model): cache})
    return out.logits[0, -1].float(), _cache_of(out)


def reference_last_logits(model: Any, inputs: dict[str, Any], f16_conv: bool = True) -> np.ndarray:
    """Float32 logits [vocab] of the last prompt position (images included; f16_conv as for the features)."""
    import torch

    with torch.no_grad(), f16_convolutions(model, f16_conv):
        logits, _, _ = _prefill(model, inputs)
    return logits.numpy()


def last_logits_and_router_margin(model: Any, inputs: dict[str, Any]) -> tuple[np.ndarray, float]:
    """``reference_last_logits`` and, from the same run, the smallest routing margin over the prompt's
    tokens and every MoE layer (``inf`` for a dense model)."""
    with _router_margins(model) as margins:
        logits = reference_last_logits(model, inputs)
    return logits, min(margins, default=float("inf"))


@contextlib.contextmanager
def _router_margins(model: Any) -> Iterator[list[float]]:
    """While the block runs ``model``, collect each MoE layer's smallest routing margin over its tokens
    (the list stays empty for a dense model).

    A token's margin is the score of the last expert it is routed to minus the best expert it is not,
    with the router's own scores (sigmoid of the router logits plus ``e_score_correction_bias``). Where it
    is within numerical error, the engine may route the token elsewhere: a valid result, far from the
    reference's. Only single-group routing (``n_group == 1``, the tiny models') is covered.
    """
    import torch

    margins: list[float] = []

    def hook(router: Any, _args: Any, out: tuple[Any, Any, Any]) -> None:
        if router.num_group != 1:
            raise NotImplementedError("last_logits_and_router_margin covers n_group == 1 only")
        router_logits, _, indices = out
        scores = router_logits.float().sigmoid() + router.e_score_correction_bias
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
        last_in = scores.masked_fill(~chosen, float("inf")).min(dim=-1).values
        best_out = scores.masked_fill(chosen, float("-inf")).max(dim=-1).values
        margins.append(float((last_in - best_out).min()))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
    try:
        yield margins
    finally:
        for h in hooks:
            h.remove()


def top1_margin(logits: Any) -> float:
    """Difference between the largest and the second largest logit (how robust the argmax is)."""
    values = np.sort(np.asarray(logits, dtype=np.float64).ravel())
    return float(values[-1] - values[-2])


def reference_greedy_with_margins(
    model: Any, inputs: dict[str, Any], n: int = 32, f16_conv: bool = True
) -> tuple[list[int], list[float]]:
    """Greedy decode n tokens with EOS disabled (no stop at all); returns (ids, top-1 margins per step).

    A plain KV-cached argmax loop: no GenerationConfig, so no EOS stop and no min_new_tokens-style masking of
    the EOS logits; the generated tokens get text positions continuing from max(prompt positions) + 1.
    """
    import torch

    ids: list[int] = []
    margins: list[float] = []
    n_past = int(inputs["input_ids"].shape[1])
    with torch.no_grad(), f16_convolutions(model, f16_conv):
        logits, cache, position = _prefill(model, inputs)
        for step in range(n):
            token = int(torch.argmax(logits))
            ids.append(token)
            margins.append(top1_margin(logits.numpy()))
            if step + 1 < n:
                logits, cache = _decode_step(model, token, cache, position + step, n_past + step)
    return ids, margins


def reference_greedy(model: Any, inputs: dict[str, Any], n: int = 32, f16_conv: bool = True) -> list[int]:
    """Greedy decode n token ids with EOS disabled (see reference_greedy_with_margins)."""
    return reference_greedy_with_margins(model, inputs, n=n, f16_conv=f16_conv)[0]


# ------------------------------------------------------------------------------------------------------------
# llama.cpp reference converter
# ------------------------------------------------------------------------------------------------------------

# Runs convert_hf_to_gguf.py in-process after one monkeypatch: the BPE pre-tokenizer of a tiny tokenizer is
# not in llama.cpp's hash table (get_vocab_base_pre raises NotImplementedError), so report "glm4", the
# pre-tokenizer of every GLM-4.xV checkpoint.  Nothing in the tree is modified.  `conversion` is imported
# first, which puts the tree's gguf-py ahead of any installed gguf on sys.path, as convert_hf_to_gguf.py
# itself does.
_CONVERTER_RUNNER = r"""
import runpy, sys
llama_dir = sys.argv[1]
sys.path.insert(0, llama_dir)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
sys.argv = [llama_dir + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(llama_dir + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_cpp_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The llama.cpp tree with convert_hf_to_gguf.py: `path`, $GLM4V_LLAMA_CPP_DIR or the engine source
    the package was built from (its build extracts the reference converter next to the engine)."""
    if path is None and not os.environ.get(LLAMA_CPP_DIR_ENV):
        import glm4v_mtmd

        path = glm4v_mtmd.engine_info()["source_dir"]
    chosen = pathlib.Path(path or os.environ[LLAMA_CPP_DIR_ENV])
    if not (chosen / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"no convert_hf_to_gguf.py in {chosen}")
    return chosen


def _run_converter(tree: pathlib.Path, args: list[str], python: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    proc = subprocess.run([python, "-c", _CONVERTER_RUNNER, str(tree), *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def run_reference_converter(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    outtype: str = "f32",
    llama_cpp: str | os.PathLike | None = None,
    python: str | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Convert `hf_dir` with llama.cpp's own convert_hf_to_gguf.py; returns (text_gguf, mmproj_gguf).

    Two subprocess runs with `python` (default: this interpreter): the text model and `--mmproj`.  Files are
    out_dir/model-{outtype}.gguf and out_dir/mmproj-model-{outtype}.gguf.
    """
    tree = llama_cpp_dir(llama_cpp)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_gguf = out / f"model-{outtype}.gguf"
    mmproj_gguf = out / f"mmproj-model-{outtype}.gguf"
    python = python or sys.executable
    common = [str(hf_dir), "--outtype", outtype]
    _run_converter(tree, [*common, "--outfile", str(text_gguf)], python)
    _run_converter(tree, [*common, "--mmproj", "--outfile", str(mmproj_gguf)], python)
    return text_gguf, mmproj_gguf


__all__ = [
    "LLAMA_CPP_DIR_ENV",
    "build_inputs",
    "f16_convolutions",
    "llama_cpp_dir",
    "load_image_processor",
    "load_reference",
    "next_position",
    "preprocess_images",
    "reference_greedy",
    "reference_greedy_with_margins",
    "reference_image_features",
    "reference_last_logits",
    "reference_positions",
    "run_reference_converter",
    "top1_margin",
]


def reference_video_features(model: Any, pixel_values_videos: np.ndarray, grid_thw: tuple[int, int, int],
                             *, f16_conv: bool = True) -> list[np.ndarray]:
    """Glm4vModel.get_video_features: one ``[tokens, n_embd]`` array per frame pair (group).

    ``pixel_values_videos`` / ``grid_thw`` as the video processor makes them (``patchify``).
    """
    import torch

    pv = torch.from_numpy(np.ascontiguousarray(pixel_values_videos, dtype=np.float32))
    grid = torch.tensor([list(grid_thw)])
    with torch.no_grad(), f16_convolutions(model, f16_conv):
        out = model.model.get_video_features(pv, grid, return_dict=True)
    rows = torch.cat(list(out.pooler_output), dim=0).float().numpy()  # one entry per video: its pairs in order
    return np.split(rows, grid_thw[0])


def build_video_inputs(hf_dir: str | os.PathLike, before: str, frames: np.ndarray, frame_indices: Sequence[int],
                       fps: float, variant: str, after: str) -> dict[str, Any]:
    """Model inputs for ``before`` + one video + ``after``, the video given as its sampled frames already at
    their final size (uint8 ``[T, H, W, 3]``, sides multiples of 28, inside the processor's budget, so its
    resize leaves them untouched). The text between the markers is the processor's ``replace_video_token``;
    ``pixel_values_videos`` its fused normalise and ``patchify`` (tests/video_reference.py)."""
    import torch
    import video_reference

    tokenizer, _ = _resolve(hf_dir)
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)[None]  # (1, T, C, H, W)
    pixel_values, grid = video_reference.pixel_values(variant, video)
    text = (before + "<|begin_of_video|>" + video_reference.video_text(variant, grid, list(frame_indices), fps)
            + "<|end_of_video|>" + after)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    token = tokenizer.convert_tokens_to_ids
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": _mm_token_type_ids(input_ids, token("<|image|>"), token("<|begin_of_video|>"),
                                                token("<|end_of_video|>")),
        "pixel_values_videos": pixel_values,
        "video_grid_thw": torch.tensor([grid]),
        "text": text,
    }
