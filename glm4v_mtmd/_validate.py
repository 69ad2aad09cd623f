"""Check GLM-4.xV GGUF files before llama.cpp sees them: what it would abort on becomes a ModelLoadError.

llama.cpp validates much of a file itself and throws (which the C API turns into an error), but some
checks are assertions that abort the process. Found by fuzzing (tests/test_fuzz_gguf.py), each guarded here:

- text model: every key ``load_hparams`` reads for glm4 / glm4moe has a rule (:data:`TEXT_KEY_RULES`,
  derived from the engine's uses of it, not from crashes; a test re-derives the key set from the engine
  source): counts the engine asserts on, the norm epsilon and rope dimensions the ggml kernels assert
  on (or loop forever on), per-layer head and expert counts that must agree, enums the graph aborts on;
  tensor types the graph cannot compute with (an integer-typed norm weight), a vocabulary with a
  repeated token (checked while parsing, in ``_gguf_probe``), M-RoPE sections missing while a projector
  is loaded (``GGML_ABORT("This GGUF does not support multimodal")`` at the first image);
- projector: clip looks tensors up by name but never compares their shapes or types with the
  hyper-parameters, and reads scalar keys with getters that assert their type; every tensor the GLM4V
  graph uses is checked against the shape the metadata implies, every key clip reads against its type,
  and the norm epsilon as for the text model.
"""

from __future__ import annotations

import math
import re
from typing import Optional

from ._gguf_probe import GGML_F16, GGML_F32, MATRIX_TYPES, GGUFArray, Header
from .errors import ModelLoadError

#: Types the patch-embedding and patch-merger convolutions (ggml_conv_2d via im2col) accept.
_CONV_TYPES = frozenset({GGML_F32, GGML_F16})
#: Norm weights, biases and the position table: added or multiplied element-wise in F32.
_VECTOR_TYPES = frozenset({GGML_F32})

#: GGUF value type of each key clip reads with a scalar getter (gguf_get_val_u32 and friends assert the
#: type, aborting the process, so a key of another type must be refused first). Generated from the
#: pinned clip.cpp / clip-impl.h; tests/test_fuzz_gguf.py regenerates it from the engine source and compares.
U32, I32, F32_, BOOL, STRING = 4, 5, 6, 7, 8
CLIP_KEY_TYPES: dict[str, int] = {
    "general.name": STRING, "general.description": STRING, "clip.has_vision_encoder": BOOL,
    "clip.has_audio_encoder": BOOL, "clip.has_gen_audio_encoder": BOOL, "clip.projector_type": STRING,
    "clip.vision.projector_type": STRING, "clip.audio.projector_type": STRING, "clip.gen.audio.projector_type": STRING,
    "clip.vision.embedding_length": U32, "clip.audio.embedding_length": U32, "clip.vision.attention.head_count": U32,
    "clip.audio.attention.head_count": U32, "clip.vision.attention.head_dim": U32, "clip.audio.attention.head_dim": U32,
    "clip.vision.feed_forward_length": U32, "clip.audio.feed_forward_length": U32, "clip.vision.block_count": U32,
    "clip.audio.block_count": U32, "clip.vision.projection_dim": U32, "clip.audio.projection_dim": U32,
    "clip.vision.attention.layer_norm_epsilon": F32_, "clip.audio.attention.layer_norm_epsilon": F32_,
    "clip.vision.attention.head_count_kv": U32, "clip.audio.attention.head_count_kv": U32,
    "clip.vision.image_size": U32, "clip.vision.patch_size": U32, "clip.minicpmv_version": I32,
    "clip.minicpmv_query_num": U32, "clip.audio.num_mel_bins": U32, "clip.gen.audio.model_variant": STRING,
    "clip.use_gelu": BOOL, "clip.use_silu": BOOL, "clip.vision.mm_patch_merge_type": STRING,
    "clip.vision.projector.scale_factor": U32, "clip.vision.preproc_min_tiles": U32,
    "clip.vision.preproc_max_tiles": U32, "clip.audio.subsampling_factor": U32, "clip.audio.conv_kernel_size": U32,
    "clip.vision.preproc_image_size": U32, "clip.vision.image_min_pixels": U32, "clip.vision.image_max_pixels": U32,
    "clip.vision.spatial_merge_size": U32, "clip.vision.expert_used_count": U32, "clip.vision.n_wa_pattern": U32,
    "clip.vision.window_size": U32, "clip.vision.swiglu_clamp": F32_, "clip.audio.projector.stack_factor": U32,
    "clip.audio.rvq.num_quantizers": U32, "clip.audio.window_size": U32, "clip.audio.local_block_count": U32,
    "clip.audio.local_group_size": U32, "clip.vision.sam.block_count": U32, "clip.vision.sam.head_count": U32,
    "clip.vision.sam.embedding_length": U32, "clip.audio.chunk_size": U32, "clip.audio.max_pos_emb": U32,
    "clip.audio.projector.window_size": U32, "clip.audio.projector.downsample_rate": U32,
    "clip.audio.projector.head_count": U32, "clip.vision.projector.query_side": U32,
    "clip.vision.projector.window_side": U32,
}

_REQUIRED_BLOCK = ("attn_qkv.weight", "attn_out.weight", "ffn_up.weight", "ffn_gate.weight", "ffn_down.weight",
                   "ln1.weight", "ln2.weight")
_REQUIRED = ("v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.bias", "mm.patch_merger.weight",
             "mm.patch_merger.bias", "mm.model.fc.weight", "mm.post_norm.weight", "mm.up.weight", "mm.gate.weight",
             "mm.down.weight")


LLAMA_MAX_LAYERS = 512  # llama-hparams.h
LLAMA_MAX_EXPERTS = 1024
#: llama-model.cpp LLAMA_ROPE_SCALING_TYPES (any other name is an assertion at load).
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
#: llama-hparams.h llama_expert_gating_func_type (any other value aborts when the graph is built).
EXPERT_GATING_FUNCS = range(0, 5)
_INT32 = 5  # GGUF element type: the engine copies INT32 per-layer values into uint32

#: Every metadata key llama.cpp's ``load_hparams`` reads for the GLM-4.xV text models (the common part
#: and the glm4 / glm4moe parts), by its name after the architecture prefix, with the rule checked here
#: before the engine sees the file. ``engine``: the engine refuses a bad value itself with an error (a
#: tensor shape that no longer matches, an array of the wrong length, a key of the wrong type);
#: ``unused``: read, but used by no code path of these architectures as the package runs them (pooling
#: and classifier heads, sliding-window attention, other models' rope variants). The rules come from
#: the uses in the pinned engine (the glm4 / glm4-moe graph builders, llama-graph.cpp, the KV cache and
#: the ggml-cpu kernels); tests/test_fuzz_gguf.py re-derives the set of keys from the engine source.
TEXT_KEY_RULES: dict[str, str] = {
    "context_length": "positive",
    "embedding_length": "positive",
    "embedding_length_out": "unused",
    "attention.causal": "true",
    "pooling_type": "unused",
    "classifier.pooling_type": "unused",
    "classifier.output_labels": "unused",
    "block_count": "layers",
    "nextn_predict_layers": "layers",
    "expert_count": "experts",
    "expert_used_count": "experts",
    "expert_group_count": "experts",
    "expert_group_used_count": "experts",
    "feed_forward_length": "engine",
    "attention.head_count": "heads",
    "attention.head_count_kv": "kv-heads",
    "attention.key_length": "head-size",
    "attention.value_length": "head-size",
    "attention.key_length_swa": "unused",
    "attention.value_length_swa": "unused",
    "attention.layer_norm_rms_epsilon": "epsilon",
    "rope.dimension_count": "n-rot",
    "rope.dimension_count_swa": "unused",
    "rope.dimension_sections": "sections",
    "rope.freq_base": "finite-positive",
    "rope.scaling.type": "rope-scaling",
    "rope.scaling.factor": "finite-non-negative",
    "rope.scale_linear": "finite-non-negative",
    "rope.scaling.attn_factor": "finite",
    "rope.scaling.alpha": "unused",
    "rope.scaling.finetuned": "unused",
    "rope.scaling.original_context_length": "engine",
}
#: The keys only the glm4moe part reads.
MOE_KEY_RULES: dict[str, str] = {
    "expert_feed_forward_length": "engine",
    "expert_shared_count": "engine",
    "leading_dense_block_count": "engine",
    "expert_weights_scale": "finite",
    "expert_weights_norm": "engine",
    "expert_gating_func": "gating",
}
#: What each rule means, as the error message says it.
RULE_TEXT = {
    "positive": "must be a positive integer",
    "true": "must be true: the engine's batches assume causal attention",
    "layers": f"1..{LLAMA_MAX_LAYERS} layers, nextn_predict_layers at most block_count",
    "experts": "expert counts the engine accepts (used 1..count, groups dividing the count)",
    "heads": "must be positive and the same for every layer",
    "kv-heads": "must be positive, the same for every layer, and divide attention.head_count",
    "head-size": "must be positive, with attention.key_length equal to attention.value_length",
    "epsilon": "must be a finite number >= 0",
    "n-rot": "must be even and within 2..the attention head size",
    "sections": "M-RoPE sections must be >= 0 and fit the rotated dimensions",
    "finite-positive": "must be a finite number > 0",
    "finite-non-negative": "must be a finite number >= 0",
    "finite": "must be a finite number",
    "rope-scaling": f"must be one of {', '.join(ROPE_SCALING_TYPES)}",
    "gating": f"must be one of {', '.join(map(str, EXPERT_GATING_FUNCS))}",
}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_text_model(header: Header, arch: str, *, with_projector: bool) -> None:
    """Raise ModelLoadError for a text-model GGUF llama.cpp would abort or hang on (:data:`TEXT_KEY_RULES`)."""
    path, meta = header.path, header.metadata
    rules = {**TEXT_KEY_RULES, **(MOE_KEY_RULES if arch == "glm4moe" else {})}

    def bad(suffix: str, value: object, rule: Optional[str] = None) -> ModelLoadError:
        shown = list(value.values or ()) if isinstance(value, GGUFArray) else value
        text = RULE_TEXT[rule or rules[suffix]]
        return ModelLoadError(f"'{path}' is corrupt: {arch}.{suffix} = {shown!r} ({text})")

    def values(suffix: str, default: int = 0) -> list[int]:
        """The key's integers as the engine reads them: a scalar, or every element of a per-layer array."""
        value = meta.get(f"{arch}.{suffix}", default)
        if isinstance(value, GGUFArray):
            if value.values is None or not all(_is_int(v) for v in value.values):
                return [default]  # not an integer array, or too long for a per-layer one: the engine refuses it
            return [v % (1 << 32) if value.etype == _INT32 else v for v in value.values] or [default]
        if not _is_int(value):
            raise bad(suffix, value, "positive")
        return [value]

    def number(suffix: str, default: int = 0) -> int:
        return max(values(suffix, default))

    for key in ("context_length", "embedding_length"):
        if f"{arch}.{key}" in meta and number(key) <= 0:
            raise bad(key, meta[f"{arch}.{key}"])
    if meta.get(f"{arch}.attention.causal", True) is not True:
        raise bad("attention.causal", meta[f"{arch}.attention.causal"])

    n_layer = number("block_count")
    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise ModelLoadError(f"'{path}' is corrupt ({arch}.block_count={n_layer}, must be 1..{LLAMA_MAX_LAYERS})")
    if not 0 <= number("nextn_predict_layers") <= n_layer:
        raise ModelLoadError(f"'{path}' is corrupt ({arch}.nextn_predict_layers is larger than block_count)")
    used = values("expert_used_count")
    n_expert, n_used = number("expert_count"), max(used)
    groups, groups_used = number("expert_group_count"), number("expert_group_used_count")
    if n_expert > 0:
        # Each layer's own value sizes its expert views (llama-graph.cpp build_moe_ffn), the first one
        # the top-k: they must agree.
        ok = (n_expert <= LLAMA_MAX_EXPERTS and 0 < n_used <= n_expert and len(set(used)) == 1
              and 0 <= groups < n_expert and (groups <= 1 or (n_expert % groups == 0 and 0 < groups_used < groups)))
    else:
        ok = arch != "glm4moe" and n_used == 0 and groups == 0
    if not ok:
        raise ModelLoadError(
            f"'{path}' is corrupt (experts: count {n_expert}, used {used if len(set(used)) > 1 else n_used}, "
            f"groups {groups}, groups used {groups_used}; {RULE_TEXT['experts']})"
        )

    # Attention shape: element 0 of the per-layer head counts sizes the tensors and the graph, each layer's
    # own value its KV cache.
    heads, kv_heads = values("attention.head_count"), values("attention.head_count_kv", -1)
    if len(set(heads)) != 1 or heads[0] <= 0:
        raise bad("attention.head_count", meta.get(f"{arch}.attention.head_count"))
    if kv_heads == [-1]:
        kv_heads = heads
    if len(set(kv_heads)) != 1 or kv_heads[0] <= 0 or heads[0] % kv_heads[0]:
        raise bad("attention.head_count_kv", meta.get(f"{arch}.attention.head_count_kv"))
    n_embd = number("embedding_length")
    key_len = number("attention.key_length", n_embd // heads[0])
    value_len = number("attention.value_length", n_embd // heads[0])
    if key_len <= 0 or key_len != value_len:
        raise bad("attention.key_length", {"key_length": key_len, "value_length": value_len})
    # rope: n_dims odd or above the head size trips ggml's asserts; 0 or >= 2^31 (negative as the int
    # the kernels take) passes them and then never leaves the loop that fills the unrotated channels.
    n_rot = number("rope.dimension_count", key_len)
    if n_rot % 2 or not 2 <= n_rot <= key_len:
        raise bad("rope.dimension_count", n_rot)
    eps = meta.get(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is not None and _is_number(eps) and not (math.isfinite(eps) and eps >= 0):
        raise bad("attention.layer_norm_rms_epsilon", eps)
    for suffix, rule in rules.items():
        value = meta.get(f"{arch}.{suffix}")
        if value is None or rule not in ("finite", "finite-positive", "finite-non-negative") or not _is_number(value):
            continue
        if (not math.isfinite(value) or (rule == "finite-positive" and value <= 0)
                or (rule == "finite-non-negative" and value < 0)):
            raise bad(suffix, value)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        raise bad("rope.scaling.type", scaling)
    gating = meta.get(f"{arch}.expert_gating_func")
    if arch == "glm4moe" and _is_int(gating) and gating not in EXPERT_GATING_FUNCS:
        raise bad("expert_gating_func", gating)

    for t in header.tensors.values():
        # Converters and llama-quantize keep every 1-D tensor (norms, biases) in F32.
        if t.ggml_type not in ((GGML_F32,) if len(t.shape) == 1 else MATRIX_TYPES):
            raise ModelLoadError(
                f"'{path}' is corrupt: tensor '{t.name}' (shape {list(t.shape)}) has a type (id {t.ggml_type}) "
                "it cannot have"
            )
    entry = meta.get(f"{arch}.rope.dimension_sections")
    if isinstance(entry, GGUFArray):
        sections = list(entry.values or ())
    else:  # a scalar fills all four sections (get_key_or_arr)
        sections = [entry] * 4 if _is_int(entry) else []
    if sections:
        # ggml_mrope_cache_init asserts that the sections fit in the rotated dimensions, and takes
        # positions modulo their sum.
        if not all(_is_int(v) and v >= 0 for v in sections) or sum(sections[:4]) > n_rot:
            raise ModelLoadError(
                f"'{path}' is corrupt: {arch}.rope.dimension_sections = {sections} ({RULE_TEXT['sections']}: "
                f"{n_rot} rotated dimensions)"
            )
    if with_projector and not (len(sections) >= 2 and sections[0] > 0 and sections[1] > 0):
        raise ModelLoadError(
            f"'{path}' has no M-RoPE sections ({arch}.rope.dimension_sections): it is a text-only GLM-4 "
            "conversion and cannot take images; convert the GLM-4.xV checkpoint itself (glm4v-mtmd convert), "
            "or load it without mmproj_path for text only"
        )


def _u32(meta: dict[str, object], key: str, path: str, default: Optional[int] = None) -> int:
    value = meta.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 24:
        raise ModelLoadError(f"'{path}' is corrupt or not a GLM-4.xV projector ({key}={value!r})")
    return value


def check_glm4v_mmproj(header: Header) -> None:
    """Raise ModelLoadError unless ``header`` describes a projector the GLM4V graph can run safely."""
    path, meta, tensors = header.path, header.metadata, header.tensors
    for key, vtype in header.value_types.items():
        if CLIP_KEY_TYPES.get(key, vtype) != vtype:
            raise ModelLoadError(
                f"'{path}' is corrupt: metadata key '{key}' has GGUF type {vtype}, expected {CLIP_KEY_TYPES[key]}"
            )
    eps = meta.get("clip.vision.attention.layer_norm_epsilon")
    if isinstance(eps, float) and not (math.isfinite(eps) and eps >= 0):
        # ggml_norm / ggml_rms_norm assert eps >= 0 (ggml-cpu ops.cpp): an abort at the first image.
        raise ModelLoadError(
            f"'{path}' is corrupt: clip.vision.attention.layer_norm_epsilon = {eps!r} (must be a finite number >= 0)"
        )
    n_embd = _u32(meta, "clip.vision.embedding_length", path)
    n_head = _u32(meta, "clip.vision.attention.head_count", path)
    n_layer = _u32(meta, "clip.vision.block_count", path)
    patch = _u32(meta, "clip.vision.patch_size", path)
    image_size = _u32(meta, "clip.vision.image_size", path)
    n_merge = _u32(meta, "clip.vision.spatial_merge_size", path, default=2)
    if n_embd % n_head or (n_embd // n_head) % 4:
        raise ModelLoadError(
            f"'{path}' is corrupt: embedding_length {n_embd} with {n_head} heads (head size must be a multiple of 4)"
        )
    if n_merge != 2 or image_size % patch:
        raise ModelLoadError(
            f"'{path}' is corrupt: spatial_merge_size {n_merge}, image_size {image_size}, patch size {patch}"
        )
    if n_layer * len(_REQUIRED_BLOCK) > len(tensors):
        raise ModelLoadError(f"'{path}' is corrupt: block_count is {n_layer}, but it holds only {len(tensors)} tensors")
    missing = [n for n in _REQUIRED if n not in tensors]
    missing += [f"v.blk.{i}.{n}" for i in range(n_layer) for n in _REQUIRED_BLOCK if f"v.blk.{i}.{n}" not in tensors]
    if missing:
        raise ModelLoadError(f"'{path}' lacks tensors the GLM-4.xV vision tower needs: {', '.join(missing[:5])}")

    dims = {"E": n_embd, "3E": 3 * n_embd, "P": patch, "M": n_merge, "N": (image_size // patch) ** 2}
    # Sizes only the tensors say, bound by their first use: the merger's output width O (the text model's
    # n_embd, which mtmd compares) and the FFN widths of the tower (Fv) and the merger (Fm).
    free: dict[str, int] = {}

    def expect(name: str, shape: tuple[str, ...], types: frozenset[int]) -> None:
        t = tensors.get(name)
        if t is None:
            return
        want = []
        for sym in shape:
            if sym.isdigit():
                want.append(int(sym))
            elif sym in dims:
                want.append(dims[sym])
            else:  # bound by its first use, then checked like the others
                want.append(free.setdefault(sym, t.shape[len(want)] if len(t.shape) > len(want) else -1))
        if list(t.shape) != want:
            raise ModelLoadError(
                f"'{path}' is corrupt: tensor '{name}' has shape {list(t.shape)}, the metadata implies {want}"
            )
        if t.ggml_type not in types:
            raise ModelLoadError(f"'{path}' is corrupt: tensor '{name}' has a type (id {t.ggml_type}) it cannot have")

    expect("v.patch_embd.weight", ("P", "P", "3", "E"), _CONV_TYPES)
    expect("v.patch_embd.weight.1", ("P", "P", "3", "E"), _CONV_TYPES)
    expect("v.patch_embd.bias", ("E",), _VECTOR_TYPES)
    expect("v.position_embd.weight", ("E", "N"), _VECTOR_TYPES)
    for name in ("v.norm_embd", "v.post_ln"):
        expect(f"{name}.weight", ("E",), _VECTOR_TYPES)
        expect(f"{name}.bias", ("E",), _VECTOR_TYPES)
    for i in range(n_layer):
        b = f"v.blk.{i}."
        expect(b + "attn_qkv.weight", ("E", "3E"), MATRIX_TYPES)
        expect(b + "attn_qkv.bias", ("3E",), _VECTOR_TYPES)
        expect(b + "attn_out.weight", ("E", "E"), MATRIX_TYPES)
        expect(b + "attn_out.bias", ("E",), _VECTOR_TYPES)
        for n in ("ffn_up", "ffn_gate"):
            expect(f"{b}{n}.weight", ("E", "Fv"), MATRIX_TYPES)
            expect(f"{b}{n}.bias", ("Fv",), _VECTOR_TYPES)
        expect(b + "ffn_down.weight", ("Fv", "E"), MATRIX_TYPES)
        expect(b + "ffn_down.bias", ("E",), _VECTOR_TYPES)
        for n in ("ln1", "ln2"):
            expect(f"{b}{n}.weight", ("E",), _VECTOR_TYPES)
            expect(f"{b}{n}.bias", ("E",), _VECTOR_TYPES)
    expect("mm.patch_merger.weight", ("M", "M", "E", "O"), _CONV_TYPES)
    expect("mm.patch_merger.bias", ("O",), _VECTOR_TYPES)
    expect("mm.model.fc.weight", ("O", "O"), MATRIX_TYPES)
    expect("mm.post_norm.weight", ("O",), _VECTOR_TYPES)
    expect("mm.post_norm.bias", ("O",), _VECTOR_TYPES)
    for n in ("mm.up", "mm.gate"):
        expect(f"{n}.weight", ("O", "Fm"), MATRIX_TYPES)
        expect(f"{n}.bias", ("Fm",), _VECTOR_TYPES)
    expect("mm.down.weight", ("Fm", "O"), MATRIX_TYPES)
    expect("mm.down.bias", ("O",), _VECTOR_TYPES)
    extra = [n for n in tensors if re.fullmatch(r"v\.blk\.(\d+)\..*", n) and int(n.split(".")[2]) >= n_layer]
    if extra:
        raise ModelLoadError(f"'{path}' is corrupt: block_count is {n_layer} but it holds '{extra[0]}'")
