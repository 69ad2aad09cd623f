"""Tests of glm4v_mtmd.convert, the torch-free Hugging Face -> GGUF converter.

* parity: for tiny random checkpoints of both architectures the converter's files must equal
  llama.cpp's own convert_hf_to_gguf.py output (same metadata keys/types/values/order, tensor
  names/types/shapes/bytes, in fact the same bytes) for f32, f16, bf16 and q8_0, plus variants
  (sharded MoE with many layers/experts, transformers-5 config layout with BF16 weights,
  a NextN layer with a model card);
* streaming: chunked conversion gives the same bytes, and peak traced memory stays a small
  multiple of the largest source tensor (and far below a stacked MoE expert tensor);
* bad input: ConversionError naming the file and the problem, and nothing left in outdir.

The llama.cpp tree comes from $GLM4V_LLAMA_CPP_DIR (else tests/reference.py's pinned default);
its absence is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import reference
import tiny_models
from gguf import GGUFReader

from glm4v_mtmd.convert import ENGINE_OUTTYPES, FLOAT_OUTTYPES, _writer, convert
from glm4v_mtmd.convert._source import SourceTensor, index_checkpoint
from glm4v_mtmd.errors import ConversionError

ARCHS = ("glm4v", "glm4v_moe")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_cpp_tree() -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py ($GLM4V_LLAMA_CPP_DIR); missing is a failure."""
    try:
        return reference.llama_cpp_dir()
    except FileNotFoundError as exc:
        pytest.fail(f"llama.cpp reference converter not found ({exc}); set ${reference.LLAMA_CPP_DIR_ENV}")


class _Checkpoints:
    """Session cache of tiny checkpoints and reference conversions, keyed by variant name."""

    VARIANTS: dict[str, dict] = {
        "glm4v": dict(arch="glm4v"),
        "glm4v_moe": dict(arch="glm4v_moe"),
        # 11 layers: lexicographic shard order (layers.10 before layers.2); many small shards with an index;
        # experts of a layer spread over several shards; 2 leading dense layers; BF16 weights
        "moe_sharded": dict(
            arch="glm4v_moe",
            dtype="bfloat16",
            num_hidden_layers=11,
            n_routed_experts=8,
            first_k_dense_replace=2,
            max_shard_size="20KB",
        ),
        # what transformers 5 writes (rope_parameters), F16 weights
        "glm4v_v5_f16": dict(arch="glm4v", dtype="float16", config_style="v5", num_hidden_layers=3),
    }

    def __init__(self, root: Path, tree: Path):
        self.root, self.tree = root, tree
        self._refs: dict[tuple[str, str], tuple[Path, Path]] = {}

    def hf(self, variant: str) -> Path:
        d = self.root / variant / "hf"
        if not (d / "config.json").exists():
            if variant == "moe_nextn_card":
                _make_nextn_card_variant(self.hf("glm4v_moe"), d)
            else:
                spec = dict(self.VARIANTS[variant])
                tiny_models.make_checkpoint(d, spec.pop("arch"), **spec)
        return d

    def ref(self, variant: str, outtype: str) -> tuple[Path, Path]:
        key = (variant, outtype)
        if key not in self._refs:
            self._refs[key] = reference.run_reference_converter(
                self.hf(variant), self.root / variant / f"ref-{outtype}", outtype, llama_cpp=self.tree
            )
        return self._refs[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, llama_cpp_tree) -> _Checkpoints:
    return _Checkpoints(tmp_path_factory.mktemp("convert-ckpts"), llama_cpp_tree)


def _make_nextn_card_variant(src: Path, dst: Path) -> None:
    """glm4v_moe checkpoint + one NextN/MTP layer in a second shard (indexed) + a README model card."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    n, h = cfg["text_config"]["num_hidden_layers"], cfg["text_config"]["hidden_size"]
    main = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    extra = {
        k.replace(f"layers.{n - 1}.", f"layers.{n}."): torch.randn(v.shape, generator=g).to(v.dtype)
        for k, v in main.items()
        if k.startswith(f"model.language_model.layers.{n - 1}.")
    }
    p = f"model.language_model.layers.{n}."
    extra[p + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        extra[p + norm + ".weight"] = torch.randn(h, generator=g)
    save_file(extra, dst / "model-mtp.safetensors", metadata={"format": "pt"})
    (dst / "model.safetensors").rename(dst / "model-main.safetensors")
    weight_map = {
        **{k: "model-main.safetensors" for k in main},
        **{k: "model-mtp.safetensors" for k in extra},
    }
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg["text_config"]["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "README.md").write_text(
        "---\nlicense: mit\nlanguage:\n- en\n- zh\nbase_model:\n- zai-org/GLM-4.5-Air-Base\n"
        "pipeline_tag: image-text-to-text\ntags:\n- glm\n- vision\n---\n# tiny\n"
    )


# ----------------------------------------------------------------------------------------------------------
# GGUF comparison
# ----------------------------------------------------------------------------------------------------------


def _fields(r: GGUFReader) -> list[tuple[str, list[str], object]]:
    return [
        (k, [t.name for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")
    ]


def gguf_differences(mine: Path, ref: Path) -> list[str]:
    """Human-readable differences between two GGUF files (empty when equivalent)."""
    a, b = GGUFReader(mine), GGUFReader(ref)
    fa, fb = _fields(a), _fields(b)
    diffs = []
    if [k for k, _, _ in fa] != [k for k, _, _ in fb]:
        diffs.append(f"metadata keys differ:\n mine={[k for k, _, _ in fa]}\n ref ={[k for k, _, _ in fb]}")
    fb_map = {k: (t, v) for k, t, v in fb}
    for k, t, v in fa:
        if k in fb_map and fb_map[k] != (t, v):
            diffs.append(f"metadata {k}: {t} {str(v)[:120]} != {fb_map[k][0]} {str(fb_map[k][1])[:120]}")
    ta = [(t.name, t.tensor_type.name, [int(x) for x in t.shape]) for t in a.tensors]
    tb = [(t.name, t.tensor_type.name, [int(x) for x in t.shape]) for t in b.tensors]
    if ta != tb:
        diffs.append(f"tensor infos differ:\n mine={ta}\n ref ={tb}")
    ref_data = {t.name: t for t in b.tensors}
    for t in a.tensors:
        u = ref_data.get(t.name)
        if u is not None and t.data.tobytes() != u.data.tobytes():
            diffs.append(f"tensor data differs: {t.name}")
    if not diffs and mine.read_bytes() != ref.read_bytes():
        diffs.append("files differ in bytes although fields and tensors match (alignment/padding?)")
    return diffs


def _assert_parity(mine: tuple[Path, Path], ref: tuple[Path, Path]) -> None:
    for m, r in zip(mine, ref):
        diffs = gguf_differences(m, r)
        assert not diffs, f"{m.name} vs reference {r.name}:\n" + "\n".join(diffs[:20])


# ----------------------------------------------------------------------------------------------------------
# parity with llama.cpp's converter
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_reference(checkpoints, tmp_path, arch, outtype):
    hf = checkpoints.hf(arch)
    mine = convert(hf, tmp_path, outtype, progress=False)
    assert [p.name for p in mine] == [f"hf-{outtype.upper()}.gguf", f"mmproj-hf-{outtype.upper()}.gguf"]
    _assert_parity(mine, checkpoints.ref(arch, outtype))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "outtype"),
    [
        ("moe_sharded", "q8_0"),
        ("moe_sharded", "bf16"),
        ("glm4v_v5_f16", "f16"),
        ("glm4v_v5_f16", "q8_0"),
        ("moe_nextn_card", "f16"),
    ],
)
def test_parity_variants(checkpoints, tmp_path, variant, outtype):
    mine = convert(checkpoints.hf(variant), tmp_path, outtype, progress=False)
    _assert_parity(mine, checkpoints.ref(variant, outtype))


def test_glm4v_specifics(checkpoints, tmp_path):
    """Spot checks of what parity implies, with readable failures: M-RoPE sections, Q/K permutation,
    Conv3d split, f32-kept tensors, special tokens."""
    hf = checkpoints.hf("glm4v")
    text, mmproj = convert(hf, tmp_path, "f32", progress=False)
    r = GGUFReader(text)
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.architecture"] == "glm4"
    assert fields["glm4.rope.dimension_sections"] == [2, 1, 1, 0]
    assert fields["tokenizer.ggml.pre"] == "glm4"
    ids = tiny_models.token_ids(hf)
    assert fields["tokenizer.ggml.eos_token_id"] == ids["<|endoftext|>"]
    assert fields["tokenizer.ggml.bos_token_id"] == ids["<|endoftext|>"]
    assert fields["tokenizer.ggml.eot_token_id"] == ids["<|user|>"]

    src = index_checkpoint(hf.resolve())
    q = src["model.language_model.layers.0.self_attn.q_proj.weight"].read()
    head_dim, rot = 16, 8
    expect = q.reshape(-1, head_dim, q.shape[-1])
    expect = np.concatenate([expect[:, :rot:2], expect[:, 1:rot:2], expect[:, rot:]], axis=1).reshape(q.shape)
    got = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data
    np.testing.assert_array_equal(np.asarray(got).reshape(q.shape), expect)

    m = GGUFReader(mmproj)
    mf = {k: f.contents() for k, f in m.fields.items()}
    assert mf["clip.projector_type"] == "glm4v"
    assert mf["clip.vision.image_mean"] == pytest.approx(tiny_models.PREPROCESSOR_CONFIG["image_mean"])
    conv = src["model.visual.patch_embed.proj.weight"].read()
    tensors = {t.name: t for t in m.tensors}
    for name, t in (("v.patch_embd.weight", 0), ("v.patch_embd.weight.1", 1)):
        np.testing.assert_array_equal(
            np.asarray(tensors[name].data).reshape(conv[:, :, t].shape), conv[:, :, t]
        )
    assert tensors["v.position_embd.weight"].tensor_type.name == "F32"


def test_moe_specifics(checkpoints, tmp_path):
    hf = checkpoints.hf("glm4v_moe")
    text, _ = convert(hf, tmp_path, "f16", progress=False)
    r = GGUFReader(text)
    fields = {k: f.contents() for k, f in r.fields.items()}
    ids = tiny_models.token_ids(hf)
    assert fields["general.architecture"] == "glm4moe"
    assert fields["tokenizer.ggml.bos_token_id"] == ids["[gMASK]"]
    assert fields["tokenizer.ggml.eom_token_id"] == ids["<|observation|>"]
    tensors = {t.name: t for t in r.tensors}
    exps = tensors["blk.1.ffn_gate_exps.weight"]
    assert [int(x) for x in exps.shape] == [64, 32, 4]
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    src = index_checkpoint(hf.resolve())
    e2 = src["model.language_model.layers.1.mlp.experts.2.gate_proj.weight"].read().astype(np.float16)
    np.testing.assert_array_equal(np.asarray(exps.data)[2], e2)


# ----------------------------------------------------------------------------------------------------------
# streaming and memory
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_chunked_writing_is_identical(checkpoints, tmp_path, monkeypatch, outtype):
    hf = checkpoints.hf("glm4v_moe")
    whole = convert(hf, tmp_path / "whole", outtype, progress=False)
    monkeypatch.setattr(_writer, "CHUNK_ELEMENTS", 100)  # a few rows per chunk
    chunked = convert(hf, tmp_path / "chunked", outtype, progress=False)
    for a, b in zip(whole, chunked):
        assert a.read_bytes() == b.read_bytes()


def _peak_traced(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="session")
def many_layers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert-mem")
    dense = tiny_models.make_checkpoint(
        root / "dense", "glm4v", num_hidden_layers=16, hidden_size=256, intermediate_size=1024
    )
    moe = tiny_models.make_checkpoint(
        root / "moe",
        "glm4v_moe",
        dtype="bfloat16",
        num_hidden_layers=4,
        hidden_size=128,
        n_routed_experts=64,
        moe_intermediate_size=256,
    )
    return {"dense": dense, "moe": moe}


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_peak_memory_dense(many_layers, tmp_path, outtype):
    hf = many_layers["dense"]
    src = index_checkpoint(hf.resolve())
    largest = max(t.n_elements for t in src.values()) * 4
    total = sum(t.n_elements for t in src.values()) * 4
    assert total > 20 * largest  # many equal-size layers
    peak = _peak_traced(lambda: convert(hf, tmp_path, outtype, progress=False))
    assert peak < 3 * largest, f"peak {peak} B vs largest tensor {largest} B (total {total} B)"


def test_peak_memory_moe_experts_not_stacked_in_memory(many_layers, tmp_path):
    hf = many_layers["moe"]
    src = index_checkpoint(hf.resolve())
    stacked = 64 * 256 * 128 * 4  # one float32 ffn_*_exps tensor
    largest = max(t.n_elements for t in src.values()) * 4
    peak = _peak_traced(lambda: convert(hf, tmp_path, "q8_0", progress=False))
    assert peak < stacked / 2, f"peak {peak} B vs stacked expert tensor {stacked} B"
    assert peak < 4 * largest + (1 << 20)


# ----------------------------------------------------------------------------------------------------------
# engine quantization seam, CLI
# ----------------------------------------------------------------------------------------------------------


def test_engine_outtype_uses_quantizer_hook(checkpoints, tmp_path):
    calls = []

    def fake_quantize(src: str, dst: str, ftype: str, n_threads: int) -> None:
        calls.append((src, dst, ftype, n_threads, GGUFReader(src).fields["general.file_type"].contents()))
        shutil.copyfile(src, dst)

    text, mmproj = convert(
        checkpoints.hf("moe_sharded"),
        tmp_path,
        "Q4_K_M",
        progress=False,
        quantizer=fake_quantize,
        quantize_threads=3,
    )
    assert (text.name, mmproj.name) == ("hf-Q4_K_M.gguf", "mmproj-hf-F16.gguf")
    [(src, dst, ftype, n_threads, src_ftype)] = calls
    assert (ftype, n_threads) == ("Q4_K_M", 3)
    assert src_ftype == 32  # BF16 checkpoint -> lossless BF16 intermediate
    assert not Path(src).exists() and not Path(dst).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mmproj.name, text.name])
    assert set(ENGINE_OUTTYPES).isdisjoint(FLOAT_OUTTYPES)


def test_engine_outtype_mmproj_override(checkpoints, tmp_path):
    _, mmproj = convert(
        checkpoints.hf("glm4v"),
        tmp_path,
        "q6_k",
        "q8_0",
        progress=False,
        quantizer=lambda s, d, f, n: shutil.copyfile(s, d),
    )
    assert mmproj.name == "mmproj-hf-Q8_0.gguf"


def test_cli_main_prints_paths(checkpoints, tmp_path, capsys):
    from glm4v_mtmd.convert import cli

    rc = cli.main(
        [str(checkpoints.hf("glm4v")), "--outdir", str(tmp_path), "--outtype", "BF16", "--no-progress"]
    )
    out = capsys.readouterr().out.split()
    assert rc == 0 and out == [str(tmp_path / "hf-BF16.gguf"), str(tmp_path / "mmproj-hf-BF16.gguf")]
    assert cli.main([str(checkpoints.hf("glm4v")), "--outdir", str(tmp_path / "x"), "--outtype", "q9"]) == 1
    assert "q4_k_m" in capsys.readouterr().err

    import argparse

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "HF", "--outtype", "q4_k_m", "--mmproj-outtype", "f16"])
    assert (args.func, args.hf_dir, args.outtype, args.mmproj_outtype) == (cli.run, "HF", "q4_k_m", "f16")


def test_converter_imports_neither_torch_nor_transformers(checkpoints, tmp_path):
    code = (
        "import sys; from glm4v_mtmd.convert import convert; "
        f"convert({str(checkpoints.hf('glm4v_moe'))!r}, {str(tmp_path)!r}, 'q8_0', progress=False); "
        "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    # cwd: outside the source tree, so the installed package (with its compiled module) is imported
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _failing_quantizer(src: str, dst: str, ftype: str, n_threads: int) -> None:
    raise RuntimeError("boom")


def _first_shard(d: Path, n: int = 0) -> Path:
    return sorted(d.glob("model-0*.safetensors"))[n]


BAD_INPUTS = {
    # name: (mutation of a copy of the sharded MoE checkpoint, convert kwargs, expected file, message parts)
    "no_config": (lambda d: (d / "config.json").unlink(), {}, "config.json", ["not found"]),
    "unsupported_model_type": (
        lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type="qwen2_5_vl")),
        {},
        "config.json",
        ["unsupported model_type", "qwen2_5_vl", "glm4v_moe"],
    ),
    "missing_shard": (
        lambda d: _first_shard(d, 3).unlink(),
        {},
        "model.safetensors.index.json",
        ["missing shard", "model-00004-of-"],
    ),
    "text_shape_mismatch": (
        lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(intermediate_size=100)),
        {},
        ".safetensors",
        ["down_proj", "shape", "config.json", "100"],
    ),
    "vision_shape_mismatch": (
        lambda d: _edit_json(d / "config.json", lambda c: c["vision_config"].update(hidden_size=32)),
        {},
        ".safetensors",
        ["visual", "shape", "config.json"],
    ),
    "expert_count_mismatch": (
        lambda d: _edit_json(d / "config.json", lambda c: c["text_config"].update(n_routed_experts=6)),
        {},
        "",
        ["expert"],
    ),
    "truncated_shard": (
        lambda d: _first_shard(d, -1).write_bytes(_first_shard(d, -1).read_bytes()[:-64]),
        {},
        ".safetensors",
        ["truncated"],
    ),
    "missing_tokenizer": (lambda d: (d / "tokenizer.json").unlink(), {}, "tokenizer.json", ["not found"]),
    "missing_image_mean": (
        lambda d: _edit_json(d / "preprocessor_config.json", lambda c: c.pop("image_mean")),
        {},
        "preprocessor_config.json",
        ["image_mean"],
    ),
    "unknown_outtype": (lambda d: None, {"outtype": "q9_9"}, "", ["q9_9", "f16", "bf16", "q8_0", "q4_k_m"]),
    "unknown_mmproj_outtype": (lambda d: None, {"mmproj_outtype": "q4_k_m"}, "", ["mmproj", "f16", "q8_0"]),
    "engine_quantizer_fails": (
        lambda d: None,
        {"outtype": "q4_k_m", "quantizer": _failing_quantizer},
        "",
        ["Q4_K_M", "boom"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(checkpoints, tmp_path, case):
    mutate, kwargs, file_part, message_parts = BAD_INPUTS[case]
    hf = tmp_path / "hf"
    shutil.copytree(checkpoints.hf("moe_sharded"), hf)
    mutate(hf)
    out = tmp_path / "out"
    kwargs = {"outtype": "f16", **kwargs}
    with pytest.raises(ConversionError) as info:
        convert(hf, out, progress=False, **kwargs)
    msg = str(info.value)
    if file_part:
        assert file_part in msg and str(hf) in msg, msg
    for part in message_parts:
        assert part in msg, msg
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_not_a_directory(tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """A read error in the middle of the data pass (here: of the mmproj, after the text file is done)."""
    calls = {"n": 0}
    real = SourceTensor.read_rows

    def flaky(self, start, stop):
        if self.name.startswith("model.visual.blocks.1"):
            raise ConversionError(f"{self.file}: simulated read error")
        calls["n"] += 1
        return real(self, start, stop)

    monkeypatch.setattr(SourceTensor, "read_rows", flaky)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="simulated"):
        convert(checkpoints.hf("glm4v"), out, "q8_0", progress=False)
    assert calls["n"] > 0 and list(out.iterdir()) == []


def test_interrupt_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    def interrupt(self, start, stop):
        raise KeyboardInterrupt

    monkeypatch.setattr(SourceTensor, "read_rows", interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoints.hf("glm4v"), out, "f16", progress=False)
    assert list(out.iterdir()) == []


def test_existing_outputs_replaced_only_on_success(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "hf-F16.gguf").write_bytes(b"old")
    with pytest.raises(ConversionError):
        convert(checkpoints.hf("glm4v"), out, "f16", "q4_k_m", progress=False)
    assert (out / "hf-F16.gguf").read_bytes() == b"old"
    text, _ = convert(checkpoints.hf("glm4v"), out, "f16", progress=False)
    assert text.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in out.iterdir()) == ["hf-F16.gguf", "mmproj-hf-F16.gguf"]


def test_relative_paths(checkpoints, tmp_path, monkeypatch):
    """Relative paths and a trailing slash name the files after the checkpoint directory."""
    hf = checkpoints.hf("glm4v")
    monkeypatch.chdir(hf.parent)
    text, mmproj = convert("hf/", os.path.relpath(tmp_path), "f16", progress=False)
    assert text.name == "hf-F16.gguf" and mmproj.name == "mmproj-hf-F16.gguf"
