"""Random-weight GLM-4.1V-shaped checkpoints written with numpy only (no torch, no hub).

Used by ``glm4v-mtmd selfcheck`` (a tiny model that exercises the whole pipeline offline) and by
the benchmarks (the real vision tower with a smaller text model). The files have the layout of a
Hugging Face ``Glm4vForConditionalGeneration`` checkpoint: ``config.json``, safetensors shards,
``tokenizer.json`` (a byte-level BPE: the 256 byte tokens, a few merges and the GLM special tokens),
``tokenizer_config.json`` and ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Union

import numpy as np

# GLM-4.1V added tokens in vocabulary order (the real ids start at 151329); the first 20 are special.
GLM_ADDED_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>", "<|image|>", "<|video|>", "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_transcription|>", "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>",
    "<|code_suffix|>", "/nothink", "<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>",
    "<|end_of_box|>",
)
_N_SPECIAL = 20
# The GLM-4 pre-tokenizer split (llama.cpp's `glm4` pre-tokenizer implements the same pattern).
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class RandomModelShape:
    """Dimensions of a random GLM-4.1V-style checkpoint (defaults: a tiny self-check model).

    ``real_vision()`` gives GLM-4.1V's actual vision tower; the text side scales with the
    ``text_*`` fields (GLM-4.1V: hidden 4096, 40 layers, 32/2 heads, FFN 13696).
    """

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_ffn: int = 96
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    merger_ffn: int = 80
    image_size: int = 56

    @classmethod
    def real_vision(cls, **text: int) -> RandomModelShape:
        """GLM-4.1V's vision tower (depth 24, hidden 1536, 12 heads, merger 4096->13696)."""
        base = dict(text_hidden=4096, text_layers=2, text_heads=32, text_kv_heads=2, text_ffn=13696,
                    vision_hidden=1536, vision_depth=24, vision_heads=12, merger_ffn=13696, image_size=336)
        base.update(text)
        return cls(**base)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# A few English merges: llama.cpp's BPE loader requires a merges list (byte tokens alone are refused).
_MERGES = (("t", "h"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("r", "e"), ("o", "n"), ("a", "t"),
           ("e", "n"), ("n", "d"), ("o", "u"), ("e", "s"), ("Ġ", "t"), ("Ġ", "a"), ("Ġ", "s"), ("Ġ", "w"))


def _token_ids() -> dict[str, int]:
    first = 256 + len(_MERGES)
    return {tok: first + i for i, tok in enumerate(GLM_ADDED_TOKENS)}


def _write_tokenizer(out: pathlib.Path) -> int:
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(_MERGES)})
    ids = _token_ids()
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": n < _N_SPECIAL}
        for n, (t, i) in enumerate(ids.items())
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in _MERGES]},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config = {
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 65536,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return 256 + len(_MERGES) + len(GLM_ADDED_TOKENS)


def _config(shape: RandomModelShape, vocab: int, dtype: str) -> dict:
    ids = _token_ids()
    head_dim = shape.text_hidden // shape.text_heads
    rot = head_dim // 2  # partial_rotary_factor 0.5; mrope_section sums to rot / 2 pairs
    pairs = rot // 2
    t = max(1, pairs // 4)
    h = (pairs - t) // 2
    section = [t, h, pairs - t - h]  # GLM-4.1V: [8, 12, 12] of 32 pairs
    if head_dim == 128:
        section = [8, 12, 12]
    return {
        "architectures": ["Glm4vForConditionalGeneration"],
        "model_type": "glm4v",
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "image_token_id": ids["<|image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "video_token_id": ids["<|video|>"],
        "torch_dtype": dtype,
        "text_config": {
            "model_type": "glm4v_text", "hidden_size": shape.text_hidden, "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads, "num_key_value_heads": shape.text_kv_heads,
            "intermediate_size": shape.text_ffn, "vocab_size": vocab, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 65536, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
            "rope_scaling": {"type": "default", "mrope_section": section}, "attention_bias": True,
            "hidden_act": "silu", "eos_token_id": [ids[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")],
            "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False, "torch_dtype": dtype,
        },
        "vision_config": {
            "model_type": "glm4v", "hidden_size": shape.vision_hidden, "depth": shape.vision_depth,
            "num_heads": shape.vision_heads, "intermediate_size": shape.merger_ffn,
            "out_hidden_size": shape.text_hidden, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "image_size": shape.image_size, "in_channels": 3, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "attention_bias": False,
        },
    }


def _tensors(shape: RandomModelShape, vocab: int) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor; kind is "weight", "norm" (around 1) or "bias"."""
    H, F, V = shape.text_hidden, shape.text_ffn, shape.vision_hidden
    O = H  # noqa: E741 - the projector output width (vision out_hidden_size) equals the text width
    hd = H // shape.text_heads
    q, kv = shape.text_heads * hd, shape.text_kv_heads * hd
    lm = "model.language_model"
    yield f"{lm}.embed_tokens.weight", (vocab, H), "weight"
    for i in range(shape.text_layers):
        p = f"{lm}.layers.{i}"
        for norm in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"):
            yield f"{p}.{norm}.weight", (H,), "norm"
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield f"{p}.self_attn.{name}.weight", (rows, H), "weight"
            yield f"{p}.self_attn.{name}.bias", (rows,), "bias"
        yield f"{p}.self_attn.o_proj.weight", (H, q), "weight"
        yield f"{p}.mlp.gate_up_proj.weight", (2 * F, H), "weight"
        yield f"{p}.mlp.down_proj.weight", (H, F), "weight"
    yield f"{lm}.norm.weight", (H,), "norm"
    yield "lm_head.weight", (vocab, H), "weight"
    vis = "model.visual"
    yield f"{vis}.patch_embed.proj.weight", (V, 3, 2, 14, 14), "weight"
    yield f"{vis}.patch_embed.proj.bias", (V,), "bias"
    yield f"{vis}.post_conv_layernorm.weight", (V,), "norm"
    yield f"{vis}.embeddings.position_embedding.weight", ((shape.image_size // 14) ** 2, V), "weight"
    for i in range(shape.vision_depth):
        b = f"{vis}.blocks.{i}"
        yield f"{b}.norm1.weight", (V,), "norm"
        yield f"{b}.norm2.weight", (V,), "norm"
        yield f"{b}.attn.qkv.weight", (3 * V, V), "weight"
        yield f"{b}.attn.proj.weight", (V, V), "weight"
        yield f"{b}.mlp.gate_proj.weight", (O, V), "weight"
        yield f"{b}.mlp.up_proj.weight", (O, V), "weight"
        yield f"{b}.mlp.down_proj.weight", (V, O), "weight"
    yield f"{vis}.post_layernorm.weight", (V,), "norm"
    yield f"{vis}.downsample.weight", (O, V, 2, 2), "weight"
    yield f"{vis}.downsample.bias", (O,), "bias"
    yield f"{vis}.merger.proj.weight", (O, O), "weight"
    yield f"{vis}.merger.post_projection_norm.weight", (O,), "norm"
    yield f"{vis}.merger.post_projection_norm.bias", (O,), "bias"
    yield f"{vis}.merger.gate_proj.weight", (shape.merger_ffn, O), "weight"
    yield f"{vis}.merger.up_proj.weight", (shape.merger_ffn, O), "weight"
    yield f"{vis}.merger.down_proj.weight", (O, shape.merger_ffn), "weight"


def write_random_checkpoint(
    out_dir: Union[str, pathlib.Path],
    shape: RandomModelShape = RandomModelShape(),
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    std: float = 0.2,
    max_shard_bytes: int = 2 << 30,
) -> pathlib.Path:
    """Write a random GLM-4.1V-style checkpoint to ``out_dir`` and return it.

    Weights are N(0, std) scaled by 1/sqrt(fan_in)*sqrt(64) for wide layers (so activations stay
    bounded at any width), norms 1 + N(0, std/4). ``dtype`` is "bfloat16" or "float32". Tensors
    are generated and written shard by shard, so memory stays near one shard.
    """
    if shape.text_hidden % shape.text_heads or shape.vision_hidden % shape.vision_heads:
        raise ValueError("hidden sizes must be divisible by the head counts")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = _write_tokenizer(out)
    vocab = -(-n_tokens // 64) * 64
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, dims, kind in _tensors(shape, vocab):
        if kind == "norm":
            data = 1.0 + rng.standard_normal(dims, dtype=np.float32) * (std / 4)
        elif kind == "bias":
            data = rng.standard_normal(dims, dtype=np.float32) * std
        else:
            fan_in = int(np.prod(dims[1:]))
            data = rng.standard_normal(dims, dtype=np.float32) * (std * min(1.0, (64 / fan_in) ** 0.5))
        if dtype == "bfloat16":
            # Round to nearest even bfloat16, stored as uint16 views in a "BF16" safetensors entry below.
            bits = data.astype(np.float32).view(np.uint32)
            data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        if size + data.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = data
        size += data.nbytes
    _save_shards(out, shards, dtype)
    (out / "config.json").write_text(json.dumps(_config(shape, vocab, dtype), indent=1), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 12544, "longest_edge": 9633792}, "do_rescale": True, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Glm4vImageProcessor",
    }, indent=1), encoding="utf-8")
    recipe = {"seed": seed, "std": std, **asdict(shape)}
    (out / "random_checkpoint.json").write_text(json.dumps(recipe), encoding="utf-8")
    return out


def _save_shards(out: pathlib.Path, shards: list[dict[str, np.ndarray]], dtype: str) -> None:
    import safetensors.numpy as stn

    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map = {}
    for name, shard in zip(names, shards):
        if dtype == "bfloat16":
            _save_bf16(out / name, shard)
        else:
            stn.save_file(shard, str(out / name))
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")


def _save_bf16(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Write a safetensors file whose uint16 arrays are BF16 (numpy has no bfloat16 dtype)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {"dtype": "BF16" if arr.dtype == np.uint16 else "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
