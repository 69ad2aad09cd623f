"""`Session`: one loaded GLM-4.xV model pair and its KV cache."""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np

from . import _native
from ._cache import EmbeddingCache, content_key
from ._cpu import precision_advice
from ._gguf_probe import read_header
from ._native import check, ffi, lib
from ._prompt import ImageTokenIds, PositionLog, PromptLayout, Segment, StopStrings
from ._validate import check_glm4v_mmproj, check_text_model
from .errors import ConfigError, ContextOverflowError, GenerationError, ModelLoadError, SessionClosedError
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PIXELS_PER_TOKEN,
    ImageInput,
    check_limits,
    prepare_image,
)
from .types import (
    Evaluation,
    FinishReason,
    GenerationConfig,
    GenerationResult,
    ImageEmbedding,
    StreamChunk,
    Timings,
)

PromptPart = Union[str, ImageEmbedding, ImageInput]

#: KV-cache types by name (ggml_type values).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
#: Architectures of GLM-4.xV text models (glm4v -> glm4, glm4v_moe -> glm4moe).
TEXT_ARCHITECTURES = ("glm4", "glm4moe")
#: Pieces that end a GLM turn (the checkpoints' generation_config eos ids).
STOP_PIECES = ("<|endoftext|>", "<|user|>", "<|observation|>")

_FINISH = {
    lib.GLM4V_FINISH_STOP: "stop",
    lib.GLM4V_FINISH_LENGTH: "length",
    lib.GLM4V_FINISH_CONTEXT: "length",
    lib.GLM4V_FINISH_CANCELLED: "length",
}
_TEXT_CAP = 1 << 16


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r}: must be a positive integer")


class Session:
    """A GLM-4.xV text model plus its vision projector, with one KV cache.

    Args:
        model_path: text-model GGUF (architecture ``glm4`` or ``glm4moe``).
        mmproj_path: projector GGUF (``mmproj-*.gguf``); ``None`` for text only.
        n_ctx: context size in KV cells. An image fills one cell per image token.
        n_threads: CPU threads (default: the CPUs available to this process).
        n_gpu_layers: layers to offload to a GPU backend (-1 = all).
        flash_attn: ``None`` lets the engine decide, ``True``/``False`` force it.
        kv_cache_type: one of :data:`KV_CACHE_TYPES` (``"f32"`` for exact comparisons).
        n_batch: tokens per prompt-evaluation batch.
        use_mmap: memory-map the model file.
        min_pixels, max_pixels: image size limits of the reference preprocessing, in pixels
            counting both temporal frames as the checkpoints' preprocessor config does (one image
            token = 1,568 pixels; defaults 12,544 / 9,633,792 = 8 / 6,144 tokens). They may only
            narrow the engine's window of 8 .. 6,144 tokens, which it would otherwise resize into.
        max_image_pixels: largest width*height accepted, checked on the file header before
            decoding (decompression bombs); Pillow's 178,956,970 by default.
        image_cache_mb: size of the LRU cache of image embeddings keyed by image content (0 = off);
            a conversation re-sends its images every turn, and they are encoded once.

    A session is a context manager; :meth:`close` is idempotent.

    Threads: engine work releases the GIL, so sessions in different threads run in parallel. Calls
    on one session are serialised: a generation (``generate``, ``chat`` or an open ``stream``) holds
    the session until it finishes, and other threads' calls wait for it. The same thread starting
    another call while its own stream is still open gets a :class:`GenerationError` (finish or
    ``close()`` the stream first) rather than a deadlock.
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        mmproj_path: Union[str, os.PathLike, None] = None,
        *,
        n_ctx: int = 4096,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        flash_attn: Optional[bool] = None,
        kv_cache_type: str = "f16",
        n_batch: int = 2048,
        use_mmap: bool = True,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        image_cache_mb: float = 256,
    ) -> None:
        self._handle: Any = None
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._gen_owner: Optional[int] = None  # thread ident of the open generation, if any
        _check_positive("n_ctx", n_ctx)
        _check_positive("n_threads", n_threads, allow_none=True)
        _check_positive("n_batch", n_batch)
        # The engine's image-token window (the load params keep the C defaults): images outside it
        # would be resized again by llama.cpp, so the limits may only narrow it.
        engine = lib.glm4v_load_params_default()
        self._pixel_window = (engine.image_min_tokens * PIXELS_PER_TOKEN, engine.image_max_tokens * PIXELS_PER_TOKEN)
        check_limits(min_pixels, max_pixels, max_image_pixels, window=self._pixel_window)
        if not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise ConfigError(f"n_gpu_layers={n_gpu_layers!r}: must be an integer >= -1 (-1 = all)")
        if flash_attn not in (None, True, False):
            raise ConfigError(f"flash_attn={flash_attn!r}: must be None, True or False")
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ConfigError(f"kv_cache_type={kv_cache_type!r}: must be one of {', '.join(KV_CACHE_TYPES)}")

        self.model_path = os.fspath(model_path)
        self.mmproj_path = os.fspath(mmproj_path) if mmproj_path is not None else None
        self._cpu_only = n_gpu_layers == 0 or _native.engine_info()["backends"] == ["CPU"]
        self.architecture = self._check_files()
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_image_pixels = max_image_pixels
        if not isinstance(image_cache_mb, (int, float)) or image_cache_mb < 0:
            raise ConfigError(f"image_cache_mb={image_cache_mb!r}: must be a number >= 0")
        self.image_cache = EmbeddingCache(int(image_cache_mb * (1 << 20)))

        threads = n_threads or _default_threads()
        params = ffi.new("glm4v_load_params *")
        params[0] = lib.glm4v_load_params_default()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(512, n_batch)
        params.n_threads = threads
        params.n_threads_batch = threads
        params.n_gpu_layers = n_gpu_layers
        params.flash_attn = -1 if flash_attn is None else int(flash_attn)
        params.type_k = params.type_v = KV_CACHE_TYPES[kv_cache_type]
        params.use_mmap = int(use_mmap)
        out = ffi.new("glm4v_session **")
        mmproj = self.mmproj_path.encode() if self.mmproj_path else ffi.NULL
        status = lib.glm4v_session_load(self.model_path.encode(), mmproj, params, out)
        if status != lib.GLM4V_OK:
            _native.raise_status(status)
        # One owner: ffi.gc frees the session if close() is never called.
        self._handle = ffi.gc(out[0], lib.glm4v_session_free)

        info = ffi.new("glm4v_model_info *")
        check(lib.glm4v_session_info(self._handle, info), self._handle)
        self.n_vocab: int = info.n_vocab
        self.n_embd: int = info.n_embd
        self.n_ctx: int = info.n_ctx
        self.image_token_ids = ImageTokenIds(info.begin_image_token, info.image_token, info.end_image_token)
        self._stop_ids = tuple(t for t in (self._token_id(p) for p in STOP_PIECES) if t >= 0)
        # What the KV cache holds: a key per cell (token id, or (image digest, index)) and
        # its positions, so a new prompt can reuse the longest common prefix.
        self._keys: list[Any] = []
        self._positions = PositionLog()
        self._generated_pending: list[int] = []  # emitted ids not yet in the KV cache
        self._last_reused = 0
        # Engine preprocessing and encoder time of the images the current call encoded.
        self._call_preprocess_ms = 0.0
        self._call_encode_ms = 0.0
        self._n_prompt = 0
        self._gen_buffers: dict[int, tuple[Any, ...]] = {}

    # ----------------------------------------------------------------------------- life cycle

    def _check_files(self) -> str:
        header = read_header(self.model_path)
        arch = str(header.metadata.get("general.architecture", ""))
        if arch == "clip":
            raise ModelLoadError(
                f"'{self.model_path}' is a projector (mmproj) file; pass it as mmproj_path and the "
                "text-model GGUF as model_path"
            )
        if arch not in TEXT_ARCHITECTURES:
            raise ModelLoadError(
                f"'{self.model_path}' is a '{arch or 'unknown'}' model; glm4v-mtmd runs GLM-4.xV text "
                f"models ({', '.join(TEXT_ARCHITECTURES)})"
            )
        check_text_model(header, arch, with_projector=self.mmproj_path is not None)
        if self.mmproj_path is not None:
            pheader = read_header(self.mmproj_path)
            pmeta = pheader.metadata
            if pmeta.get("general.architecture") != "clip":
                raise ModelLoadError(
                    f"'{self.mmproj_path}' is not a projector (mmproj) file (architecture "
                    f"'{pmeta.get('general.architecture', 'unknown')}'); pass the mmproj-*.gguf file"
                )
            ptype = pmeta.get("clip.projector_type")
            if ptype is not None and ptype != "glm4v":
                raise ModelLoadError(f"'{self.mmproj_path}' is a '{ptype}' projector, not a GLM-4.xV one (glm4v)")
            check_glm4v_mmproj(pheader)
            if self._cpu_only:
                advice = precision_advice([t.ggml_type for t in pheader.tensors.values() if len(t.shape) >= 2])
                if advice:
                    _native.logger.warning("%s: %s", self.mmproj_path, advice)
        return arch

    def close(self) -> None:
        """Free the native session. Safe to call more than once."""
        with self._lock:
            if self._handle is not None:
                ffi.release(self._handle)
                self._handle = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._handle is None

    def _h(self) -> Any:
        if self._handle is None:
            raise SessionClosedError("the session is closed; create a new Session")
        return self._handle

    def cancel(self) -> None:
        """Ask a running evaluation or generation (in another thread) to stop."""
        h = self._handle
        if h is not None:
            lib.glm4v_cancel(h)

    # ----------------------------------------------------------------------------- vocabulary

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS is added; ``special`` parses pieces like ``<|user|>``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates, e.g. from os.fsdecode of bad bytes
            raise ConfigError(f"the text is not valid Unicode ({exc.reason} at position {exc.start})") from exc
        with self._lock:
            h = self._h()
            n_out = ffi.new("int32_t *")
            cap = len(data) + 8
            buf = ffi.new("int32_t[]", cap)
            status = lib.glm4v_tokenize(h, data, len(data), int(special), buf, cap, n_out)
            if status == lib.GLM4V_ERR_BUFFER_TOO_SMALL:
                cap = n_out[0]
                buf = ffi.new("int32_t[]", cap)
                status = lib.glm4v_tokenize(h, data, len(data), int(special), buf, cap, n_out)
            check(status, h, "tokenize")
            return list(ffi.unpack(buf, n_out[0]))

    def detokenize(self, ids: Sequence[int], *, special: bool = True) -> str:
        """Text of ``ids``; ``special`` renders special pieces (e.g. ``<|begin_of_box|>``)."""
        arr = np.ascontiguousarray(ids, dtype=np.int32)
        with self._lock:
            h = self._h()
            n_out = ffi.new("int32_t *")
            cap = max(64, 8 * len(arr))
            for _ in range(2):
                buf = ffi.new("char[]", cap)
                status = lib.glm4v_detokenize(
                    h, ffi.from_buffer("int32_t[]", arr), len(arr), int(special), buf, cap, n_out
                )
                if status != lib.GLM4V_ERR_BUFFER_TOO_SMALL:
                    break
                cap = n_out[0] + 1
            check(status, h, "detokenize")
            return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")

    def _token_id(self, piece: str) -> int:
        return int(lib.glm4v_token_id(self._h(), piece.encode()))

    # ----------------------------------------------------------------------------- images

    def encode_image(
        self,
        image: ImageInput,
        *,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        max_image_pixels: Optional[int] = None,
    ) -> ImageEmbedding:
        """Preprocess and encode one image with the vision tower and projector.

        The image is prepared exactly as transformers' ``Glm4vImageProcessor`` (see
        :func:`glm4v_mtmd.preprocess`), so the engine receives it at its final size.

        Args:
            image: a path, bytes, file object, PIL image or uint8 ndarray (HxW, HxWx3, HxWx4).
            min_pixels, max_pixels, max_image_pixels: override the session's limits for this image.

        Raises:
            ImageError: the image is unreadable or breaks a preprocessing rule (the session is unaffected).
            ConfigError: an override is invalid.
        """
        min_pixels = self.min_pixels if min_pixels is None else min_pixels
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        max_image_pixels = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        # Limits inside the engine's window keep every smart_resize result inside it too (the aspect
        # limit of 200 bounds what the 28-px minimum side can add), so the engine never resizes.
        check_limits(min_pixels, max_pixels, max_image_pixels, window=self._pixel_window)
        key = content_key(image, (min_pixels, max_pixels)) if self.image_cache.max_bytes else None
        cached = self.image_cache.get(key) if key else None
        if cached is not None:
            return cached
        prepared = prepare_image(image, min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=max_image_pixels)
        emb = self._encode_prepared(prepared)
        self.image_cache.put(key, emb)
        return emb

    def _encode_prepared(self, prepared: Any) -> ImageEmbedding:
        width, height = prepared.size
        with self._lock:
            h = self._h()
            out = ffi.new("glm4v_image **")
            check(lib.glm4v_encode_image(h, ffi.from_buffer(prepared.pixels), width, height, out), h, "encode_image")
            img = ffi.gc(out[0], lib.glm4v_image_free)
            t = ffi.new("glm4v_timings *")
            check(lib.glm4v_get_timings(h, t), h)
            self._call_preprocess_ms += t.t_preprocess_ms
            self._call_encode_ms += t.t_encode_ms
            try:
                n_tokens = lib.glm4v_image_n_tokens(img)
                n_embd = lib.glm4v_image_n_embd(img)
                data = ffi.buffer(lib.glm4v_image_data(img), 4 * n_tokens * n_embd)
                array = np.frombuffer(data, dtype=np.float32).reshape(n_tokens, n_embd).copy()
                grid = (int(lib.glm4v_image_rows(img)), int(lib.glm4v_image_cols(img)))
            finally:
                ffi.release(img)
        array.setflags(write=False)
        digest = hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()
        return ImageEmbedding(array, grid, prepared.original_size, prepared.size, digest)

    # ----------------------------------------------------------------------------- prompts

    def _segments(self, parts: Sequence[PromptPart]) -> list[Segment]:
        if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
            raise TypeError("a prompt is a list of strings and images")
        segments = []
        for part in parts:
            if isinstance(part, str):
                if part:
                    segments.append(Segment(tokens=np.asarray(self.tokenize(part, special=True), dtype=np.int32)))
            elif isinstance(part, ImageEmbedding):
                if part.array.shape[1] != self.n_embd:
                    raise ConfigError(
                        f"the image embedding has width {part.array.shape[1]}, this model needs {self.n_embd}"
                    )
                segments.append(Segment(image=part))
            else:
                segments.append(Segment(image=self.encode_image(part)))
        has_image_tokens = min(self.image_token_ids.begin, self.image_token_ids.image, self.image_token_ids.end) >= 0
        if any(s.image is not None for s in segments) and not has_image_tokens:
            raise GenerationError("this model's vocabulary has no image tokens (<|begin_of_image|>, <|image|>)")
        return segments

    def _wait_idle(self) -> None:
        """With the lock held: wait until no generation of another thread is open (see the class doc)."""
        while self._gen_owner is not None:
            if self._gen_owner == threading.get_ident():
                raise GenerationError(
                    "a stream is still open on this Session in this thread: exhaust it or call its close() "
                    "before starting another call"
                )
            self._idle.wait()

    def _evaluate(self, parts: Sequence[PromptPart]) -> tuple[np.ndarray, np.ndarray, int]:
        self._wait_idle()
        self._call_preprocess_ms = self._call_encode_ms = 0.0
        segments = self._segments(parts)
        layout = PromptLayout(segments, self.image_token_ids)
        keys = layout.keys
        if not keys:
            raise ConfigError("the prompt is empty: pass at least one non-empty string or image")
        if len(keys) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {len(keys)} KV cells (images count one cell per image token) but "
                f"n_ctx is {self.n_ctx}; create the Session with a larger n_ctx or use fewer/smaller images"
            )
        h = self._h()
        # Poll for Ctrl-C in this evaluation and in a generation that follows it (set once per call,
        # not per token).
        _native.arm_interrupts(h)
        reuse = layout.reusable_prefix(self._keys)
        if reuse < lib.glm4v_n_cells(h):
            check(lib.glm4v_kv_truncate(h, reuse), h, "evaluate")
        self._keys = self._keys[:reuse]
        self._positions.truncate(reuse)
        self._generated_pending = []
        c_parts, n_new, keep = layout.native_parts(reuse)
        positions = np.empty((n_new, 3), dtype=np.int32)
        status = lib.glm4v_eval(h, c_parts, len(c_parts), ffi.from_buffer("int32_t[]", positions), n_new)
        del keep
        check(status, h, "evaluate")
        self._keys = keys
        self._positions.extend(positions)
        self._last_reused = reuse
        return layout.tokens, self._positions.array(), reuse

    def evaluate(self, parts: Sequence[PromptPart]) -> Evaluation:
        """Evaluate a prompt and return its tokens, M-RoPE positions and last logits.

        ``parts`` is a list of strings (special pieces are parsed) and images (any image
        input or an :class:`ImageEmbedding`). The KV cache keeps the longest prefix shared
        with the previous prompt, so only new cells are computed.
        """
        with self._lock:
            tokens, positions, reused = self._evaluate(parts)
            logits = np.empty(self.n_vocab, dtype=np.float32)
            h = self._h()
            check(lib.glm4v_get_logits(h, ffi.from_buffer("float[]", logits), self.n_vocab), h, "evaluate")
            return Evaluation(tokens=tokens, positions=positions, logits=logits, reused=reused)

    # ----------------------------------------------------------------------------- generation

    def _begin(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig]) -> int:
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise TypeError("config must be a GenerationConfig")
        tokens, _, _ = self._evaluate(parts)
        h = self._h()
        sp = ffi.new("glm4v_sampling *")
        sp[0] = lib.glm4v_sampling_default()
        sp.temperature = config.temperature
        sp.top_k = config.top_k
        sp.top_p = config.top_p
        sp.min_p = config.min_p
        sp.repeat_penalty = config.repetition_penalty
        sp.repeat_last_n = config.repeat_last_n
        sp.presence_penalty = config.presence_penalty
        sp.frequency_penalty = config.frequency_penalty
        sp.seed = secrets.randbits(32) if config.seed is None else config.seed
        own = () if config.ignore_eos else self._stop_ids
        stops = np.asarray(own + config.stop_token_ids, dtype=np.int32)
        check(
            lib.glm4v_gen_begin(h, sp, ffi.from_buffer("int32_t[]", stops), len(stops), config.max_tokens),
            h,
            "generate",
        )
        return len(tokens)

    def _step_buffers(self, max_steps: int) -> tuple[Any, ...]:
        """Output buffers of glm4v_gen_step, allocated once per step size rather than per token."""
        bufs = self._gen_buffers.get(max_steps)
        if bufs is None:
            bufs = (ffi.new("char[]", _TEXT_CAP), ffi.new("int32_t *"), ffi.new("int32_t[]", max_steps),
                    ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int32_t *"))
            self._gen_buffers[max_steps] = bufs
        return bufs

    def _step(self, max_steps: int) -> tuple[bytes, list[int], Optional[FinishReason]]:
        h = self._h()
        text, text_len, toks, n_toks, finish, stop_tok = self._step_buffers(max_steps)
        status = lib.glm4v_gen_step(h, max_steps, text, _TEXT_CAP, text_len, toks, max_steps, n_toks, finish, stop_tok)
        check(status, h, "generate")
        ids = list(ffi.unpack(toks, n_toks[0]))
        # Emitted tokens but the last are in the KV cache now; record them for prefix reuse.
        n_cells = lib.glm4v_n_cells(h)
        extra = n_cells - len(self._keys)
        if extra > 0:
            self._generated_pending.extend(ids)
            self._keys.extend(self._generated_pending[:extra])
            self._generated_pending = self._generated_pending[extra:]
            self._positions.extend_text(int(lib.glm4v_next_pos(h)) - extra, extra)
        else:
            self._generated_pending.extend(ids)
        reason = _FINISH.get(finish[0]) if finish[0] != lib.GLM4V_FINISH_NONE else None
        return ffi.unpack(text, text_len[0]), ids, reason

    def _timings(self, prompt_tokens: int) -> Timings:
        t = ffi.new("glm4v_timings *")
        h = self._h()
        check(lib.glm4v_get_timings(h, t), h)
        return Timings(
            preprocess_ms=self._call_preprocess_ms,
            encode_ms=self._call_encode_ms,
            prompt_ms=t.t_eval_ms,
            decode_ms=t.t_decode_ms,
            sample_ms=t.t_sample_ms,
            prompt_tokens=prompt_tokens,
            generated_tokens=t.n_decode,
            prompt_batches=t.n_eval_batches,
        )

    def _chunks(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig],
                tokens_per_step: int) -> Iterator[StreamChunk]:
        """The generation loop shared by :meth:`generate` and :meth:`stream`."""
        config = config or GenerationConfig()
        with self._lock:
            self._n_prompt = self._begin(parts, config)
            self._gen_owner = threading.get_ident()
        try:
            stops = StopStrings(config.stop)
            reason: Optional[FinishReason] = None
            while reason is None:
                with self._lock:
                    raw, ids, reason = self._step(tokens_per_step)
                text, hit = stops.feed(raw.decode("utf-8", "replace"), final=reason is not None)
                if hit:
                    reason = "stop"
                if text or ids or reason is not None:
                    yield StreamChunk(text=text, token_ids=tuple(ids), finish_reason=reason)
        finally:  # also when the stream is closed early, garbage-collected or interrupted
            with self._lock:
                self._gen_owner = None
                self._idle.notify_all()

    def generate(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig] = None) -> GenerationResult:
        """Evaluate ``parts`` and generate a reply; the sampling loop runs in C."""
        config = config or GenerationConfig()
        # Several tokens per call into C (the engine polls for Ctrl-C and cancel() before every token);
        # fewer when a stop string may end the generation early.
        with self._lock:
            chunks = list(self._chunks(parts, config, 16 if config.stop else 64))
            return GenerationResult(
                text="".join(c.text for c in chunks),
                token_ids=tuple(t for c in chunks for t in c.token_ids),
                finish_reason=chunks[-1].finish_reason or "length",
                timings=self._timings(self._n_prompt),
                prompt_tokens=self._n_prompt,
            )

    def stream(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig] = None) -> Iterator[StreamChunk]:
        """Like :meth:`generate`, yielding :class:`StreamChunk` s as text is produced.

        Chunks hold complete UTF-8 characters only; the last chunk has ``finish_reason``. From its
        first chunk until it is exhausted or closed, the stream holds the session: other threads'
        calls wait, and this thread's raise :class:`GenerationError`.
        """
        return self._chunks(parts, config, 1)

    # ----------------------------------------------------------------------------- state

    @property
    def n_cells(self) -> int:
        """KV cells in use (prompt, images and generated tokens)."""
        return int(lib.glm4v_n_cells(self._h()))

    def reset(self) -> None:
        """Empty the KV cache."""
        with self._lock:
            self._wait_idle()
            h = self._h()
            check(lib.glm4v_kv_truncate(h, 0), h)
            self._keys = []
            self._positions = PositionLog()

    def metadata(self, key: str) -> Optional[str]:
        """A metadata value of the text model as a string, or ``None`` if absent."""
        with self._lock:
            h = self._h()
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

    # ----------------------------------------------------------------------------- hub

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: Union[str, os.PathLike],
        quant: str = "Q4_K_M",
        mmproj: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        local_files_only: bool = False,
        **session_kwargs: Any,
    ) -> Session:
        """Open the GGUF pair of a hub repository or a local directory.

        The text model is chosen by ``quant`` (the label in its file name, e.g. ``Q4_K_M``) and the
        projector is the ``mmproj*.gguf`` file (``mmproj`` names one; among several, the precision
        this CPU runs fastest is taken: :func:`glm4v_mtmd.hub.projector_preference`). Remaining
        keyword arguments go to :class:`Session`. Needs ``huggingface_hub`` for repository ids.
        """
        from .hub import resolve_pair

        model, proj = resolve_pair(repo_id_or_dir, quant, mmproj, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        return cls(model, proj, **session_kwargs)

    # ----------------------------------------------------------------------------- chat

    @functools.cached_property
    def chat_template(self) -> Optional[str]:
        """The model's Jinja chat template from its GGUF metadata, if any."""
        return self.metadata("tokenizer.chat_template")

    @functools.cached_property
    def chat_family(self) -> Any:
        """The :class:`~glm4v_mtmd.chat.ChatFamily` (prompt format and default sampling) of this model."""
        from .chat import detect_family

        return detect_family(self.architecture, self.chat_template, self.metadata("general.name"))

    @property
    def last_reused(self) -> int:
        """KV cells reused from the previous prompt by the last evaluation."""
        return self._last_reused

    def chat(self, messages: Sequence[Any], config: Optional[GenerationConfig] = None, *,
             thinking: Optional[bool] = None, box_image: int = -1) -> Any:
        """Answer OpenAI-style ``messages``; returns a :class:`~glm4v_mtmd.chat.ChatResult`.

        Messages are ``{"role": "system"|"user"|"assistant", "content": str | [parts]}`` with parts
        ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <path|bytes|PIL|ndarray|
        ImageEmbedding>}`` or ``{"type": "image_url", "image_url": {"url": "data:...;base64,..." | path}}``.
        ``thinking=False`` switches reasoning off on GLM-4.5V/4.6V (``/nothink``); ``config`` defaults to
        the model family's card values. ``ChatResult.boxes`` are mapped to the pixels of image
        ``box_image`` of the conversation (default: the most recent one).
        """
        from .chat import chat

        return chat(self, messages, config, thinking=thinking, box_image=box_image)

    def chat_stream(self, messages: Sequence[Any], config: Optional[GenerationConfig] = None, *,
                    thinking: Optional[bool] = None) -> Iterator[Any]:
        """Like :meth:`chat`, yielding :class:`~glm4v_mtmd.chat.ChatChunk` s (reasoning or answer text)."""
        from .chat import chat_stream

        return chat_stream(self, messages, config, thinking=thinking)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}"
        return f"Session({os.path.basename(self.model_path)!r}, {state})"
