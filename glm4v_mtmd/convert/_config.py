"""Reading ``config.json`` / ``preprocessor_config.json`` the way llama.cpp's converter sees them.

The reference converter loads the configuration through ``transformers.AutoConfig`` and works
on ``config.to_dict()``: every field of ``Glm4v(Moe)TextConfig`` / ``...VisionConfig`` is
present with its default, and legacy RoPE keys (``rope_scaling``, ``rope_theta``,
``partial_rotary_factor``) are folded into ``rope_parameters``. Without transformers we
reproduce the part of that normalisation the GGUF metadata depends on: the defaults below are
the dataclass defaults of transformers 5's GLM-4.xV config classes, and
:func:`_standardize_rope` follows ``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConversionError

__all__ = ["ModelConfig", "load_model_config", "load_json", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("glm4v", "glm4v_moe")

_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "glm4v": {
        "vocab_size": 151552,
        "hidden_size": 4096,
        "intermediate_size": 13696,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "use_cache": True,
        "attention_dropout": 0.0,
        "rope_parameters": None,
        "pad_token_id": None,
    },
    "glm4v_moe": {
        "vocab_size": 151424,
        "hidden_size": 4096,
        "intermediate_size": 10944,
        "num_hidden_layers": 46,
        "num_attention_heads": 96,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 65536,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_parameters": None,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "moe_intermediate_size": 1408,
        "num_experts_per_tok": 8,
        "output_router_logits": False,
        "n_shared_experts": 1,
        "n_routed_experts": 128,
        "routed_scaling_factor": 1.0,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "router_aux_loss_coef": 0.0001,
    },
}
_TEXT_ATTRIBUTE_MAP = {"glm4v": {}, "glm4v_moe": {"num_local_experts": "n_routed_experts"}}

_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 24,
    "hidden_size": 1536,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "num_heads": 12,
    "in_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "rms_norm_eps": 1e-05,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 4096,
    "intermediate_size": 13696,
    "initializer_range": 0.02,
}
_VISION_ATTRIBUTE_MAP = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

_DEFAULT_THETA = 10000.0


def load_json(path: Path, *, required: bool = True) -> Any:
    """Parse a JSON file, raising :class:`ConversionError` naming it on any problem."""
    if not path.is_file():
        if required:
            raise ConversionError(f"{path}: file not found")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: cannot parse JSON: {exc}") from exc


def _apply_attribute_map(d: dict[str, Any], amap: dict[str, str]) -> dict[str, Any]:
    out = dict(d)
    for alias, real in amap.items():
        if alias in out:
            out[real] = out.pop(alias)
    return out


def _standardize_rope(
    cfg: dict[str, Any], *, partial_default: float | None, has_field: bool
) -> dict[str, Any]:
    """Fold legacy RoPE keys of one config level into ``rope_parameters`` (transformers 5 rules)."""
    cfg = dict(cfg)
    if not has_field and not (cfg.get("rope_scaling") and cfg.get("rope_theta")):
        return cfg  # transformers leaves such a level alone
    rope_scaling = cfg.pop("rope_scaling", None)
    params = rope_scaling or cfg.get("rope_parameters")
    params = dict(params) if isinstance(params, dict) else {}
    rope_theta = cfg.pop("rope_theta", _DEFAULT_THETA)
    partial = cfg.pop("partial_rotary_factor", partial_default)
    params.setdefault("rope_theta", rope_theta)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cfg:
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    cfg["rope_parameters"] = params
    return cfg


@dataclass
class ModelConfig:
    """What the converter needs to know about one checkpoint."""

    hf_dir: Path
    model_type: str  # "glm4v" | "glm4v_moe"
    raw: dict[str, Any]  # config.json as written
    text: dict[str, Any]  # {**root, **text_config} after normalisation (the reference's TextModel.hparams)
    rope: dict[str, Any]  # the reference's TextModel.rope_parameters
    vision: dict[str, Any]  # vision_config with defaults (the reference's MmprojModel.hparams_vision)
    preprocessor: dict[str, Any] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.model_type == "glm4v_moe"

    @property
    def gguf_arch(self) -> str:
        return "glm4moe" if self.is_moe else "glm4"

    @property
    def n_main_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def n_nextn_layers(self) -> int:
        """NextN/MTP layers appended after the main ones (GLM-4.5-Air style); 0 for glm4v."""
        if not self.is_moe:
            return 0
        return int(self.text.get("num_nextn_predict_layers") or 0)

    @property
    def block_count(self) -> int:
        return self.n_main_layers + self.n_nextn_layers

    @property
    def head_dim(self) -> int:
        hd = self.text.get("head_dim")
        if hd is None:
            hd = int(self.text["hidden_size"]) // int(self.text["num_attention_heads"])
        return int(hd)

    @property
    def partial_rotary_factor(self) -> float:
        return float(self.rope.get("partial_rotary_factor", 0.5))

    @property
    def use_mrope(self) -> bool:
        return "mrope_section" in self.rope


def _text_hparams(
    raw: dict[str, Any], model_type: str, config_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    tc = raw.get("text_config")
    if not isinstance(tc, dict):
        raise ConversionError(f"{config_path}: no 'text_config' object (not a GLM-4.xV checkpoint config?)")
    text = dict(_TEXT_DEFAULTS[model_type])
    text.update(_apply_attribute_map(tc, _TEXT_ATTRIBUTE_MAP[model_type]))
    if text.get("num_key_value_heads") is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    text = _standardize_rope(text, partial_default=0.5 if model_type == "glm4v_moe" else None, has_field=True)

    root = {k: v for k, v in raw.items() if k not in ("text_config", "vision_config")}
    root = _standardize_rope(root, partial_default=None, has_field=False)
    hparams = {**root, **text}

    # TextModel.__init__: mirror global RoPE settings into rope_parameters when missing there
    rope = hparams.get("rope_parameters", hparams.get("rope_scaling")) or {}
    rope = dict(rope)

    def find(keys: tuple[str, ...]) -> Any:
        return next((hparams[k] for k in keys if k in hparams), None)

    theta = find(
        ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
    )
    partial = find(("partial_rotary_factor", "rope_pct", "rope_percent"))
    orig_ctx = find(("original_max_position_embeddings",))
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and orig_ctx is not None:
            rope["original_max_position_embeddings"] = orig_ctx
    return hparams, rope


def _vision_hparams(raw: dict[str, Any], config_path: Path) -> dict[str, Any]:
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        raise ConversionError(f"{config_path}: no 'vision_config' object (not a GLM-4.xV checkpoint config?)")
    vision = dict(_VISION_DEFAULTS)
    vision.update(_apply_attribute_map(vc, _VISION_ATTRIBUTE_MAP))
    return vision


def _preprocessor(hf_dir: Path) -> dict[str, Any]:
    """preprocessor_config.json merged with processor_config.json's image_processor (MmprojModel)."""
    out: dict[str, Any] = {}
    pp = load_json(hf_dir / "preprocessor_config.json", required=False)
    if isinstance(pp, dict):
        if isinstance(pp.get("media_proc_cfg"), dict):
            pp = {**pp, **pp["media_proc_cfg"]}
        out.update(pp)
    proc = load_json(hf_dir / "processor_config.json", required=False)
    if isinstance(proc, dict):
        if isinstance(proc.get("image_processor"), dict):
            proc = {**proc, **proc["image_processor"]}
        out.update(proc)
    return out


def load_model_config(hf_dir: Path) -> ModelConfig:
    """Read and validate the checkpoint's configuration files."""
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"{config_path}: file not found ({hf_dir} is not a Hugging Face model directory)"
        )
    raw = load_json(config_path)
    if not isinstance(raw, dict):
        raise ConversionError(f"{config_path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{config_path}: unsupported model_type {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    text, rope = _text_hparams(raw, model_type, config_path)
    vision = _vision_hparams(raw, config_path)
    cfg = ModelConfig(hf_dir, model_type, raw, text, rope, vision, _preprocessor(hf_dir))

    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "vocab_size",
    ):
        v = text.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConversionError(f"{config_path}: text_config.{key} must be a positive integer, got {v!r}")
    for key in ("hidden_size", "depth", "num_heads", "patch_size", "out_hidden_size"):
        v = vision.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConversionError(f"{config_path}: vision_config.{key} must be a positive integer, got {v!r}")
    rot = cfg.head_dim * cfg.partial_rotary_factor
    if cfg.use_mrope and not cfg.is_moe and int(rot) % 2 != 0:
        raise ConversionError(f"{config_path}: rotary dimension {int(rot)} must be even")
    return cfg
