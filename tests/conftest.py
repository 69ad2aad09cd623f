"""Shared fixtures: tiny random GLM4V checkpoints, their GGUF conversions and transformers references.

Everything is built once per test session (and per architecture / seed / output type) under pytest's
temporary directory, so the suite needs no network and no model downloads.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

# The suite can run against another build of the package (tests/test_isa_avx2.py runs parts of it on
# an engine built for the AVX2 class): its directory goes first on the path, and a development
# install's editable finder, which would still win, is dropped.
if os.environ.get("GLM4V_MTMD_PACKAGE_DIR"):
    sys.path.insert(0, os.environ["GLM4V_MTMD_PACKAGE_DIR"])
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]

# On a CUDA build of the engine, torch imported after the engine crashes the process (the two load
# different builds of the CUDA libraries): the GPU run imports it first.
if os.environ.get("GLM4V_MTMD_TEST_N_GPU_LAYERS"):
    import torch  # noqa: F401

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np
import pytest
import tiny_models

import glm4v_mtmd.model
from glm4v_mtmd import GenerationConfig

# GLM4V_MTMD_TEST_N_GPU_LAYERS=-1 runs the suite on a GPU build with every layer (and the projector)
# offloaded: it becomes the default of every Model this process loads (an explicit n_gpu_layers wins).
if os.environ.get("GLM4V_MTMD_TEST_N_GPU_LAYERS"):
    _TEST_GPU_LAYERS = int(os.environ["GLM4V_MTMD_TEST_N_GPU_LAYERS"])
    _model_init = glm4v_mtmd.model.Model.__init__

    @functools.wraps(_model_init)
    def _offloaded_init(self: Any, *args: Any, n_gpu_layers: Any = None, **kwargs: Any) -> None:
        _model_init(self, *args, n_gpu_layers=_TEST_GPU_LAYERS if n_gpu_layers is None else n_gpu_layers, **kwargs)

    glm4v_mtmd.model.Model.__init__ = _offloaded_init  # type: ignore[method-assign]

ARCHS = tiny_models.MODEL_KINDS


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A reproducible HxWx3 uint8 image with some structure (so features are not plain noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(1, height // 7), max(1, width // 7), 3), dtype=np.uint8)
    img = np.kron(base, np.ones((7, 7, 1), dtype=np.uint8))[:height, :width]
    out = np.zeros((height, width, 3), dtype=np.uint8)
    out[: img.shape[0], : img.shape[1]] = img
    noise = rng.integers(0, 32, size=out.shape, dtype=np.uint8)
    return out // 2 + noise


def terminate(proc: subprocess.Popen) -> None:
    """Stop a server process started by a test: SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: A prompt with one image and greedy settings: the tests that break a session check that it still gives
#: the same ids for these afterwards.
PROMPT = ["[gMASK]<sop><|user|>\n", random_image(84, 84, seed=3), "Describe this image.<|assistant|>\n"]
GREEDY = GenerationConfig(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """``hf_checkpoint(arch, seed=0, **overrides)``: a tiny random HF checkpoint directory."""

    @functools.cache
    def build(arch: str, seed: int = 0, **overrides: Any) -> pathlib.Path:
        name = f"{arch}-s{seed}" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        out = tmp_path_factory.mktemp(name)
        return tiny_models.make_checkpoint(out, arch=arch, seed=seed, **overrides)

    return build


@pytest.fixture(scope="session")
def gguf_pair(
    hf_checkpoint: Callable[..., pathlib.Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[pathlib.Path, pathlib.Path]]:
    """``gguf_pair(arch, seed=0, outtype="f32")``: (text GGUF, mmproj GGUF) from our converter."""
    from glm4v_mtmd.convert import convert

    @functools.cache
    def build(arch: str, seed: int = 0, outtype: str = "f32") -> tuple[pathlib.Path, pathlib.Path]:
        out = tmp_path_factory.mktemp(f"gguf-{arch}-s{seed}-{outtype}")
        return convert(hf_checkpoint(arch, seed), out, outtype=outtype, progress=False)

    return build


@pytest.fixture(scope="session")
def reference_model(hf_checkpoint: Callable[..., pathlib.Path]) -> Callable[..., Any]:
    """``reference_model(arch, seed=0)``: the transformers model (float32, eager) of a tiny checkpoint."""
    import reference

    @functools.cache
    def load(arch: str, seed: int = 0) -> Any:
        model, _ = reference.load_reference(hf_checkpoint(arch, seed))
        return model

    return load


@pytest.fixture(scope="session")
def exact_session(gguf_pair: Callable[..., tuple[pathlib.Path, pathlib.Path]]) -> Any:
    """``exact_session(arch)``: a cached Session in exact mode (F32 GGUFs, F32 KV cache, no flash
    attention, n_ctx 1024), closed at the end of the run."""
    from glm4v_mtmd import Session

    opened: list[Session] = []

    @functools.cache
    def open_session(arch: str) -> Session:
        text, proj = gguf_pair(arch, 0, "f32")
        s = Session(text, proj, n_ctx=1024, n_threads=2, kv_cache_type="f32", flash_attn=False)
        opened.append(s)
        return s

    yield open_session
    for s in opened:
        s.close()
