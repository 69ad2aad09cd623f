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


@pytest.mark.parametrize("arch", ARCHS)
def test_every_numeric_metadata_value_at_its_edges_never_crashes_the_process(arch, gguf_pair, tmp_path, capsys):
    """Each numeric key of both files (and each element of short numeric arrays) at 0, -1, 1, 7, 2^16,
    2^16+1, 2^31-1, 2^31, the type's max-1 and max, NaN, +-inf, +-tiny and 1e30, one at a time."""
    model, mmproj = gguf_pair(arch, outtype="f16")
    cases = (gguf_fuzz.value_mutations("model", gguf_fuzz.layout(model))
             + gguf_fuzz.value_mutations("mmproj", gguf_fuzz.layout(mmproj)))
    outcome = gguf_fuzz.run_cases(cases, model, mmproj, tmp_path / "fuzz", hang_s=30.0)
    with capsys.disabled():
        print(f"\n[{arch}] edge values: {outcome.summary(len(cases))}")
    assert not outcome.crashes, outcome.summary(len(cases)) + "\n" + "\n".join(outcome.crashes)
    assert not outcome.untyped, "\n".join(outcome.untyped)
    assert len(cases) > 300 and outcome.counts.get("loaded-and-ran", 0) > 0


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
    with pytest.raises(ModelLoadError, match="dimension_sections = .* must be >= 0 and fit the rotated dimensions"):
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


@pytest.mark.parametrize("key, fmt, value, rule", [
    ("attention.layer_norm_rms_epsilon", "<f", -1.0, "finite number >= 0"),
    ("attention.layer_norm_rms_epsilon", "<f", -1e-30, "finite number >= 0"),
    ("attention.layer_norm_rms_epsilon", "<f", float("nan"), "finite number >= 0"),
    ("attention.layer_norm_rms_epsilon", "<f", float("-inf"), "finite number >= 0"),
    ("rope.dimension_count", "<I", 7, "even"),
    ("rope.dimension_count", "<I", 4294967295, "even"),
    ("rope.dimension_count", "<I", 65536, "within 2..the attention head size"),
    ("rope.dimension_count", "<I", 65537, "even"),
    ("rope.dimension_count", "<I", 2147483647, "even"),
    ("rope.dimension_count", "<I", 4294967294, "within 2"),  # hung: negative as the kernels' int
    ("rope.dimension_count", "<I", 0, "within 2"),  # hung the same way
    ("attention.head_count_kv", "<I", 3, "divide attention.head_count"),
    ("attention.head_count_kv", "<I", 0, "positive"),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_text_hyperparameters_that_aborted_or_hung_are_refused_by_name(arch, key, fmt, value, rule, gguf_pair,
                                                                       tmp_path):
    model, mmproj = gguf_pair(arch, outtype="f16")
    prefix = "glm4" if arch == "glm4v" else "glm4moe"
    at = gguf_fuzz.layout(model).keys[f"{prefix}.{key}"]
    bad = _patched(model, tmp_path / "model.gguf", [(at + 4, struct.pack(fmt, value))])
    with pytest.raises(ModelLoadError, match=re.escape(f"{prefix}.{key} = ") + ".*" + re.escape(rule)):
        _load(bad, mmproj)


def test_moe_gating_function_outside_the_engines_enum_is_refused(gguf_pair, tmp_path):
    model, mmproj = gguf_pair("glm4v_moe", outtype="f16")
    at = gguf_fuzz.layout(model).keys["glm4moe.expert_gating_func"]
    bad = _patched(model, tmp_path / "model.gguf", [(at + 4, struct.pack("<I", 5))])
    with pytest.raises(ModelLoadError, match=r"glm4moe.expert_gating_func = 5 \(must be one of 0, 1, 2, 3, 4\)"):
        _load(bad, mmproj)


def _source_keys(arch_enum: str, arch_file: str, arch_class: str) -> set[str]:
    """The metadata keys the pinned engine's load_hparams reads for one architecture.

    The common part (llama_model_base::load_hparams, without the `if (arch == OTHER)` blocks) and the
    architecture's own load_arch_hparams; every ml.get_key / get_key_or_arr / get_arr call, its LLM_KV
    enum resolved through LLM_KV_NAMES. Every get_* call of both bodies must be matched.
    """
    src = reference.llama_cpp_dir() / "src"
    arch_cpp = (src / "llama-arch.cpp").read_text()
    arch_name = dict(re.findall(r'\{\s*(LLM_ARCH_\w+)\s*,\s*"([^"]+)"\s*\}', arch_cpp))[arch_enum]
    table = arch_cpp[arch_cpp.index("LLM_KV_NAMES = {"):]
    kv_names = dict(re.findall(r'\{\s*(LLM_KV_\w+)\s*,\s*"([^"]+)"\s*\}', table[:table.index("};")]))

    def body(text: str, signature: str) -> str:
        i = text.index("{", text.index(signature))
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j + 1]
        raise AssertionError(f"unbalanced braces after {signature}")

    def without_other_archs(text: str) -> str:
        out, pos = [], 0
        for m in re.finditer(r"if\s*\(([^{;]*\barch\s*==[^{;]*)\)\s*\{", text):
            if m.start() < pos:
                continue
            block = body(text, text[m.start():m.end()])
            if not re.search(rf"\b{arch_enum}\b", m.group(1)):
                out.append(text[pos:m.start()])
                pos = m.end() - 1 + len(block)
        return "".join(out) + text[pos:]

    call = re.compile(r"\bml\.(?:get_key_or_arr|get_key|get_arr_n|get_arr)\s*\(\s*(LLM_KV_\w+)\s*,")
    keys: set[str] = set()
    for text in (without_other_archs(body((src / "llama-model.cpp").read_text(),
                                          "void llama_model_base::load_hparams(")),
                 body((src / "models" / arch_file).read_text(), f"void {arch_class}::load_arch_hparams(")):
        found = call.findall(text)
        assert len(found) == len(re.findall(r"\bget_(?:key_or_arr|key|arr_n|arr)\s*\(", text))
        keys |= {kv_names[k] % arch_name if "%s" in kv_names[k] else kv_names[k] for k in found}
    return keys


@pytest.mark.parametrize("arch_enum, arch_file, arch_class, prefix", [
    ("LLM_ARCH_GLM4", "glm4.cpp", "llama_model_glm4", "glm4"),
    ("LLM_ARCH_GLM4_MOE", "glm4-moe.cpp", "llama_model_glm4_moe", "glm4moe"),
])
def test_text_key_rules_cover_every_key_the_engine_reads(arch_enum, arch_file, arch_class, prefix):
    """A key a future engine pin starts reading fails here until _validate.py has a rule for it."""
    from glm4v_mtmd._validate import MOE_KEY_RULES, RULE_TEXT, TEXT_KEY_RULES

    rules = {**TEXT_KEY_RULES, **(MOE_KEY_RULES if prefix == "glm4moe" else {})}
    assert _source_keys(arch_enum, arch_file, arch_class) == {"general.name"} | {f"{prefix}.{k}" for k in rules}
    assert set(rules.values()) <= set(RULE_TEXT) | {"engine", "unused"}


def _checked(model: pathlib.Path, arch: str, **changes: object) -> None:
    """check_text_model on the file's header with some metadata values replaced (keys absent from the tiny
    files: their rules are tested on the parsed header)."""
    import dataclasses

    from glm4v_mtmd._gguf_probe import read_header
    from glm4v_mtmd._validate import check_text_model

    header = read_header(model)
    meta = {**header.metadata, **{k.replace("__", "."): v for k, v in changes.items()}}
    check_text_model(dataclasses.replace(header, metadata=meta), arch, with_projector=True)


@pytest.mark.parametrize("key, value, match", [
    ("attention.causal", False, "attention.causal = False (must be true"),
    ("rope.scaling.type", "cubic", "rope.scaling.type = 'cubic' (must be one of none, linear, yarn, longrope)"),
    ("rope.freq_base", float("nan"), "rope.freq_base = nan (must be a finite number > 0)"),
    ("rope.freq_base", 0.0, "rope.freq_base = 0.0 (must be a finite number > 0)"),
    ("rope.scaling.factor", float("-inf"), "rope.scaling.factor = -inf (must be a finite number >= 0)"),
    ("rope.scaling.attn_factor", float("inf"), "rope.scaling.attn_factor = inf (must be a finite number)"),
    ("context_length", 0, "context_length = 0 (must be a positive integer)"),
    ("attention.key_length", 7, "attention.key_length = .* attention.key_length equal to attention.value_length"),
    ("rope.dimension_sections", 1 << 20, "dimension_sections = .* fit the rotated dimensions"),  # a scalar fills 4
])
def test_text_rules_of_keys_the_tiny_files_do_not_carry(gguf_pair, key, value, match):
    model, _ = gguf_pair("glm4v", outtype="f16")
    pattern = ".*".join(re.escape(part) for part in match.split(".*"))  # literal text around the wildcards
    with pytest.raises(ModelLoadError, match=pattern):
        _checked(model, "glm4", **{f"glm4.{key}": value})


def test_per_layer_counts_must_agree_across_layers(gguf_pair):
    from glm4v_mtmd._gguf_probe import GGUFArray, read_header

    model, _ = gguf_pair("glm4v", outtype="f16")
    moe, _ = gguf_pair("glm4v_moe", outtype="f16")
    meta = read_header(model).metadata
    n, heads, kv = meta["glm4.block_count"], meta["glm4.attention.head_count"], meta["glm4.attention.head_count_kv"]

    def layers(etype: int, *values: int) -> GGUFArray:
        return GGUFArray(etype, len(values), values)

    # An array of equal values is what a scalar means: accepted.
    _checked(model, "glm4", **{"glm4.attention.head_count": layers(4, *(heads,) * n)})
    with pytest.raises(ModelLoadError, match=r"glm4.attention.head_count = .* same for every layer"):
        _checked(model, "glm4", **{"glm4.attention.head_count": layers(4, heads, *(heads * 2,) * (n - 1))})
    with pytest.raises(ModelLoadError, match=r"glm4.attention.head_count_kv = .* same for every layer"):
        _checked(model, "glm4", **{"glm4.attention.head_count_kv": layers(4, *(kv,) * (n - 1), 1)})
    # INT32 -1 is 4294967295 to the engine, not a small number; a layer of 0 used experts left NULL views.
    mmeta = read_header(moe).metadata
    m, used = mmeta["glm4moe.block_count"], mmeta["glm4moe.expert_used_count"]
    with pytest.raises(ModelLoadError, match="experts"):
        _checked(moe, "glm4moe", **{"glm4moe.expert_used_count": layers(5, *(-1,) * m)})
    with pytest.raises(ModelLoadError, match="experts"):
        _checked(moe, "glm4moe", **{"glm4moe.expert_used_count": layers(4, used, *(0,) * (m - 1))})


def test_projector_norm_epsilon_must_be_finite_and_not_negative(gguf_pair, tmp_path):
    model, mmproj = gguf_pair("glm4v", outtype="f16")
    at = gguf_fuzz.layout(mmproj).keys["clip.vision.attention.layer_norm_epsilon"]
    bad = _patched(mmproj, tmp_path / "mmproj.gguf", [(at + 4, struct.pack("<f", -1.0))])
    with pytest.raises(ModelLoadError, match=r"clip.vision.attention.layer_norm_epsilon = -1.0 \(must be a finite"):
        _load(model, bad)
