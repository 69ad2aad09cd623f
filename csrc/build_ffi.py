"""Generate the cffi (API mode) C source of glm4v_mtmd._glm4v_cffi.

Run by CMake: ``python build_ffi.py OUTPUT.c``. The cdef is csrc/glm4v_api.h, the very
declarations the C header includes, so the compiler checks every signature.
"""

from __future__ import annotations

import pathlib
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent


def make_ffi() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef((HERE / "glm4v_api.h").read_text(encoding="utf-8"))
    # The log callback is implemented in Python (glm4v_mtmd/_native.py).
    ffi.cdef('extern "Python" void glm4v_py_log(int, const char *, void *);')
    # The interrupt poll too (glm4v_mtmd/_native.py): it lets Ctrl-C reach Python while C runs.
    ffi.cdef('extern "Python" int32_t glm4v_py_poll(void *);')
    ffi.set_source("glm4v_mtmd._glm4v_cffi", '#include "glm4v.h"')
    return ffi


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    make_ffi().emit_c_code(str(out))
