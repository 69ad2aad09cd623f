"""The engine patches of csrc/patches: applied to the pinned build, and their code paths still match
the transformers reference.

0004 adds a packed BF16 GEMM to llamafile's sgemm (AVX512_BF16 CPUs, BF16 weights, batches of 64+
columns); test_packed_gemm_matches_reference[bf16] runs BF16 GGUFs with a 320-patch image and a 188-token
prompt against the reference (on other CPUs it checks the BF16 path they run).

0008 adds a packed F16 GEMM to the same sgemm for CPUs without AVX512 (AVX2 + F16C + FMA; F16 weights,
batches of 32+ columns); test_packed_gemm_matches_reference[f16] runs F16 GGUFs with the same image and
prompt (on AVX512 CPUs it checks the F16 path they run; tests/test_isa_avx2.py runs this file on an
engine built for AVX2 alone, where 0001, 0002 and 0008 run).

0001-0003 change ggml's tiled CPU flash-attention kernel (0002: the softmax scale on the Q tile,
vector row max and exponential sum; 0003: the same on AVX512, and B in registers in its GEMM), which
runs only for 64 or more query rows
(GGML_FA_TILE_Q): the parity tests' images have fewer patches and their prompts fewer tokens, so
this file makes an image of 10 x 10 patches (one full 64-row query tile and a 36-row tail; KV tiles
of 64 and 36 = four 8-key vector blocks and a 4-key scalar remainder) and a prompt of more than 64
tokens, and checks both against the reference with flash attention forced on and off. The weights
are F32 (our converter's exact mode) so that the F16 K/V of the attention are the only rounding;
the bounds are the default mode's (tests/tolerances.py), which cover F16 K/V.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import reference
import tolerances
from conftest import ARCHS, random_image, rel_l2

import glm4v_mtmd
from glm4v_mtmd import Session
from glm4v_mtmd.convert import convert

PATCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "patches"
IMG_10x10 = random_image(140, 140, seed=7)  # 10 x 10 patches of 14 px
LONG_PROMPT = [
    "[gMASK]<sop><|user|>\n", IMG_10x10,
    # (the wording matters only to glm4v_moe's routing: its margins must clear tolerances.ROUTER_MARGIN_MIN)
    "What is in this picture? Describe the objects, their colours and their positions, and say what happens."
    "<|assistant|>\n",
]


def test_pinned_build_lists_every_patch():
    info = glm4v_mtmd.engine_info()
    expected = sorted(p.name for p in PATCH_DIR.glob("*.patch"))
    assert expected, "csrc/patches holds no patch"
    if info["engine_origin"] == "user checkout":
        pytest.skip("built against a user checkout, which is never patched")
    assert info["patches"] == expected


@pytest.fixture(scope="module")
def fa_sessions(gguf_pair):
    """(flash attention on, off) sessions per arch: F32 GGUFs, the default F16 KV cache."""
    opened: dict[str, tuple[Session, Session]] = {}

    def get(arch: str) -> tuple[Session, Session]:
        if arch not in opened:
            model, mmproj = gguf_pair(arch, 0, "f32")
            opened[arch] = tuple(Session(model, mmproj, n_ctx=512, n_threads=2, flash_attn=fa) for fa in (True, False))
        return opened[arch]

    yield get
    for pair in opened.values():
        for s in pair:
            s.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiled_vision_attention_matches_reference(arch, fa_sessions, reference_model):
    expected = reference.reference_image_features(reference_model(arch), IMG_10x10, f16_conv=True)
    for session in fa_sessions(arch):
        emb = session.encode_image(IMG_10x10).array
        assert emb.shape == expected.shape == (25, emb.shape[1])
        rel = rel_l2(emb, expected)
        assert rel <= tolerances.EMBED_REL_L2_F16, f"relative L2 error {rel:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiled_prefill_attention_matches_reference(arch, fa_sessions, hf_checkpoint, reference_model):
    inputs = reference.build_inputs(hf_checkpoint(arch), LONG_PROMPT)
    assert inputs["input_ids"].shape[1] > 64  # at least one full query tile in the text model
    ref_logits, margin = reference.last_logits_and_router_margin(reference_model(arch), inputs)
    assert margin >= tolerances.ROUTER_MARGIN_MIN, f"routing margin {margin:.1e}: a tie within rounding; reword"
    for session in fa_sessions(arch):
        ev = session.evaluate(LONG_PROMPT)
        diff = float(np.max(np.abs(ev.logits - ref_logits)))
        assert diff <= tolerances.LOGITS_MAX_ABS_F16, f"max |logit difference| {diff:.2e}"


IMG_BATCH = random_image(280, 224, seed=3)  # 20 x 16 = 320 patches: every vision matmul has 320 columns
BATCH_PROMPT = [
    "[gMASK]<sop><|user|>\n", IMG_BATCH,
    "Describe this image in detail, please, with colours and objects. " * 3 + "<|assistant|>\n",
]
# (embedding, logits) bounds per weight type: tests/tolerances.py
BOUNDS = {"bf16": (tolerances.EMBED_REL_L2_BF16, tolerances.LOGITS_MAX_ABS_BF16),
          "f16": (tolerances.EMBED_REL_L2_F16, tolerances.LOGITS_MAX_ABS_F16)}


@pytest.mark.parametrize("outtype", sorted(BOUNDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_gemm_matches_reference(arch, outtype, gguf_pair, hf_checkpoint, reference_model):
    """0004 (bf16, AVX512_BF16) and 0008 (f16, AVX2 without AVX512): batched matmuls of both models."""
    embed_bound, logits_bound = BOUNDS[outtype]
    model, mmproj = gguf_pair(arch, 0, outtype)
    with Session(model, mmproj, n_ctx=1024, n_threads=2) as session:
        emb = session.encode_image(IMG_BATCH).array
        expected = reference.reference_image_features(reference_model(arch), IMG_BATCH, f16_conv=True)
        rel = rel_l2(emb, expected)
        assert rel <= embed_bound, f"relative L2 error {rel:.2e}"
        if arch != "glm4v":
            # glm4v_moe: rounding moves router scores past their margins (tolerances.LOGITS_MAX_ABS_BF16; at
            # F16, margins of 1e-5 to 5e-3 over a dozen images tried, under ROUTER_MARGIN_MIN): its logits may
            # follow another expert. Its embedding above runs the same vision matmuls.
            return
        inputs = reference.build_inputs(hf_checkpoint(arch), BATCH_PROMPT)
        assert inputs["input_ids"].shape[1] >= 64  # the text matmuls take the batched path too
        ref_logits = reference.reference_last_logits(reference_model(arch), inputs)
        diff = float(np.max(np.abs(session.evaluate(BATCH_PROMPT).logits - ref_logits)))
        assert diff <= logits_bound, f"max |logit difference| {diff:.2e}"


# 0009 and 0010 run the packed BF16 GEMM and the tiled flash attention's GEMMs on AMX tiles, where the
# build targets AMX (-march=native on such a CPU) and the process may use them; GGML_CPU_AMX_BF16=0 turns
# both off, so one build runs both paths, each in a child process (the switch is read once per process).
def _amx_bf16_build() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags and "AMX_INT8 = 1" in glm4v_mtmd.engine_info()["system_info"]


AMX_CHILD = r"""
import os, sys
if os.environ.get("GLM4V_MTMD_PACKAGE_DIR"):
    sys.path.insert(0, os.environ["GLM4V_MTMD_PACKAGE_DIR"])
import numpy as np
from glm4v_mtmd import Session
model, mmproj, images, out = sys.argv[1:5]
images = np.load(images)
with Session(model, mmproj, n_ctx=1024, n_threads=2, flash_attn=True) as s:
    embs = [s.encode_image(images[k]).array for k in ("small", "batch")]
    prompt = ["[gMASK]<sop><|user|>\n", images["small"], sys.argv[5]]
    logits = s.evaluate(prompt).logits
np.savez(out, small=embs[0], batch=embs[1], logits=logits)
"""


@pytest.mark.skipif(not _amx_bf16_build(), reason="needs an AMX CPU and a build for it (AMX paths compile only there)")
@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_amx_paths_match_the_other_kernels(outtype, hf_checkpoint, tmp_path):
    """0010 (flash attention, F32 weights: the attention is the only AMX op) against the same build with AMX
    off; 0009-0014 (BF16 weights: BF16 K/V, one BF16 product per attention block) and the
    same build without AMX each against transformers float32. Head size 32 in both towers (the tiny models'
    16 keeps the F32 kernel); a 10 x 10-patch image (a 64-row query tile and a 36-row tail, a 36-key KV
    tail), a 320-patch one, and a prompt of more than 64 tokens (the text model's tiled attention, 2 KV heads
    for 4)."""
    ckpt = hf_checkpoint("glm4v", 0, vision_hidden_size=128, vision_num_heads=4, hidden_size=128,
                         num_attention_heads=4)
    model, mmproj = convert(ckpt, tmp_path / "gguf", outtype=outtype, progress=False)
    images = tmp_path / "images.npz"
    np.savez(images, small=IMG_10x10, batch=IMG_BATCH)
    text = LONG_PROMPT[2]  # the child puts it after the small image, as LONG_PROMPT does
    runs = {}
    for amx in ("0", "1"):
        out = tmp_path / f"amx{amx}.npz"
        proc = subprocess.run([sys.executable, "-c", AMX_CHILD, str(model), str(mmproj), str(images), str(out), text],
                              env={**os.environ, "GGML_CPU_AMX_BF16": amx}, capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)  # outside the source tree: the installed package
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[amx] = np.load(out)
    off, on = runs["0"], runs["1"]
    for key in ("small", "batch"):
        assert not np.array_equal(on[key], off[key]), f"{key}: bit-equal, so the AMX path did not run"
    if outtype == "f32":
        for key in ("small", "batch"):
            rel = rel_l2(on[key], off[key])
            assert rel <= tolerances.AMX_EMBED_REL_L2, f"{key}: relative L2 difference {rel:.2e}"
        diff = float(np.max(np.abs(on["logits"] - off["logits"])))
        assert diff <= tolerances.AMX_LOGITS_MAX_ABS, f"max |logit difference| {diff:.2e}"
        return
    # BF16: the two kernels round differently (Q and P to BF16 on the tiles only), so each meets the BF16
    # bounds against the reference
    ref_model = reference.load_reference(ckpt)[0]
    expected = {key: reference.reference_image_features(ref_model, img, f16_conv=True)
                for key, img in (("small", IMG_10x10), ("batch", IMG_BATCH))}
    ref_logits = reference.reference_last_logits(ref_model, reference.build_inputs(ckpt, LONG_PROMPT))
    for name, run in (("AMX", on), ("no AMX", off)):
        for key in ("small", "batch"):
            rel = rel_l2(run[key], expected[key])
            assert rel <= tolerances.EMBED_REL_L2_BF16, f"{name}, {key}: relative L2 error {rel:.2e}"
        diff = float(np.max(np.abs(run["logits"] - ref_logits)))
        assert diff <= tolerances.LOGITS_MAX_ABS_BF16, f"{name}: max |logit difference| {diff:.2e}"
