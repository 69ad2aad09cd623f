"""The compiled binding: status checking, Ctrl-C and logging callbacks, engine facts.

Only this module and the handle owners (:mod:`glm4v_mtmd._handles`) touch ``_glm4v_cffi``;
the owners use :func:`check` so every failure becomes a typed exception carrying the C API's
own message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, NoReturn, Optional

from .errors import (
    ContextOverflowError,
    EngineError,
    GenerationError,
    Glm4vError,
    ImageError,
    ModelLoadError,
    RpcError,
)

try:
    from ._glm4v_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    _hint = (
        f" You are importing the source tree at {_here.parent}, which has no compiled module: run `pytest` "
        "(not `python -m pytest`, which puts the current directory first on sys.path), run from another "
        "directory, or use an editable install (`pip install --no-build-isolation -e .`)."
        if (_here.parent / "pyproject.toml").is_file()
        else ""
    )
    raise ImportError(
        "glm4v_mtmd's native module is missing: install the package with `pip install .` so the engine "
        "is compiled." + _hint
    ) from exc

logger = logging.getLogger("glm4v_mtmd")

# Status codes of csrc/glm4v_api.h mapped to exception types.
_STATUS_ERRORS: dict[int, type[Glm4vError]] = {
    lib.GLM4V_ERR_INVALID_ARGUMENT: EngineError,
    lib.GLM4V_ERR_LOAD: ModelLoadError,
    lib.GLM4V_ERR_IMAGE: ImageError,
    lib.GLM4V_ERR_CONTEXT_FULL: ContextOverflowError,
    lib.GLM4V_ERR_DECODE: GenerationError,
    lib.GLM4V_ERR_CANCELLED: GenerationError,
    lib.GLM4V_ERR_BUFFER_TOO_SMALL: EngineError,
    lib.GLM4V_ERR_INTERNAL: EngineError,
    lib.GLM4V_ERR_BUSY: EngineError,
    lib.GLM4V_ERR_RPC: RpcError,
}


def last_error(handle: Any = None) -> str:
    """The C API's message for the last failure on a context ``handle`` (or of this thread)."""
    ptr = lib.glm4v_last_error(handle) if handle is not None else lib.glm4v_last_global_error()
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def raise_status(status: int, handle: Any = None, context: str = "") -> NoReturn:
    """Raise the exception type of ``status`` with the C API's message."""
    msg = last_error(handle) or f"status {status}"
    if context:
        msg = f"{context}: {msg}"
    raise _STATUS_ERRORS.get(status, EngineError)(msg)


def check(status: int, handle: Any = None, context: str = "") -> None:
    """Raise a typed exception unless ``status`` is GLM4V_OK (a Ctrl-C caught by this thread's call first)."""
    call = current_call()
    if call is not None and call.interrupts:
        exc = call.interrupts.pop()
        call.interrupts.clear()
        raise exc
    if status != lib.GLM4V_OK:
        raise_status(status, handle, context)


# ---------------------------------------------------------------------------------------
# Ctrl-C: while C code runs, Python's SIGINT handler cannot run. The engine calls glm4v_py_poll
# before every generated token and every 50 ms of batch computation or waiting; entering Python
# runs the pending handler, whose KeyboardInterrupt lands in _poll_error: the engine is told to
# stop and `check` re-raises the exception once the C call has returned (with the KV cache
# consistent). What was caught belongs to the call that was running in that thread (a
# CallState), never to the module: another thread's call, or the next call, does not see it.
# ---------------------------------------------------------------------------------------

POLL_INTERVAL_MS = 50


class CallState:
    """What one call (evaluate, generate, a stream, a load) has caught from Ctrl-C."""

    __slots__ = ("interrupts",)

    def __init__(self) -> None:
        self.interrupts: list[BaseException] = []


_calls = threading.local()


def current_call() -> Optional[CallState]:
    """The innermost call running in this thread, if any."""
    stack = getattr(_calls, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def call_scope() -> Iterator[CallState]:
    """Run a call with its own Ctrl-C state (nested calls in one thread share the outer one)."""
    outer = current_call()
    if outer is not None:
        yield outer
        return
    state = CallState()
    _calls.stack = [state]
    try:
        yield state
    finally:
        _calls.stack = []


def _keep_interrupt(exc: BaseException) -> bool:
    call = current_call()
    if call is None:
        return False
    call.interrupts.append(exc)
    return True


def _poll_error(exc_type: Any, exc_value: BaseException, traceback: Any) -> int:
    _keep_interrupt(exc_value)
    return 1


@ffi.def_extern(onerror=_poll_error)
def glm4v_py_poll(user_data: Any) -> int:
    # Signal handlers run on entry; one that raises ends up in _poll_error. A Ctrl-C that landed in
    # another callback (glm4v_py_log) is already pending on this call: stop too.
    call = current_call()
    return 1 if call is not None and call.interrupts else 0


def arm_interrupts(handle: Any) -> None:
    """Poll for Ctrl-C during the next calls on context ``handle`` if this is the main thread (the only
    one Python delivers signals to); elsewhere polling would only cost a GIL round trip per token."""
    main = threading.current_thread() is threading.main_thread()
    lib.glm4v_set_interrupt_poll(handle, lib.glm4v_py_poll if main else ffi.NULL, ffi.NULL, POLL_INTERVAL_MS)


# ---------------------------------------------------------------------------------------
# logging: engine log lines arrive through a C callback and go to logging.getLogger.
# ---------------------------------------------------------------------------------------

# ggml levels -> logging levels. The engine's INFO output is verbose (every tensor at load),
# so it is logged at DEBUG; its DEBUG output one step lower still.
_LEVELS = {1: 5, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
# Engine warnings that every GLM vocabulary triggers and that need no action: llama.cpp's own
# converter sets eot = <|user|> (src/llama-vocab.cpp then adds it to the stop set itself).
_BENIGN_WARNINGS = ("load: special_eot_id is not in special_eog_ids", "load: special_eom_id is not in special_eog_ids")
_line_state = threading.local()


@ffi.def_extern()
def glm4v_py_log(level: int, text: Any, user_data: Any) -> None:
    # Exceptions must never unwind into C: swallow everything.
    try:
        chunk = ffi.string(text).decode("utf-8", "replace")
        if level == 5:  # continuation of the previous line
            level = getattr(_line_state, "level", 2)
        _line_state.level = level
        buf = getattr(_line_state, "buf", "") + chunk
        *lines, rest = buf.split("\n")
        _line_state.buf = rest
        py_level = _LEVELS.get(level, logging.DEBUG)
        if lines and logger.isEnabledFor(py_level):
            for line in lines:
                if line.strip():
                    benign = py_level == logging.WARNING and line.startswith(_BENIGN_WARNINGS)
                    logger.log(logging.DEBUG if benign else py_level, "%s", line)
    except (KeyboardInterrupt, SystemExit) as exc:
        # A signal handler (Ctrl-C) ran on entry to this callback: keep it for the call's next poll,
        # which stops the engine, and for `check`, which re-raises it. Dropping it would let a long
        # generation run on to max_tokens.
        _keep_interrupt(exc)
    except BaseException:  # noqa: BLE001 - see comment above
        pass


lib.glm4v_set_log_callback(lib.glm4v_py_log, ffi.NULL)


# ---------------------------------------------------------------------------------------
# engine facts
# ---------------------------------------------------------------------------------------


def engine_info() -> dict[str, Any]:
    """Version and build facts of the compiled engine.

    Returns a dict with ``engine_package`` (the pinned source distribution), ``engine_commit``
    (llama.cpp commit), ``engine_origin``, ``backends`` (compiled ggml backends),
    ``source_dir`` (the engine source tree used by the build), ``patches`` (the files of
    ``csrc/patches`` applied to it), ``system_info`` (the engine's CPU feature report) and
    ``devices`` (:func:`devices`).
    """
    from . import _build_info

    return {
        "engine_package": _build_info.ENGINE_PACKAGE,
        "engine_commit": ffi.string(lib.glm4v_engine_version()).decode(),
        "engine_origin": _build_info.ENGINE_ORIGIN,
        "backends": list(_build_info.BACKENDS),
        "build_type": _build_info.BUILD_TYPE,
        "source_dir": _build_info.ENGINE_SOURCE_DIR,
        "patches": list(getattr(_build_info, "ENGINE_PATCHES", ())),
        "system_info": ffi.string(lib.glm4v_system_info()).decode("utf-8", "replace").strip(),
        "devices": devices(),
    }


_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}


def devices() -> list[dict[str, Any]]:
    """The engine's devices in this process: ``name``, ``description``, ``type`` (CPU, GPU, IGPU,
    ACCEL), ``memory_free`` and ``memory_total`` in bytes. RPC servers are not listed: a model
    names its own (``rpc_servers=``)."""
    out = []
    info = ffi.new("glm4v_device_info *")
    for i in range(lib.glm4v_device_count()):
        check(lib.glm4v_device_get(i, info))
        out.append({
            "name": ffi.string(info.name).decode("utf-8", "replace"),
            "description": ffi.string(info.description).decode("utf-8", "replace"),
            "type": _DEVICE_TYPES.get(info.type, str(info.type)),
            "memory_free": int(info.memory_free), "memory_total": int(info.memory_total),
        })
    return out


def quantize_model(src: str, dst: str, ftype: str, n_threads: int = 0) -> None:
    """Quantize a text-model GGUF with the engine's quantizer (``llama_model_quantize``)."""
    from .errors import ConversionError

    status = lib.glm4v_quantize(src.encode(), dst.encode(), ftype.lower().encode(), int(n_threads))
    if status != lib.GLM4V_OK:
        raise ConversionError(last_error() or f"quantizing {src} to {ftype} failed")
