"""The engine built for the AVX2 class (no AVX512): what most laptops run.

On a CPU with AVX512 the rest of the suite never reaches the engine's AVX2 kernels: the tiled
flash-attention code of patches 0001 and 0002, the packed F16 GEMM of patch 0008 and tinyBLAS's
__m256 paths are compiled only without AVX512. This test builds the package again for the AVX2 class
alone (``GGML_NATIVE=OFF``, AVX/AVX2/FMA/F16C/BMI2: ``bench/first_image.py``'s ``ISAS["avx2"]``, the
build ``first_image.py --isa avx2`` measures), checks that its engine uses no AVX512 instruction set,
and runs the parity tests and the engine-patch tests against transformers on it in a child pytest.

The build goes to the bench scratch directory (one per checkout, incremental): a few minutes the
first time. On a CPU without AVX512 the package under test is already this class, and the test skips.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import glm4v_mtmd

TESTS = pathlib.Path(__file__).resolve().parent
BENCH = TESTS.parent / "bench"


def test_parity_on_an_avx2_only_engine(tmp_path: pathlib.Path) -> None:
    features = glm4v_mtmd.cpu_features()
    if "AVX2" not in features:
        pytest.skip("this CPU has no AVX2")
    if not any(f.startswith("AVX512") for f in features):
        pytest.skip("the package under test is already built for the AVX2 class (no AVX512 here)")
    sys.path.insert(0, str(BENCH))
    try:
        from first_image import isa_package
        from run import SCRATCH
    finally:
        sys.path.remove(str(BENCH))
    site = isa_package("avx2", SCRATCH)
    env = {**os.environ, "GLM4V_MTMD_PACKAGE_DIR": str(site)}

    code = ("import json, conftest, glm4v_mtmd; print(json.dumps([glm4v_mtmd.__file__, "
            "sorted(glm4v_mtmd.cpu_features()), glm4v_mtmd.engine_info()['patches']]))")
    probe = subprocess.run(
        [sys.executable, "-c", code],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    path, engine_features, patches = json.loads(probe.stdout.strip().splitlines()[-1])
    assert path.startswith(str(site)), path  # the AVX2 build, not the installed package
    assert "AVX2" in engine_features and "F16C" in engine_features and "FMA" in engine_features
    assert not [f for f in engine_features if f.startswith(("AVX512", "AMX"))], engine_features
    assert "0008-ggml-cpu-llamafile-packed-f16-gemm-avx2.patch" in patches

    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'child'}",
         "test_parity.py", "test_engine_patches.py",
         # the AMX paths (0009, 0010) are not compiled into an AVX2 build: that test would only skip
         "-k", "not test_amx_paths_match_the_other_kernels"],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=1200)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and " skipped" not in child.stdout, child.stdout[-1000:]
