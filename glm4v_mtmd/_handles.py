"""Native owners: one Python object per C handle (``glm4v_model``, ``glm4v_ctx``).

This layer and :mod:`glm4v_mtmd._native` are the only callers of the raw binding. They speak
plain Python and numpy types to the layers above (:mod:`glm4v_mtmd.model`,
:mod:`glm4v_mtmd.context`): buffers, status checks and the free order live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ._native import check, ffi, lib, raise_status
from .errors import SessionClosedError

_TEXT_CAP = 1 << 16


@dataclass(frozen=True)
class ModelFacts:
    """What the engine reports about a loaded model pair."""

    n_vocab: int
    n_embd: int
    n_ctx: int
    n_parallel: int
    n_layer: int
    image_token: int
    begin_image_token: int
    end_image_token: int
    load_ms: float


@dataclass(frozen=True)
class EncodedImage:
    """The projector's output for one image, with the engine's own timings."""

    array: np.ndarray
    grid: tuple[int, int]
    preprocess_ms: float
    encode_ms: float


@dataclass(frozen=True)
class Sampling:
    """The C sampling parameters (see ``glm4v_sampling`` in csrc/glm4v_api.h)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    seed: int


class EncodeCancel:
    """A flag another thread sets to stop an image encode at its next check point (a vision layer
    or less): the encode then raises :class:`GenerationError`. One per request; never reset."""

    def __init__(self) -> None:
        self.flag = ffi.new("int32_t *")

    def set(self) -> None:
        self.flag[0] = 1

    def is_set(self) -> bool:
        return bool(self.flag[0])


class ModelHandle:
    """Owner of a ``glm4v_model``: load, vocabulary, image encoding, contexts."""

    def __init__(self, model_path: str, mmproj_path: Optional[str], options: dict[str, int], *,
                 rpc_servers: Sequence[str] = (), tensor_split: Optional[Sequence[float]] = None) -> None:
        params = ffi.new("glm4v_load_params *")
        params[0] = lib.glm4v_load_params_default()
        for name, value in options.items():
            setattr(params, name, value)
        # Owned here until the load returns (the engine copies both).
        servers = ffi.new("char[]", ",".join(rpc_servers).encode()) if rpc_servers else ffi.NULL
        split = ffi.new("float[]", list(tensor_split)) if tensor_split else ffi.NULL
        params.rpc_servers = servers
        params.tensor_split = split
        params.n_tensor_split = len(tensor_split) if tensor_split else 0
        out = ffi.new("glm4v_model **")
        mmproj = mmproj_path.encode() if mmproj_path else ffi.NULL
        status = lib.glm4v_model_load(model_path.encode(), mmproj, params, out)
        if status != lib.GLM4V_OK:
            raise_status(status)
        # One owner: ffi.gc frees the model if close() is never called (contexts keep it alive).
        self._ptr: Any = ffi.gc(out[0], lib.glm4v_model_free)
        info = ffi.new("glm4v_model_info *")
        check(lib.glm4v_model_get_info(self._ptr, info))
        self.facts = ModelFacts(
            n_vocab=info.n_vocab, n_embd=info.n_embd, n_ctx=info.n_ctx, n_parallel=info.n_parallel,
            n_layer=info.n_layer, image_token=info.image_token, begin_image_token=info.begin_image_token,
            end_image_token=info.end_image_token, load_ms=float(lib.glm4v_model_load_ms(self._ptr)),
        )

    def ptr(self) -> Any:
        if self._ptr is None:
            raise SessionClosedError("the model is closed; load it again")
        return self._ptr

    def close(self) -> None:
        """Free the model (every context of it must be closed first). Idempotent."""
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None

    def steps(self) -> tuple[int, int]:
        """(engine steps run, requests they served)."""
        steps, requests = ffi.new("int64_t *"), ffi.new("int64_t *")
        lib.glm4v_model_steps(self.ptr(), steps, requests)
        return int(steps[0]), int(requests[0])

    # ---------------------------------------------------------------- vocabulary

    def tokenize(self, data: bytes, special: bool) -> list[int]:
        h = self.ptr()
        n_out = ffi.new("int32_t *")
        cap = len(data) + 8
        buf = ffi.new("int32_t[]", cap)
        status = lib.glm4v_tokenize(h, data, len(data), int(special), buf, cap, n_out)
        if status == lib.GLM4V_ERR_BUFFER_TOO_SMALL:
            cap = n_out[0]
            buf = ffi.new("int32_t[]", cap)
            status = lib.glm4v_tokenize(h, data, len(data), int(special), buf, cap, n_out)
        check(status, None, "tokenize")
        return list(ffi.unpack(buf, n_out[0]))

    def detokenize(self, ids: np.ndarray, special: bool) -> str:
        h = self.ptr()
        n_out = ffi.new("int32_t *")
        cap = max(64, 8 * len(ids))
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            status = lib.glm4v_detokenize(h, ffi.from_buffer("int32_t[]", ids), len(ids), int(special), buf, cap, n_out)
            if status != lib.GLM4V_ERR_BUFFER_TOO_SMALL:
                break
            cap = n_out[0] + 1
        check(status, None, "detokenize")
        return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")

    def token_id(self, piece: str) -> int:
        return int(lib.glm4v_token_id(self.ptr(), piece.encode()))

    def metadata(self, key: str) -> Optional[str]:
        h = self.ptr()
        n = ffi.new("int32_t *")
        cap = 256
        for _ in range(2):
            buf = ffi.new("char[]", cap)
            status = lib.glm4v_meta_str(h, key.encode(), buf, cap, n)
            if status != lib.GLM4V_ERR_BUFFER_TOO_SMALL:
                break
            cap = n[0] + 1
        if status != lib.GLM4V_OK:
            return None
        return ffi.string(buf).decode("utf-8", "replace")

    # ---------------------------------------------------------------- images

    def encode(self, pixels: Any, width: int, height: int, second: Any = None, cancel: Any = None) -> EncodedImage:
        """Encode RGB bytes already at their final size (the engine serialises encodes); with
        ``second``, the video frame pair (``pixels`` the earlier frame). ``cancel``: an
        ``int32_t *`` (:class:`EncodeCancel`) that another thread may set to stop the encode
        (:class:`GenerationError`)."""
        h = self.ptr()
        out = ffi.new("glm4v_image **")
        flag = ffi.NULL if cancel is None else cancel.flag
        if second is None:
            check(lib.glm4v_encode_image(h, ffi.from_buffer(pixels), width, height, flag, out), None, "encode_image")
        else:
            check(lib.glm4v_encode_frame_pair(h, ffi.from_buffer(pixels), ffi.from_buffer(second), width, height,
                                              flag, out), None, "encode_frame_pair")
        img = ffi.gc(out[0], lib.glm4v_image_free)
        try:
            n_tokens = lib.glm4v_image_n_tokens(img)
            n_embd = lib.glm4v_image_n_embd(img)
            data = ffi.buffer(lib.glm4v_image_data(img), 4 * n_tokens * n_embd)
            array = np.frombuffer(data, dtype=np.float32).reshape(n_tokens, n_embd).copy()
            grid = (int(lib.glm4v_image_rows(img)), int(lib.glm4v_image_cols(img)))
            pre, enc = float(lib.glm4v_image_preprocess_ms(img)), float(lib.glm4v_image_encode_ms(img))
        finally:
            ffi.release(img)
        array.setflags(write=False)
        return EncodedImage(array, grid, pre, enc)

    # ---------------------------------------------------------------- contexts

    def open_context(self) -> CtxHandle:
        """A new sequence; raises the engine's GLM4V_ERR_BUSY as an EngineError when none is free."""
        return CtxHandle(self)


class CtxHandle:
    """Owner of a ``glm4v_ctx`` (one KV sequence of a model)."""

    def __init__(self, model: ModelHandle) -> None:
        out = ffi.new("glm4v_ctx **")
        check(lib.glm4v_ctx_open(model.ptr(), out), None, "context")
        model_ptr = model.ptr()

        def free(ptr: Any, _keep: Any = model_ptr) -> None:
            # The model's cdata is referenced here so that it is freed after its contexts, whatever
            # order the garbage collector picks.
            lib.glm4v_ctx_free(ptr)

        self._ptr: Any = ffi.gc(out[0], free)
        self.seq_id = int(lib.glm4v_ctx_seq_id(self._ptr))
        self._step_buffers: dict[int, tuple[Any, ...]] = {}

    def ptr(self) -> Any:
        if self._ptr is None:
            raise SessionClosedError("the context is closed; open a new one with model.context()")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Give the sequence back to the model. Idempotent."""
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None

    def begin_call(self) -> None:
        lib.glm4v_begin_call(self.ptr())

    def cancel(self) -> None:
        ptr = self._ptr
        if ptr is not None:
            lib.glm4v_cancel(ptr)

    @property
    def n_cells(self) -> int:
        return int(lib.glm4v_n_cells(self.ptr()))

    @property
    def next_pos(self) -> int:
        return int(lib.glm4v_next_pos(self.ptr()))

    def truncate(self, n_cells: int) -> None:
        h = self.ptr()
        check(lib.glm4v_kv_truncate(h, n_cells), h, "evaluate")

    def evaluate(self, specs: Sequence[tuple[str, np.ndarray, tuple[int, int]]], n_new: int) -> np.ndarray:
        """Append parts (``("text", int32 ids, _)`` or ``("image", float32 rows, grid)``); their positions."""
        h = self.ptr()
        parts = ffi.new("glm4v_part[]", len(specs))
        keep = []
        for i, (kind, arr, grid) in enumerate(specs):
            if kind == "text":
                parts[i].tokens = ffi.from_buffer("int32_t[]", arr)
                parts[i].n_tokens = len(arr)
            else:
                parts[i].embd = ffi.from_buffer("float[]", arr)
                parts[i].rows, parts[i].cols = grid
                parts[i].n_embd = arr.shape[1]
            keep.append(arr)
        positions = np.empty((n_new, 3), dtype=np.int32)
        status = lib.glm4v_eval(h, parts, len(specs), ffi.from_buffer("int32_t[]", positions), n_new)
        del keep
        check(status, h, "evaluate")
        return positions

    def logits(self, n_vocab: int) -> np.ndarray:
        h = self.ptr()
        out = np.empty(n_vocab, dtype=np.float32)
        check(lib.glm4v_get_logits(h, ffi.from_buffer("float[]", out), n_vocab), h, "evaluate")
        return out

    def gen_begin(self, sampling: Sampling, stop_ids: Sequence[int], max_tokens: int,
                  logit_bias: Sequence[tuple[int, float]] = ()) -> None:
        h = self.ptr()
        sp = ffi.new("glm4v_sampling *")
        sp[0] = lib.glm4v_sampling_default()
        for name in Sampling.__dataclass_fields__:
            setattr(sp, name, getattr(sampling, name))
        # Kept alive until glm4v_gen_begin has copied them.
        bias_tokens = np.asarray([t for t, _ in logit_bias], dtype=np.int32)
        bias_values = np.asarray([v for _, v in logit_bias], dtype=np.float32)
        if len(logit_bias):
            sp.bias_tokens = ffi.from_buffer("int32_t[]", bias_tokens)
            sp.bias_values = ffi.from_buffer("float[]", bias_values)
            sp.n_bias = len(logit_bias)
        stops = np.asarray(stop_ids, dtype=np.int32)
        check(lib.glm4v_gen_begin(h, sp, ffi.from_buffer("int32_t[]", stops), len(stops), max_tokens), h, "generate")

    def gen_ahead(self, ahead: int) -> None:
        """Let the engine decode up to ``ahead`` tokens beyond those handed out (glm4v_gen_ahead)."""
        h = self.ptr()
        check(lib.glm4v_gen_ahead(h, ahead), h, "generate")

    def gen_step(self, max_steps: int) -> tuple[bytes, list[int], int]:
        """Up to ``max_steps`` tokens: (UTF-8 text, ids, GLM4V_FINISH_* code)."""
        h = self.ptr()
        bufs = self._step_buffers.get(max_steps)
        if bufs is None:  # allocated once per step size rather than per token
            bufs = (ffi.new("char[]", _TEXT_CAP), ffi.new("int32_t *"), ffi.new("int32_t[]", max_steps),
                    ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *"))
            self._step_buffers[max_steps] = bufs
        text, text_len, toks, n_toks, finish, stop_tok = bufs
        status = lib.glm4v_gen_step(h, max_steps, text, _TEXT_CAP, text_len, toks, max_steps, n_toks, finish, stop_tok)
        check(status, h, "generate")
        return ffi.unpack(text, text_len[0]), list(ffi.unpack(toks, n_toks[0])), int(finish[0])

    def gen_end(self) -> None:
        ptr = self._ptr
        if ptr is not None:
            lib.glm4v_gen_end(ptr)

    def timings(self) -> Any:
        """The C timings of the current call (a ``glm4v_timings`` copy)."""
        h = self.ptr()
        t = ffi.new("glm4v_timings *")
        check(lib.glm4v_get_timings(h, t), h)
        return t
