"""The vision tower + projector: tensor plan and metadata of the ``mmproj`` (clip) GGUF.

Mirrors llama.cpp's ``Glm4VVisionModel`` (conversion/qwen3vl.py) on top of ``MmprojModel``
(conversion/base.py): projector type ``glm4v``; ``model.visual.X`` is read as ``visual.X``;
the Conv3d patch embedding (kernel ``(2, p, p)``) becomes two Conv2d kernels
``v.patch_embd.weight`` (t = 0) and ``v.patch_embd.weight.1`` (t = 1); the patch embedding and
the downsample convolution stay F16 for an f16 file and F32 for any other outtype.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConversionError
from ._config import ModelConfig
from ._source import SourceTensor
from ._writer import OutTensor, Piece, select_qtype

__all__ = ["vision_plan", "vision_kv"]

_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

_GLOBAL = {
    "visual.downsample": "mm.patch_merger",
    "visual.embeddings.position_embedding": "v.position_embd",
    "visual.merger.down_proj": "mm.down",
    "visual.merger.gate_proj": "mm.gate",
    "visual.merger.up_proj": "mm.up",
    "visual.merger.proj": "mm.model.fc",
    "visual.merger.post_projection_norm": "mm.post_norm",
    "visual.post_conv_layernorm": "v.norm_embd",
    "visual.post_layernorm": "v.post_ln",
    "visual.patch_embed.proj": "v.patch_embd",
}
_BLOCK = {
    "attn.proj": "attn_out",
    "attn.qkv": "attn_qkv",
    "mlp.down_proj": "ffn_down",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "norm1": "ln1",
    "norm2": "ln2",
}
_BLOCK_RE = re.compile(r"^visual\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _hf_name(name: str) -> str | None:
    """Qwen3VLVisionModel.filter_tensors: only ``visual.*`` tensors, ``model.visual.`` shortened."""
    if name.startswith(("lm_head.", "mtp.")):
        return None
    if name.startswith("model.visual."):
        name = name.replace("model.visual.", "visual.", 1)
    if not name.startswith("visual.") or "language_model." in name:
        return None
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name


def _expected_shape(cfg: ModelConfig, hf: str) -> tuple[int, ...] | None:
    v = cfg.vision
    hv, out_h = int(v["hidden_size"]), int(v["out_hidden_size"])
    ff = int(v.get("intermediate_size") or 0)
    p, t, c, merge = (
        int(v["patch_size"]),
        int(v.get("temporal_patch_size") or 2),
        int(v.get("in_channels") or 3),
        int(v.get("spatial_merge_size") or 2),
    )
    n_pos = (int(v["image_size"]) // p) ** 2 if isinstance(v.get("image_size"), int) else None
    table: dict[str, tuple[int, ...] | None] = {
        "visual.patch_embed.proj.weight": (hv, c, t, p, p),
        "visual.patch_embed.proj.bias": (hv,),
        "visual.post_conv_layernorm.weight": (hv,),
        "visual.post_layernorm.weight": (hv,),
        "visual.embeddings.position_embedding.weight": (n_pos, hv) if n_pos else None,
        "visual.downsample.weight": (out_h, hv, merge, merge),
        "visual.downsample.bias": (out_h,),
        "visual.merger.proj.weight": (out_h, out_h),
        "visual.merger.proj.bias": (out_h,),
        "visual.merger.post_projection_norm.weight": (out_h,),
        "visual.merger.post_projection_norm.bias": (out_h,),
        "visual.merger.gate_proj.weight": (ff, out_h),
        "visual.merger.up_proj.weight": (ff, out_h),
        "visual.merger.down_proj.weight": (out_h, ff),
    }
    if hf in table:
        return table[hf]
    m = _BLOCK_RE.match(hf)
    if not m:
        return None
    block = {
        "attn.qkv": (3 * hv, hv),
        "attn.proj": (hv, hv),
        "norm1": (hv,),
        "norm2": (hv,),
        "mlp.gate_proj": (out_h, hv),
        "mlp.up_proj": (out_h, hv),
        "mlp.down_proj": (hv, out_h),
    }.get(m.group(2))
    if block is None:
        return None
    return block[:1] if m.group(3) == "bias" else block


def _map(cfg: ModelConfig, hf: str, src: SourceTensor) -> str:
    for k, v in _GLOBAL.items():
        if hf in (k + ".weight", k + ".bias"):
            return v + hf[len(k) :]
    m = _BLOCK_RE.match(hf)
    if m and int(m.group(1)) < int(cfg.vision["depth"]) and m.group(2) in _BLOCK:
        return f"v.blk.{int(m.group(1))}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ConversionError(f"{src.file}: cannot map vision tensor {src.name!r} to an mmproj GGUF tensor")


def vision_plan(cfg: ModelConfig, sources: dict[str, SourceTensor], outtype: str) -> list[OutTensor]:
    """Output tensors of the mmproj GGUF, in the reference's order."""
    out: list[OutTensor] = []
    seen: set[str] = set()

    def emit(name: str, shape: tuple[int, ...], piece: Piece) -> None:
        if name in seen:
            raise ConversionError(f"{piece.src.file}: two tensors map to {name!r}")
        seen.add(name)
        out.append(OutTensor(name, shape, select_qtype(name, shape, outtype, mmproj=True), [piece]))

    for name, src in sources.items():
        hf = _hf_name(name)
        if hf is None or name.endswith(_SKIP_SUFFIXES):
            continue
        want = _expected_shape(cfg, hf)
        if want is not None and tuple(src.shape) != want:
            raise ConversionError(
                f"{src.file}: tensor {src.name!r} has shape {list(src.shape)}, but "
                f"{cfg.hf_dir / 'config.json'} implies {list(want)}"
            )
        if hf == "visual.patch_embed.proj.weight":
            if len(src.shape) != 5 or src.shape[2] != 2:
                raise ConversionError(
                    f"{src.file}: {src.name!r}: only a temporal patch size of 2 is supported, "
                    f"shape {list(src.shape)}"
                )
            c1, c2, _, kh, kw = src.shape
            emit("v.patch_embd.weight", (c1, c2, kh, kw), Piece(src, "temporal", (0,)))
            emit("v.patch_embd.weight.1", (c1, c2, kh, kw), Piece(src, "temporal", (1,)))
            continue
        emit(_map(cfg, hf, src), tuple(src.shape), Piece(src))
    if not out:
        raise ConversionError(f"{cfg.hf_dir}: the checkpoint contains no vision tensors (model.visual.*)")
    return out


def vision_kv(cfg: ModelConfig, outtype_ftype: int) -> list[tuple[str, str, Any]]:
    """MmprojModel/Glm4VVisionModel.set_gguf_parameters + quantization version, in order."""
    v = cfg.vision
    pp = cfg.preprocessor
    pp_file = cfg.hf_dir / "preprocessor_config.json"
    for key in ("image_mean", "image_std"):
        val = pp.get(key)
        if not (isinstance(val, list) and val and all(isinstance(x, (int, float)) for x in val)):
            raise ConversionError(f"{pp_file}: missing or invalid {key!r} (needed for the mmproj file)")
    n_embd_text = cfg.text.get("hidden_size", cfg.text.get("n_embd", 0))
    kv: list[tuple[str, str, Any]] = [
        ("general.file_type", "u32", outtype_ftype),
        ("clip.has_vision_encoder", "bool", True),
        ("clip.vision.projection_dim", "u32", n_embd_text),
        ("clip.vision.image_size", "u32", v["image_size"]),
        ("clip.vision.patch_size", "u32", v["patch_size"]),
        ("clip.vision.embedding_length", "u32", v["hidden_size"]),
        ("clip.vision.feed_forward_length", "u32", v["intermediate_size"]),
        ("clip.vision.block_count", "u32", v["depth"]),
        ("clip.vision.attention.head_count", "u32", v["num_heads"]),
        ("clip.vision.image_mean", "array", [float(x) for x in pp["image_mean"]]),
        ("clip.vision.image_std", "array", [float(x) for x in pp["image_std"]]),
        ("clip.projector_type", "str", "glm4v"),
    ]
    act = str(v.get("hidden_act", "")).lower()
    if act == "gelu":
        kv.append(("clip.use_gelu", "bool", True))
    elif act == "silu":
        kv.append(("clip.use_silu", "bool", True))
    kv.append(("clip.vision.attention.layer_norm_epsilon", "f32", v.get("rms_norm_eps", 1e-5)))
    kv.append(("general.quantization_version", "u32", 2))
    return kv
