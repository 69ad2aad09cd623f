"""The engine's CPU feature report and the float type chosen from it."""

from __future__ import annotations

import glm4v_mtmd
from glm4v_mtmd._cpu import parse_system_info, preferred_float_type


def test_parse_takes_only_enabled_cpu_features():
    text = ("CUDA : ARCHS = 900 | USE_GRAPHS = 1 | CPU : SSE3 = 1 | AVX2 = 1 | AVX512_BF16 = 1 | "
            "SVE_CNT = 16 | LLAMAFILE = 1 | OPENMP = 0 |")
    assert parse_system_info(text) == {"SSE3", "AVX2", "AVX512_BF16", "LLAMAFILE"}


def test_parse_tolerates_empty_and_odd_text():
    assert parse_system_info("") == frozenset()
    assert parse_system_info("no features here") == frozenset()


def test_preferred_float_type_needs_bf16_dot_products():
    assert preferred_float_type(frozenset({"AVX2", "F16C"})) == "f16"
    assert preferred_float_type(frozenset({"AVX512", "AVX512_BF16"})) == "bf16"
    assert preferred_float_type(frozenset({"NEON", "FP16_VA"})) == "f16"


def test_this_engine_reports_its_features():
    feats = glm4v_mtmd.cpu_features()
    info = glm4v_mtmd.engine_info()["system_info"]
    assert feats, info  # every CPU build reports at least its SIMD level or OPENMP/LLAMAFILE
    assert all(f"{f} = 1" in info for f in feats)
    assert glm4v_mtmd.preferred_float_type() == ("bf16" if "AVX512_BF16" in feats else "f16")


def test_precision_advice_only_for_bf16_weights_without_bf16_kernels():
    from glm4v_mtmd._cpu import GGML_BF16, GGML_F16, precision_advice

    no_bf16, bf16 = frozenset({"AVX2", "F16C"}), frozenset({"AVX512_BF16"})
    assert "F16" in precision_advice([GGML_BF16] * 3 + [GGML_F16], no_bf16)
    assert precision_advice([GGML_BF16] * 3, bf16) is None
    assert precision_advice([GGML_F16] * 3 + [GGML_BF16], no_bf16) is None
    assert precision_advice([], no_bf16) is None


def test_session_warns_about_a_bf16_projector_on_a_cpu_without_bf16(gguf_pair, monkeypatch, caplog):
    import logging

    import glm4v_mtmd._cpu as cpu

    model, mmproj = gguf_pair("glm4v", 0, "bf16")
    monkeypatch.setattr(cpu, "cpu_features", lambda: frozenset({"AVX2", "F16C"}))
    with caplog.at_level(logging.WARNING, logger="glm4v_mtmd"):
        glm4v_mtmd.Session(model, mmproj, n_ctx=128, n_threads=1).close()
    assert any("BF16 weights run slowly" in r.getMessage() and str(mmproj) in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(cpu, "cpu_features", lambda: frozenset({"AVX512_BF16"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glm4v_mtmd"):
        glm4v_mtmd.Session(model, mmproj, n_ctx=128, n_threads=1).close()
    assert not any("BF16 weights" in r.getMessage() for r in caplog.records)
