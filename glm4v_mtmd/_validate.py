"""Check GLM-4.xV GGUF files before llama.cpp sees them: what it would abort on becomes a ModelLoadError.

llama.cpp validates much of a file itself and throws (which the C API turns into an error), but some
checks are assertions that abort the process. Found by fuzzing (tests/test_fuzz_gguf.py), each guarded here:

- text model: hyper-parameters asserted in ``llama_model::load_hparams`` (layer and expert counts),
  tensor types the graph cannot compute with (an integer-typed norm weight), a vocabulary with a
  repeated token (checked while parsing, in ``_gguf_probe``), M-RoPE sections missing while a projector
  is loaded (``GGML_ABORT("This GGUF does not support multimodal")`` at the first image);
- projector: clip looks tensors up by name but never compares their shapes or types with the
  hyper-parameters, and reads scalar keys with getters that assert their type; every tensor the GLM4V
  graph uses is checked against the shape the metadata implies and every key clip reads against its type.
"""

from __future__ import annotations

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


def check_text_model(header: Header, arch: str, *, with_projector: bool) -> None:
    """Raise ModelLoadError for a text-model GGUF llama.cpp would abort on (see the module docstring)."""
    path, meta = header.path, header.metadata

    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, GGUFArray):  # a per-layer array: its largest value decides
            value = max(value.values) if value.values else default
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelLoadError(f"'{path}' is corrupt ({arch}.{key}={value!r})")
        return value

    n_layer = number("block_count")
    if not 0 < n_layer <= LLAMA_MAX_LAYERS:
        raise ModelLoadError(f"'{path}' is corrupt ({arch}.block_count={n_layer}, must be 1..{LLAMA_MAX_LAYERS})")
    if not 0 <= number("nextn_predict_layers") <= n_layer:
        raise ModelLoadError(f"'{path}' is corrupt ({arch}.nextn_predict_layers is larger than block_count)")
    n_expert, n_used = number("expert_count"), number("expert_used_count")
    groups, groups_used = number("expert_group_count"), number("expert_group_used_count")
    if n_expert > 0:
        ok = (n_expert <= LLAMA_MAX_EXPERTS and 0 < n_used <= n_expert and 0 <= groups < n_expert
              and (groups <= 1 or (n_expert % groups == 0 and 0 < groups_used < groups)))
    else:
        ok = arch != "glm4moe" and n_used == 0 and groups == 0
    if not ok:
        raise ModelLoadError(
            f"'{path}' is corrupt (experts: count {n_expert}, used {n_used}, groups {groups}, "
            f"groups used {groups_used})"
        )
    for t in header.tensors.values():
        # Converters and llama-quantize keep every 1-D tensor (norms, biases) in F32.
        if t.ggml_type not in ((GGML_F32,) if len(t.shape) == 1 else MATRIX_TYPES):
            raise ModelLoadError(
                f"'{path}' is corrupt: tensor '{t.name}' (shape {list(t.shape)}) has a type (id {t.ggml_type}) "
                "it cannot have"
            )
    entry = meta.get(f"{arch}.rope.dimension_sections")
    sections = list(entry.values or ()) if isinstance(entry, GGUFArray) else []
    if sections:
        # ggml_mrope_cache_init asserts that the sections fit in the rotated dimensions.
        head = number("embedding_length") // max(1, number("attention.head_count", 1))
        n_rot = number("rope.dimension_count", head)
        if any(v < 0 for v in sections) or sum(sections[:4]) > n_rot:
            raise ModelLoadError(
                f"'{path}' is corrupt ({arch}.rope.dimension_sections {sections} do not fit "
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
