"""What the build produced: engine libraries that keep their C++ runtime to themselves.

The first CUDA build (an H200, CUDA 13.0, GCC 13.3) produced a libggml-cuda.so that exported
~1,900 of libstdc++'s own functions. The dynamic linker bound other libraries' C++ calls to that
copy: loading a model crashed in ``llama_model::print_info``, and ``import torch`` after
``import glm4v_mtmd`` aborted with ``free(): invalid pointer``. These tests hold on every build;
on a CPU-only build they guard against the same leak from any other static archive.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import GREEDY, PROMPT

import glm4v_mtmd
from glm4v_mtmd import _glm4v_cffi

LIB_DIR = pathlib.Path(_glm4v_cffi.__file__).parent  # the compiled module and the engine's libraries
# Functions only libstdc++ itself defines (never instantiated from headers): a library that defines
# them carries a static libstdc++ and, if it exports them, hands that copy to the whole process.
LIBSTDCXX_OWN = ("_ZNKSt19__codecvt_utf8_base", "_ZNSt6locale", "_ZNSt8ios_base4Init", "_ZNKSt5ctypeIcE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbol tables: Linux builds")
def test_engine_libraries_export_no_libstdcxx() -> None:
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    libs = sorted(LIB_DIR.glob("*.so*"))
    assert any(p.name.startswith("libggml-base") for p in libs), libs
    leaks = {}
    for lib in libs:
        out = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
        symbols = (line.split() for line in out.stdout.splitlines())
        own = [f[-1] for f in symbols
               if len(f) >= 2 and f[-2] in ("T", "D", "B", "R") and f[-1].startswith(LIBSTDCXX_OWN)]
        if own:
            leaks[lib.name] = (len(own), own[:3])
    assert not leaks, f"engine libraries export libstdc++'s own symbols: {leaks}"


TORCH_AFTER = r"""
import sys
import glm4v_mtmd
from glm4v_mtmd import GenerationConfig, Session
text, proj = sys.argv[1:3]
with Session(text, proj, n_ctx=256, n_threads=2) as s:
    import torch  # after the engine's libraries (and a model load) are in the process
    assert torch.ones(2).sum().item() == 2.0
    print(len(s.generate(["[gMASK]<sop><|user|>\nhi<|assistant|>\n"],
                         GenerationConfig(max_tokens=4, ignore_eos=True)).token_ids))
"""


def test_torch_imported_after_the_engine(gguf_pair, tmp_path: pathlib.Path) -> None:
    pytest.importorskip("torch")
    text, proj = gguf_pair("glm4v", 0, "f16")
    out = subprocess.run([sys.executable, "-c", TORCH_AFTER, str(text), str(proj)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["4"]


def test_model_loads_and_answers_with_the_suites_settings(gguf_pair) -> None:
    """The load that crashed on the first CUDA build (F32 weights, F32 KV cache, flash attention off),
    in this process, with whatever offload the suite runs under."""
    text, proj = gguf_pair("glm4v", 0, "f32")
    with glm4v_mtmd.Session(text, proj, n_ctx=256, n_threads=2, kv_cache_type="f32", flash_attn=False) as s:
        assert len(s.generate(PROMPT, GREEDY).token_ids) == GREEDY.max_tokens
