"""Damaged and hostile GGUF files end in a typed exception or a working session, never in a dead process.

The fuzz test mutates the tiny F16 pairs of both architectures (truncation, header bytes, counts, string
lengths, tensor offsets, types and shapes, metadata arrays and value types, tensor data) and runs every
case in a child process (tests/gguf_fuzz.py): load, encode an image, generate. A child killed by a
signal or stuck for a minute is a crash; an exception that is not a Glm4vError counts too.
"""

from __future__ import annotations

import pathlib
import re
import struct

import gguf_fuzz
import pytest
import reference
from conftest import ARCHS

from glm4v_mtmd import GenerationConfig, ModelLoadError, Session
from glm4v_mtmd._gguf_probe import GGML_TYPE_SIZES
from glm4v_mtmd._validate import CLIP_KEY_TYPES

PER_KIND = 30  # cases per mutation kind and file: ~280 per file, ~1,100 in all (about 15 s here)


@pytest.mark.parametrize("arch", ARCHS)
def test_mutated_ggufs_never_crash_the_process(arch, gguf_pair, tmp_path, capsys):
    model, mmproj = gguf_pair(arch, outtype="f16")
    cases = (gguf_fuzz.mutations("model", gguf_fuzz.layout(model), seed=1, per_kind=PER_KIND)
             + gguf_fuzz.mutations("mmproj", gguf_fuzz.layout(mmproj), seed=2, per_kind=PER_KIND))
    outcome = gguf_fuzz.run_cases(cases, model, mmproj, tmp_path / "fuzz")
    with capsys.disabled():
        print(f"\n[{arch}] {outcome.summary(len(cases))}")
    assert sum(outcome.counts.values()) == len(cases)
    assert not outcome.crashes, outcome.summary(len(cases)) + "\n" + "\n".join(outcome.crashes)
    assert not outcome.untyped, "\n".join(outcome.untyped)
    # The suite must exercise both ends: files that still load and run, and files that are refused.
    assert outcome.counts.get("loaded-and-ran", 0) > 0
    assert outcome.counts.get("rejected:ModelLoadError", 0) > len(cases) // 2


# ----------------------------------------------------------------------------- the checks, one by one


def _patched(src: pathlib.Path, dst: pathlib.Path, patches: list[tuple[int, bytes]]) -> pathlib.Path:
    data = bytearray(src.read_bytes())
    for at, value in patches:
        data[at : at + len(value)] = value
    dst.write_bytes(data)
    return dst


def _load(model: pathlib.Path, mmproj: pathlib.Path) -> None:
    with Session(model, mmproj, n_ctx=256, n_threads=1):
        pass


def test_projector_tensor_with_a_wrong_shape_is_refused(gguf_pair, tmp_path):
    # clip never compares shapes with the metadata: this file used to kill the process at the first image.
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    lay = gguf_fuzz.layout(mmproj)
    at, dim = lay.tensor("v.blk.0.attn_qkv.weight")["dims"][1]
    bad = _patched(mmproj, tmp_path / "mmproj.gguf", [(at, struct.pack("<Q", dim // 3))])
    with pytest.raises(ModelLoadError, match=r"tensor 'v.blk.0.attn_qkv.weight' has shape .* metadata implies"):
        _load(model, bad)


def test_projector_key_of_the_wrong_type_is_refused(gguf_pair, tmp_path):
    # clip reads it with gguf_get_val_u32, which asserts the type (an abort).
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    at = gguf_fuzz.layout(mmproj).keys["clip.vision.patch_size"]
    bad = _patched(mmproj, tmp_path / "mmproj.gguf", [(at, struct.pack("<I", 5))])  # uint32 -> int32
    with pytest.raises(ModelLoadError, match="'clip.vision.patch_size' has GGUF type 5, expected 4"):
        _load(model, bad)


def test_norm_weight_of_an_integer_type_is_refused(gguf_pair, tmp_path):
    # llama.cpp loads it, then ggml aborts in the first multiplication.
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    at = gguf_fuzz.layout(model).tensor("output_norm.weight")["type"]
    bad = _patched(model, tmp_path / "model.gguf", [(at, struct.pack("<I", 26))])  # F32 -> I32, same size
    with pytest.raises(ModelLoadError, match="tensor 'output_norm.weight' .* has a type \\(id 26\\)"):
        _load(bad, mmproj)


def test_vocabulary_with_a_repeated_token_is_refused(gguf_pair, tmp_path):
    # llama.cpp asserts id_to_token.size() == token_to_id.size().
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    data = model.read_bytes()
    first = data.index(struct.pack("<Q", 1) + b"!")  # token "!" (id 0 of the byte-level vocabulary)
    second = data.index(struct.pack("<Q", 1) + b'"', first)
    bad = _patched(model, tmp_path / "model.gguf", [(second + 8, b"!")])
    with pytest.raises(ModelLoadError, match="in the vocabulary twice"):
        _load(bad, mmproj)


def test_text_model_without_mrope_sections_refuses_a_projector(gguf_pair, tmp_path):
    # A text-only GLM-4 conversion: llama.cpp aborts at the first image ("does not support multimodal").
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    data = model.read_bytes()
    at = data.index(b"glm4.rope.dimension_sections")
    bad = _patched(model, tmp_path / "model.gguf", [(at, b"glm4.rope.dimension_sectionX")])
    with pytest.raises(ModelLoadError, match="no M-RoPE sections"):
        _load(bad, mmproj)
    with Session(bad, n_ctx=256) as s:  # still fine for text
        assert s.generate(["hello"], GenerationConfig(max_tokens=2)).finish_reason in ("length", "stop")


def test_absurd_layer_count_is_refused(gguf_pair, tmp_path):
    # llama_model::load_hparams asserts 0 < block_count <= LLAMA_MAX_LAYERS.
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    at = gguf_fuzz.layout(model).keys["glm4.block_count"]
    bad = _patched(model, tmp_path / "model.gguf", [(at + 4, struct.pack("<I", 100_000))])
    with pytest.raises(ModelLoadError, match="block_count=100000"):
        _load(bad, mmproj)


def test_mrope_sections_larger_than_the_rotated_dimensions_are_refused(gguf_pair, tmp_path):
    # ggml_mrope_cache_init asserts sum(sections) <= n_rot, at the first image.
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    data = model.read_bytes()
    at = data.index(b"glm4.rope.dimension_sections") + len(b"glm4.rope.dimension_sections") + 4 + 4 + 8
    bad = _patched(model, tmp_path / "model.gguf", [(at + 8, struct.pack("<i", 246))])  # the third section
    with pytest.raises(ModelLoadError, match="dimension_sections .* do not fit"):
        _load(bad, mmproj)


def test_projector_block_count_beyond_its_tensors_is_refused_quickly(gguf_pair, tmp_path):
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    at = gguf_fuzz.layout(mmproj).keys["clip.vision.block_count"]
    bad = _patched(mmproj, tmp_path / "mmproj.gguf", [(at + 4, struct.pack("<I", 8_000_000))])
    with pytest.raises(ModelLoadError, match="block_count is"):
        _load(model, bad)


def test_type_table_matches_gguf_py():
    import gguf

    assert GGML_TYPE_SIZES == {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}


def test_clip_key_types_match_the_engine_source():
    """CLIP_KEY_TYPES lists every key clip.cpp reads with an asserting scalar getter, with its type."""
    root = reference.llama_cpp_dir() / "tools" / "mtmd"
    macros = dict(re.findall(r'#define (KEY_\w+)\s+"([^"]+)"', (root / "clip-impl.h").read_text()))
    gguf_type = {"u32": 4, "i32": 5, "f32": 6, "bool": 7, "string": 8}
    found: dict[str, int] = {}
    for getter, macro in re.findall(r"\bget_(u32|i32|f32|bool|string)\((?:string_format\()?(KEY_\w+)",
                                    (root / "clip.cpp").read_text()):
        key = macros[macro]
        for k in [key % p for p in ("vision", "audio")] if "%s" in key else [key]:
            found[k] = gguf_type[getter]
    assert found == CLIP_KEY_TYPES
