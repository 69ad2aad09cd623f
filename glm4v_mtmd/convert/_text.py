"""The text model: tensor plan and metadata of ``glm4`` (glm4v) / ``glm4moe`` (glm4v_moe) GGUFs.

Mirrors llama.cpp's ``Glm4Model`` / ``Glm4MoeModel`` (conversion/glm.py) on top of
``TextModel`` (conversion/base.py):

* names: ``model.language_model.X`` is read as ``model.X``; vision tensors are skipped;
  the rest is mapped with the tables below (gguf-py's tensor_mapping for these two archs);
* glm4v only, when the config has M-RoPE sections: Q/K weights and biases are permuted from
  interleaved (even/odd) to NeoX rotary order over the rotary part of each head;
* glm4v_moe: the per-expert ``mlp.experts.{x}.{down,gate,up}_proj.weight`` of a layer become
  ``blk.N.ffn_{down,gate,up}_exps.weight`` of shape (n_expert, rows, cols), emitted where the
  reference emits them (when the last expert of the layer is reached in file order); the
  stacked tensor is streamed expert by expert, never assembled in memory;
* NextN/MTP layers past ``num_hidden_layers`` (glm4v_moe, when the config declares
  ``num_nextn_predict_layers``) are kept, as the reference does by default.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConversionError
from ._config import ModelConfig
from ._source import SourceTensor
from ._writer import OutTensor, Piece, select_qtype

__all__ = ["text_plan", "text_kv"]

_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")

# TextModel.filter_tensors: multimodal tensors are not part of the text model
_MM_PREFIXES = (
    "mlp",
    "vit.",
    "vpm.",
    "siglip2.",
    "conformer.",
    "merger.",
    "resampler.",
    "sound_encoder.",
    "sound_projection.",
    "speech_embeddings.",
)
_MM_PARTS = (
    "visual.",
    "vision.",
    "audio.",
    "talker.",
    "vision_",
    "audio_",
    "token2wav.",
    "code2wav.",
    "projector.",
    "pre_mm_projector_norm",
    "image_newline",
    "view_seperator",
    "patch_embed",
    "patch_embedding",
    "patch_merger.",
    "patch_merge_mlp.",
    "model.connector.",
)

_GLOBAL = {"model.embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm"}

_LAYER_COMMON = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "eh_proj": "nextn.eh_proj",
    "enorm": "nextn.enorm",
    "hnorm": "nextn.hnorm",
    "shared_head.head": "nextn.shared_head_head",
    "shared_head.norm": "nextn.shared_head_norm",
    "embed_tokens": "nextn.embed_tokens",
}
_LAYER_GLM4 = {
    **_LAYER_COMMON,
    "post_attention_layernorm": "ffn_norm",
    "post_self_attn_layernorm": "post_attention_norm",
    "post_mlp_layernorm": "post_ffw_norm",
}
_LAYER_GLM4MOE = {
    **_LAYER_COMMON,
    "post_attention_layernorm": "post_attention_norm",
    "post_self_attn_layernorm": "post_attention_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.gate": "ffn_gate_inp",
    "mlp.gate.e_score_correction": "exp_probs_b",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
    "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight$")


def _hf_name(name: str) -> str | None:
    """The reference's filter_tensors renames, or None when the tensor is not a text tensor."""
    if name.startswith(_MM_PREFIXES) or any(p in name for p in _MM_PARTS):
        return None
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name.replace("language_model.", "")


def _expected_shapes(cfg: ModelConfig, hf: str, bid: int | None) -> tuple[int, ...] | None:
    """Shape the config implies for a mapped tensor (None: not checked)."""
    t = cfg.text
    h, hd = int(t["hidden_size"]), cfg.head_dim
    nq, nkv, vocab = int(t["num_attention_heads"]), int(t["num_key_value_heads"]), int(t["vocab_size"])
    ff = int(t.get("intermediate_size") or 0)
    if hf in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, h)
    if hf == "model.norm.weight":
        return (h,)
    m = _LAYER_RE.match(hf)
    if not m:
        return None
    part, kind = m.group(2), m.group(3)
    table: dict[str, tuple[int, ...]] = {
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "post_self_attn_layernorm": (h,),
        "post_mlp_layernorm": (h,),
        "self_attn.q_proj": (nq * hd, h),
        "self_attn.k_proj": (nkv * hd, h),
        "self_attn.v_proj": (nkv * hd, h),
        "self_attn.o_proj": (h, nq * hd),
        "self_attn.q_norm": (hd,),
        "self_attn.k_norm": (hd,),
        "mlp.gate_up_proj": (2 * ff, h),
    }
    if cfg.is_moe:
        moe_ff = int(t.get("moe_intermediate_size") or 0)
        n_exp = int(t.get("n_routed_experts") or 0)
        n_sh = int(t.get("n_shared_experts") or 0)
        table.update(
            {
                "mlp.gate": (n_exp, h),
                "mlp.gate.e_score_correction": (n_exp,),
                "mlp.shared_experts.gate_proj": (moe_ff * n_sh, h),
                "mlp.shared_experts.up_proj": (moe_ff * n_sh, h),
                "mlp.shared_experts.down_proj": (h, moe_ff * n_sh),
                "mlp.gate_proj": (ff, h),
                "mlp.up_proj": (ff, h),
                "mlp.down_proj": (h, ff),
            }
        )
    else:
        table["mlp.down_proj"] = (h, ff)
    shape = table.get(part)
    if shape is None:
        return None
    return shape[:1] if kind == "bias" else shape


def _check_shape(cfg: ModelConfig, src: SourceTensor, hf: str, bid: int | None) -> None:
    want = _expected_shapes(cfg, hf, bid)
    if want is not None and tuple(src.shape) != want:
        raise ConversionError(
            f"{src.file}: tensor {src.name!r} has shape {list(src.shape)}, but {cfg.hf_dir / 'config.json'} "
            f"implies {list(want)}"
        )


def _map(cfg: ModelConfig, hf: str, src: SourceTensor) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    for k, v in _GLOBAL.items():
        if hf in (k + ".weight", k + ".bias"):
            return v + hf[len(k) :]
    m = _LAYER_RE.match(hf)
    table = _LAYER_GLM4MOE if cfg.is_moe else _LAYER_GLM4
    if m and int(m.group(1)) < cfg.block_count and m.group(2) in table:
        return f"blk.{int(m.group(1))}.{table[m.group(2)]}.{m.group(3)}"
    raise ConversionError(f"{src.file}: cannot map tensor {src.name!r} to a {cfg.gguf_arch} GGUF tensor")


def text_plan(cfg: ModelConfig, sources: dict[str, SourceTensor], outtype: str) -> list[OutTensor]:
    """Output tensors of the text GGUF, in the reference's order."""
    out: list[OutTensor] = []
    seen: dict[str, SourceTensor] = {}
    n_experts = int(cfg.text.get("n_routed_experts") or 0) if cfg.is_moe else 0
    moe_ff = int(cfg.text.get("moe_intermediate_size") or 0)
    h = int(cfg.text["hidden_size"])
    experts: dict[int, dict[str, SourceTensor]] = {}
    rot_dim = int(cfg.head_dim * cfg.partial_rotary_factor)

    def emit(name: str, shape: tuple[int, ...], pieces: list[Piece], src: SourceTensor) -> None:
        if name in seen:
            raise ConversionError(
                f"{src.file}: tensors {seen[name].name!r} and {src.name!r} both map to {name!r}"
            )
        seen[name] = src
        out.append(OutTensor(name, shape, select_qtype(name, shape, outtype, mmproj=False), pieces))

    for name, src in sources.items():
        hf = _hf_name(name)
        if hf is None or name.endswith(_SKIP_SUFFIXES):
            continue
        bid = next((int(p) for p in hf.split(".") if p.isdecimal()), None)
        if cfg.is_moe and bid is not None and bid >= cfg.block_count and hf.startswith("model.layers."):
            raise ConversionError(
                f"{src.file}: tensor {name!r} belongs to layer {bid}, "
                f"but the config has {cfg.block_count} layers"
            )

        if cfg.is_moe and "mlp.experts" in hf:
            m = _EXPERT_RE.match(hf)
            if not m:
                raise ConversionError(
                    f"{src.file}: unsupported expert tensor {name!r} (expected per-expert "
                    "'mlp.experts.N.{gate,up,down}_proj.weight' tensors)"
                )
            bid, xid, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            want = (h, moe_ff) if proj == "down_proj" else (moe_ff, h)
            if xid >= n_experts:
                raise ConversionError(
                    f"{src.file}: expert tensor {name!r} has expert index {xid}, but "
                    f"{cfg.hf_dir / 'config.json'} declares n_routed_experts = {n_experts}"
                )
            if tuple(src.shape) != want:
                raise ConversionError(
                    f"{src.file}: expert tensor {name!r} has shape {list(src.shape)}, but "
                    f"{cfg.hf_dir / 'config.json'} implies {list(want)}"
                )
            layer = experts.setdefault(bid, {})
            layer[hf] = src
            if len(layer) >= n_experts * 3:
                for proj in ("down_proj", "gate_proj", "up_proj"):
                    parts = [
                        layer.pop(f"model.layers.{bid}.mlp.experts.{x}.{proj}.weight")
                        for x in range(n_experts)
                    ]
                    gname = f"blk.{bid}.ffn_{proj.split('_')[0]}_exps.weight"
                    emit(gname, (n_experts, *parts[0].shape), [Piece(p) for p in parts], parts[0])
            continue

        _check_shape(cfg, src, hf, bid)
        gname = _map(cfg, hf, src)
        piece = Piece(src)
        if (
            cfg.use_mrope
            and not cfg.is_moe
            and hf.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))
        ):
            piece = Piece(src, "neox", (cfg.head_dim, rot_dim))
        emit(gname, tuple(src.shape), [piece], src)

    leftover = sorted(n for layer in experts.values() for n in layer)
    if leftover:
        raise ConversionError(
            f"{cfg.hf_dir}: incomplete experts, e.g. {leftover[0]!r} ({len(leftover)} expert tensors without "
            f"the rest of their layer; config says {n_experts} experts per layer)"
        )
    if not out:
        raise ConversionError(f"{cfg.hf_dir}: the checkpoint contains no text-model tensors")
    return out


def text_kv(cfg: ModelConfig, outtype_ftype: int) -> list[tuple[str, str, Any]]:
    """TextModel/Glm4Model/Glm4MoeModel.set_gguf_parameters + quantization version, in order."""
    a = cfg.gguf_arch
    hp = cfg.text
    kv: list[tuple[str, str, Any]] = []

    def put(key: str, kind: str, value: Any) -> None:
        for i, (k, _, _) in enumerate(kv):
            if k == key:  # GGUFWriter keeps the first position of a re-added key
                kv[i] = (key, kind, value)
                return
        kv.append((key, kind, value))

    def find(keys: tuple[str, ...]) -> Any:
        return next((hp[k] for k in keys if k in hp), None)

    put(f"{a}.block_count", "u32", cfg.block_count)
    if (
        v := find(
            (
                "max_position_embeddings",
                "n_ctx",
                "n_positions",
                "max_length",
                "max_sequence_length",
                "model_max_length",
            )
        )
    ) is not None:
        put(f"{a}.context_length", "u32", v)
    if (v := find(("hidden_size", "n_embd", "dim"))) is not None:
        put(f"{a}.embedding_length", "u32", v)
    if (
        v := find(
            (
                "prefix_dense_intermediate_size",
                "dense_intermediate_size",
                "intermediate_size",
                "n_inner",
                "hidden_dim",
            )
        )
    ) is not None:
        put(f"{a}.feed_forward_length", "u32", v)
    if (v := find(("num_attention_heads", "n_head", "n_heads"))) is not None:
        put(f"{a}.attention.head_count", "u32", v)
    if (v := find(("num_key_value_heads", "n_kv_heads"))) is not None:
        put(f"{a}.attention.head_count_kv", "u32", v)
    if hp.get("is_causal") is False:
        put(f"{a}.attention.causal", "bool", False)

    rope = cfg.rope.get("full_attention", cfg.rope)
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        put(f"{a}.rope.scaling.type", "str", "linear")
        put(f"{a}.rope.scaling.factor", "f32", factor)
    elif rope_type == "yarn" and factor is not None:
        put(f"{a}.rope.scaling.type", "str", "yarn")
        put(f"{a}.rope.scaling.factor", "f32", factor)
        put(f"{a}.rope.scaling.original_context_length", "u32", rope["original_max_position_embeddings"])
        for src_key, dst in (
            ("extrapolation_factor", "yarn_ext_factor"),
            ("beta_fast", "yarn_beta_fast"),
            ("beta_slow", "yarn_beta_slow"),
        ):
            if (
                src_key == "beta_fast"
                and (af := rope.get("attention_factor", rope.get("attn_factor"))) is not None
            ):
                put(f"{a}.rope.scaling.yarn_attn_factor", "f32", af)
            if (v := rope.get(src_key)) is not None:
                put(f"{a}.rope.scaling.{dst}", "f32", v)
    elif rope_type in ("su", "longrope"):
        put(f"{a}.rope.scaling.type", "str", "longrope")
    if "mrope_section" in cfg.rope:
        sections = [int(x) for x in cfg.rope["mrope_section"]][:4]
        put(f"{a}.rope.dimension_sections", "array", sections + [0] * (4 - len(sections)))
    if (v := rope.get("rope_theta")) is not None:
        put(f"{a}.rope.freq_base", "f32", v)
    if (v := find(("rms_norm_eps", "norm_eps"))) is not None:
        put(f"{a}.attention.layer_norm_rms_epsilon", "f32", v)
    if (v := find(("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        put(f"{a}.attention.layer_norm_epsilon", "f32", v)
    if (v := find(("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        put(f"{a}.expert_count", "u32", v)
    if (v := find(("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        put(f"{a}.expert_used_count", "u32", v)
    if (v := hp.get("n_group")) is not None:
        put(f"{a}.expert_group_count", "u32", v)
    if (v := hp.get("topk_group")) is not None:
        put(f"{a}.expert_group_used_count", "u32", v)
    if (
        v := find(
            (
                "score_function",
                "scoring_func",
                "score_func",
                "moe_router_activation",
                "moe_router_activation_func",
                "expert_selection_fn",
            )
        )
    ) is not None:
        gating = {"sigmoid": 2, "softmax": 1, "sqrtsoftplus": 4}.get(v)
        if gating is None:
            raise ConversionError(f"{cfg.hf_dir / 'config.json'}: unsupported expert scoring function {v!r}")
        put(f"{a}.expert_gating_func", "u32", gating)
    if (v := hp.get("head_dim")) is not None:
        put(f"{a}.attention.key_length", "u32", v)
        put(f"{a}.attention.value_length", "u32", v)
    put("general.file_type", "u32", outtype_ftype)

    put(f"{a}.rope.dimension_count", "u32", int(cfg.head_dim * cfg.partial_rotary_factor))
    if cfg.is_moe:
        for key, gkey in (
            ("n_routed_experts", "expert_count"),
            ("moe_intermediate_size", "expert_feed_forward_length"),
            ("n_shared_experts", "expert_shared_count"),
            ("first_k_dense_replace", "leading_dense_block_count"),
        ):
            if (v := hp.get(key)) is not None:
                put(f"{a}.{gkey}", "u32", v)
        put(f"{a}.expert_gating_func", "u32", 2)  # sigmoid
        if (v := hp.get("routed_scaling_factor")) is not None:
            put(f"{a}.expert_weights_scale", "f32", v)
        if (v := hp.get("norm_topk_prob")) is not None:
            put(f"{a}.expert_weights_norm", "bool", v)
        if (v := hp.get("num_nextn_predict_layers")) is not None:
            put(f"{a}.nextn_predict_layers", "u32", v)
    put("general.quantization_version", "u32", 2)
    return kv
