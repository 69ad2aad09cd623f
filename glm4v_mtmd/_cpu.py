"""The engine's CPU features, and the weight precision that runs fastest with them.

The engine's matrix kernels for BF16 weights are fast only where the CPU backend was compiled
with BF16 dot products (``AVX512_BF16``); elsewhere they convert element by element and F16
wins. Measured with the real GLM-4.1V vision tower, 2 threads:

- AVX2 + F16C, no BF16 (AMD EPYC; ``bench/first_image.py``, 1008x756): BF16 weights took 1.22x
  the F16 encode time and 1.45x the F16 prefill time (1.40x / 1.35x with ``--quick``); a Q8_0
  projector encoded a 448x336 image in 10.2 s against F16's 7.5 s;
- AVX512_BF16 (AMD EPYC, issue #8's table): encode F16 29.4 s, BF16 23.4 s; prefill F16 4.84 s,
  BF16 3.39 s.

The features are the ones the engine was *compiled* for (its own report), which is what decides
which kernels run; with the default native build they are the build machine's.
"""

from __future__ import annotations

import functools
import re

#: Features under which the engine's CPU backend has BF16 dot-product kernels.
BF16_FEATURES = frozenset({"AVX512_BF16"})


def parse_system_info(text: str) -> frozenset[str]:
    """The enabled features of the ``CPU :`` section of the engine's system-info line.

    ``"CPU : SSE3 = 1 | AVX2 = 1 | LLAMAFILE = 1 |"`` -> ``{"SSE3", "AVX2", "LLAMAFILE"}``; other
    backends' sections (``CUDA : ARCHS = 900 | ...``) and non-boolean values are ignored.
    """
    features: set[str] = set()
    section = ""
    for item in text.split("|"):
        item = item.strip()
        m = re.match(r"^([A-Za-z0-9_]+)\s*:\s*(.*)$", item)
        if m:  # a backend label opens a new section: "CPU : SSE3 = 1"
            section, item = m.group(1).upper(), m.group(2)
        name, sep, value = item.partition("=")
        if section == "CPU" and sep and value.strip() == "1":
            features.add(name.strip().upper())
    return frozenset(features)


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """CPU features the engine's CPU backend was compiled for (``AVX2``, ``AVX512_BF16``, ...)."""
    from ._native import engine_info

    return parse_system_info(engine_info()["system_info"])


def preferred_float_type(features: frozenset[str] | None = None) -> str:
    """``"bf16"`` where the engine has BF16 dot products on this CPU, else ``"f16"``.

    The precision to pick for F16/BF16 GGUF weights (the projector above all: image encode is
    most of the time to a first answer about a photo) when the files exist in both.
    """
    feats = cpu_features() if features is None else features
    return "bf16" if feats & BF16_FEATURES else "f16"


#: ggml type ids of the float weight types (ggml.h: GGML_TYPE_F16, GGML_TYPE_BF16).
GGML_F16, GGML_BF16 = 1, 30


def precision_advice(matrix_types: list[int], features: frozenset[str] | None = None) -> str | None:
    """A note for a CPU run of weights (the ggml types of a file's matrices) in a precision that is
    slow here: BF16 weights without BF16 dot products. ``None`` when there is nothing to say."""
    if not matrix_types or preferred_float_type(features) == "bf16":
        return None
    bf16 = sum(1 for t in matrix_types if t == GGML_BF16)
    if 2 * bf16 <= len(matrix_types):
        return None
    return ("BF16 weights run slowly on this CPU: the engine has no BF16 dot products here "
            "(no AVX512_BF16); the same weights in F16 encode an image 1.2-1.4x faster "
            "(convert with --mmproj-outtype f16, or pick the F16 projector)")
