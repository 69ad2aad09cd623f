"""`Model`: a loaded GLM-4.xV model pair, shared by the conversations (:class:`~glm4v_mtmd.Context`) on it."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from . import _native
from ._cache import EmbeddingCache, content_key
from ._cpu import precision_advice
from ._gguf_probe import read_header
from ._handles import EncodeCancel, ModelHandle
from ._native import call_scope
from ._prompt import CallStats, ImageTokenIds
from ._validate import check_glm4v_mmproj, check_text_model
from .errors import (
    ConfigError,
    ContextOverflowError,
    ImageError,
    ModelLoadError,
    NoFreeContextError,
    SessionClosedError,
)
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PIXELS_PER_TOKEN,
    ImageInput,
    check_limits,
    prepare_image,
)
from .rpc import RpcServers, parse_endpoints, probe
from .types import GenerationConfig, ImageEmbedding, VideoEmbedding

if TYPE_CHECKING:
    from .chat import ChatFamily, ChatResult, Message
    from .context import Context

#: KV-cache types by name (ggml_type values).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
#: Architectures of GLM-4.xV text models (glm4v -> glm4, glm4v_moe -> glm4moe).
TEXT_ARCHITECTURES = ("glm4", "glm4moe")
#: Pieces that end a GLM turn (the checkpoints' generation_config eos ids).
STOP_PIECES = ("<|endoftext|>", "<|user|>", "<|observation|>")
#: Most contexts one model may hold (the engine's limit of sequences).
MAX_PARALLEL = 256


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


def _check_tensor_split(split: Optional[Sequence[float]], servers: list[str]) -> Optional[list[float]]:
    if split is None:
        return None
    if not servers:
        raise ConfigError("tensor_split places layers on rpc_servers; none are given")
    try:
        values = [float(v) for v in split]
    except (TypeError, ValueError):
        raise ConfigError(f"tensor_split={split!r}: a sequence of numbers, one per server") from None
    if not values or any(not (v >= 0 and v < float("inf")) for v in values) or not any(values):
        raise ConfigError(f"tensor_split={split!r}: finite numbers >= 0, at least one positive")
    return values


def _mmproj_server(device: Optional[str], servers: list[str]) -> int:
    """``mmproj_device`` → -1 (local) or the index of the RPC server that runs the projector."""
    if device is None or device == "local":
        return -1
    if isinstance(device, str) and device in servers:
        return servers.index(device)
    raise ConfigError(f"mmproj_device={device!r}: 'local' (the default) or one of rpc_servers "
                      f"({', '.join(servers) or 'none given'})")


@functools.cache
def _video_patch_applied() -> bool:
    return "0005-mtmd-glm4v-video-frame-pairs.patch" in _native.engine_info()["patches"]


def _check_video_patch() -> None:
    if not _video_patch_applied():
        raise ConfigError("video needs the engine patch 0005 (frame pairs), which this build lacks: a user "
                          "engine checkout (GLM4V_LLAMA_CPP_DIR) is never patched; build with the pinned tree")


class Model:
    """A GLM-4.xV text model plus its vision projector, loaded once for several conversations.

    Args:
        model_path: text-model GGUF (architecture ``glm4`` or ``glm4moe``).
        mmproj_path: projector GGUF (``mmproj-*.gguf``); ``None`` for text only.
        n_ctx: KV cells of **each** context (conversation). An image fills one cell per image token.
            The engine allocates ``n_ctx * n_parallel`` cells, a separate stream per context, so one
            context never takes another's room; a prompt that does not fit raises
            :class:`ContextOverflowError` naming the numbers.
        n_parallel: contexts that can be open at once (1..256). Contexts that generate at the same
            time from different threads are decoded together: one engine pass per token for all.
        n_threads: CPU threads (default: the CPUs available to this process).
        n_gpu_layers: layers to offload to a GPU backend or to ``rpc_servers`` (-1 = all; the
            default is 0, or -1 when ``rpc_servers`` are given).
        flash_attn: ``None`` lets the engine decide, ``True``/``False`` force it.
        kv_cache_type: one of :data:`KV_CACHE_TYPES` (``"f32"`` for exact comparisons).
        n_batch: cells per engine batch in prompt evaluation.
        use_mmap: memory-map the model file.
        min_pixels, max_pixels: image size limits of the reference preprocessing, in pixels
            counting both temporal frames as the checkpoints' preprocessor config does (one image
            token = 1,568 pixels; defaults 12,544 / 9,633,792 = 8 / 6,144 tokens). They may only
            narrow the engine's window of 8 .. 6,144 tokens, which it would otherwise resize into.
        max_image_pixels: largest width*height accepted, checked on the file header before
            decoding (decompression bombs); Pillow's 178,956,970 by default.
        image_cache_mb: size of the LRU cache of image embeddings keyed by image content (0 = off),
            shared by the model's contexts: a conversation re-sends its images every turn, and
            they are encoded once.
        chat_template: a Jinja chat template used instead of the GGUF's ``tokenizer.chat_template``
            (for models whose template does not place images); it decides the family's detection too.
        rpc_servers: ggml RPC servers (``glm4v-mtmd rpc-server`` on other machines), as a list of
            ``"host:port"`` or one comma-separated string. The text model's layers are split
            across their devices in this order (then any local GPU); the token embeddings stay
            here. Each endpoint is probed first: a wrong one raises :class:`ModelLoadError`.
            See :mod:`glm4v_mtmd.rpc` for the security warning.
        tensor_split: share of the layers per server (e.g. ``[2, 1]``); default: by each
            server's free memory.
        mmproj_device: where the vision projector runs: ``"local"`` (the default: this
            machine's GPU if any, else its CPU) or one of ``rpc_servers``.
        cpu_repack: let the CPU keep the text model's weights in its faster repacked / AMX
            layouts (quantized types; F16 too on AMX CPUs when ``GGML_CPU_AMX=1``). RPC servers never repack,
            so ``False`` makes a local run compute exactly what a split run computes.
        rpc_timeout_s: an RPC server that does not answer a command within this time (it hangs, or
            its machine is gone) counts as lost, as one whose connection closes does: the call
            raises :class:`RpcError` and the model is unusable until it is loaded again (its layers
            and KV cache on that server are gone). It must exceed the longest computation one
            server runs in a step (a 512-token prompt batch through its layers). 0 = wait forever.

    Threads: a model may be shared. Its vocabulary calls run in parallel; image encodes take turns
    on the one projector; each :class:`Context` is one conversation, used by one thread at a time.
    A model is a context manager; :meth:`close` (idempotent) closes its contexts first.
    """

    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        mmproj_path: Union[str, os.PathLike, None] = None,
        *,
        n_ctx: int = 4096,
        n_parallel: int = 1,
        n_threads: Optional[int] = None,
        n_gpu_layers: Optional[int] = None,
        flash_attn: Optional[bool] = None,
        kv_cache_type: str = "f16",
        n_batch: int = 2048,
        use_mmap: bool = True,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        image_cache_mb: float = 256,
        chat_template: Optional[str] = None,
        rpc_servers: RpcServers = None,
        tensor_split: Optional[Sequence[float]] = None,
        mmproj_device: Optional[str] = None,
        cpu_repack: bool = True,
        rpc_timeout_s: float = 120.0,
    ) -> None:
        self._handle: Optional[ModelHandle] = None
        self._lock = threading.RLock()  # the image cache, the set of open contexts, closing
        self._contexts: weakref.WeakSet[Context] = weakref.WeakSet()
        self._encoding: dict[str, threading.Event] = {}  # content keys of the encodes running now
        _check_positive("n_ctx", n_ctx)
        _check_positive("n_parallel", n_parallel)
        if n_parallel > MAX_PARALLEL:
            raise ConfigError(f"n_parallel={n_parallel}: at most {MAX_PARALLEL} contexts per model")
        _check_positive("n_threads", n_threads, allow_none=True)
        _check_positive("n_batch", n_batch)
        # The engine's image-token window (the load params keep the C defaults): images outside it
        # would be resized again by llama.cpp, so the limits may only narrow it.
        engine = _native.lib.glm4v_load_params_default()
        self._pixel_window = (engine.image_min_tokens * PIXELS_PER_TOKEN, engine.image_max_tokens * PIXELS_PER_TOKEN)
        check_limits(min_pixels, max_pixels, max_image_pixels, window=self._pixel_window)
        self.rpc_servers: list[str] = parse_endpoints(rpc_servers)
        if n_gpu_layers is None:
            n_gpu_layers = -1 if self.rpc_servers else 0
        if not isinstance(n_gpu_layers, int) or isinstance(n_gpu_layers, bool) or n_gpu_layers < -1:
            raise ConfigError(f"n_gpu_layers={n_gpu_layers!r}: must be an integer >= -1 (-1 = all)")
        split = _check_tensor_split(tensor_split, self.rpc_servers)
        mmproj_server = _mmproj_server(mmproj_device, self.rpc_servers)
        if isinstance(rpc_timeout_s, bool) or not isinstance(rpc_timeout_s, (int, float)) or not (
                0 <= rpc_timeout_s <= 86400):
            raise ConfigError(f"rpc_timeout_s={rpc_timeout_s!r}: seconds in 0..86400 (0 = wait forever)")
        if flash_attn not in (None, True, False):
            raise ConfigError(f"flash_attn={flash_attn!r}: must be None, True or False")
        if kv_cache_type not in KV_CACHE_TYPES:
            raise ConfigError(f"kv_cache_type={kv_cache_type!r}: must be one of {', '.join(KV_CACHE_TYPES)}")
        if not isinstance(image_cache_mb, (int, float)) or image_cache_mb < 0:
            raise ConfigError(f"image_cache_mb={image_cache_mb!r}: must be a number >= 0")
        if chat_template is not None and (not isinstance(chat_template, str) or not chat_template.strip()):
            raise ConfigError("chat_template must be a non-empty string (the Jinja template's text)")
        self._chat_template_override = chat_template

        self.model_path = os.fspath(model_path)
        self.mmproj_path = os.fspath(mmproj_path) if mmproj_path is not None else None
        local_backends = set(_native.engine_info()["backends"]) - {"CPU", "RPC"}
        self._cpu_only = mmproj_server < 0 and (n_gpu_layers == 0 or not local_backends)
        self.architecture = self._check_files()
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_image_pixels = max_image_pixels
        self.image_cache = EmbeddingCache(int(image_cache_mb * (1 << 20)))

        threads = n_threads or _default_threads()
        options = {
            "n_ctx": n_ctx, "n_parallel": n_parallel, "n_batch": n_batch, "n_ubatch": min(512, n_batch),
            "n_threads": threads, "n_threads_batch": threads, "n_gpu_layers": n_gpu_layers,
            "flash_attn": -1 if flash_attn is None else int(flash_attn),
            "type_k": KV_CACHE_TYPES[kv_cache_type], "type_v": KV_CACHE_TYPES[kv_cache_type],
            "use_mmap": int(use_mmap), "mmproj_rpc_server": mmproj_server, "cpu_repack": int(bool(cpu_repack)),
            "rpc_timeout_ms": int(rpc_timeout_s * 1000),
        }
        # Every server answers a hello first: a bad endpoint would abort the process inside the engine.
        for endpoint in self.rpc_servers:
            probe(endpoint)
        with call_scope():
            self._handle = ModelHandle(self.model_path, self.mmproj_path, options,
                                       rpc_servers=self.rpc_servers, tensor_split=split)
        facts = self._handle.facts
        self.n_vocab: int = facts.n_vocab
        self.n_embd: int = facts.n_embd
        self.n_ctx: int = facts.n_ctx
        self.n_parallel: int = facts.n_parallel
        self.n_batch: int = n_batch
        self.load_ms: float = facts.load_ms
        self.image_token_ids = ImageTokenIds(facts.begin_image_token, facts.image_token, facts.end_image_token)
        self.stop_ids = tuple(t for t in (self._handle.token_id(p) for p in STOP_PIECES) if t >= 0)

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
        """Close every context of the model, then free it. Safe to call more than once."""
        with self._lock:
            for ctx in list(self._contexts):
                ctx.close()
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def __enter__(self) -> Model:
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

    def _h(self) -> ModelHandle:
        handle = self._handle
        if handle is None:
            raise SessionClosedError("the model is closed; load it again")
        return handle

    # ----------------------------------------------------------------------------- contexts

    def context(self) -> Context:
        """A new conversation on this model (one of its ``n_parallel`` KV sequences).

        Raises:
            NoFreeContextError: all ``n_parallel`` contexts are open (close one, or load the model
                with a larger ``n_parallel``).
        """
        from .context import Context

        with self._lock:
            self._h()
            n_open = len(self._contexts)
            if n_open >= self.n_parallel:
                raise NoFreeContextError(
                    f"all {self.n_parallel} contexts of this model are open (n_parallel={self.n_parallel}): "
                    "close one, or load the model with a larger n_parallel"
                )
            ctx = Context(self)
            self._contexts.add(ctx)
            return ctx

    @property
    def n_open_contexts(self) -> int:
        """Contexts of this model that are open now."""
        return len(self._contexts)

    @property
    def engine_steps(self) -> tuple[int, int]:
        """``(steps, requests)``: engine passes run so far and the pieces of work they served (a prompt
        chunk or one generated token of a context). ``requests > steps`` when contexts shared passes."""
        return self._h().steps()

    def _forget(self, ctx: Context) -> None:
        with self._lock:
            self._contexts.discard(ctx)

    # ----------------------------------------------------------------------------- vocabulary

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS is added; ``special`` parses pieces like ``<|user|>``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates, e.g. from os.fsdecode of bad bytes
            raise ConfigError(f"the text is not valid Unicode ({exc.reason} at position {exc.start})") from exc
        return self._h().tokenize(data, special)

    def detokenize(self, ids: Sequence[int], *, special: bool = True) -> str:
        """Text of ``ids``; ``special`` renders special pieces (e.g. ``<|begin_of_box|>``)."""
        return self._h().detokenize(np.ascontiguousarray(ids, dtype=np.int32), special)

    def metadata(self, key: str) -> Optional[str]:
        """A metadata value of the text model as a string, or ``None`` if absent."""
        return self._h().metadata(key)

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
        :func:`glm4v_mtmd.preprocess`), so the engine receives it at its final size. Embeddings are
        cached by image content (``image_cache_mb``), shared by the model's contexts.

        Args:
            image: a path, bytes, file object, PIL image or uint8 ndarray (HxW, HxWx3, HxWx4).
            min_pixels, max_pixels, max_image_pixels: override the model's limits for this image.

        Raises:
            ImageError: the image is unreadable or breaks a preprocessing rule (the model is unaffected).
            ConfigError: an override is invalid.
        """
        return self._encode(image, None, min_pixels=min_pixels, max_pixels=max_pixels,
                            max_image_pixels=max_image_pixels)

    def _encode(self, image: ImageInput, stats: Optional[CallStats], *, min_pixels: Optional[int] = None,
                max_pixels: Optional[int] = None, max_image_pixels: Optional[int] = None,
                cancel: Optional[EncodeCancel] = None) -> ImageEmbedding:
        """encode_image, adding the engine's time to ``stats`` (the running call's) when it encodes;
        ``cancel`` stops this call's own encode (another call's that it waits for runs on)."""
        min_pixels = self.min_pixels if min_pixels is None else min_pixels
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        max_image_pixels = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        # Limits inside the engine's window keep every smart_resize result inside it too (the aspect
        # limit of 200 bounds what the 28-px minimum side can add), so the engine never resizes.
        check_limits(min_pixels, max_pixels, max_image_pixels, window=self._pixel_window)
        key = content_key(image, (min_pixels, max_pixels)) if self.image_cache.max_bytes else None
        return self._cached(key, lambda: self._encode_now(image, stats, min_pixels, max_pixels, max_image_pixels,
                                                          cancel))

    def _cached(self, key: Optional[str], encode: Callable[[], ImageEmbedding]) -> ImageEmbedding:
        """``encode()``'s embedding through the cache under ``key`` (None: not cached).

        One encode per key: threads asking for one being encoded wait for that encode and take its
        result from the cache (if it failed or did not fit, the next one tries).
        """
        if not key:
            return encode()
        while True:
            with self._lock:
                cached = self.image_cache.get(key)
                if cached is not None:
                    return cached
                running = self._encoding.get(key)
                if running is None:
                    done = self._encoding[key] = threading.Event()
                    break
            running.wait()
        try:
            emb = encode()
            with self._lock:
                self.image_cache.put(key, emb)
            return emb
        finally:
            with self._lock:
                del self._encoding[key]
            done.set()

    def _encode_now(self, image: ImageInput, stats: Optional[CallStats], min_pixels: int, max_pixels: int,
                    max_image_pixels: int, cancel: Optional[EncodeCancel] = None) -> ImageEmbedding:
        prepared = prepare_image(image, min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=max_image_pixels)
        width, height = prepared.size
        with call_scope():
            encoded = self._h().encode(prepared.pixels, width, height, cancel=cancel)
        if stats is not None:
            stats.preprocess_ms += encoded.preprocess_ms
            stats.encode_ms += encoded.encode_ms
        # The digest is computed from the (read-only) array.
        return ImageEmbedding(encoded.array, encoded.grid, prepared.original_size, prepared.size)

    def encode_video(
        self,
        video: Any,
        *,
        source_fps: Optional[float] = None,
        duration: Optional[float] = None,
        fps: Optional[float] = None,
        variant: Optional[str] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        max_frames: Optional[int] = None,
        progress: bool = False,
    ) -> VideoEmbedding:
        """Preprocess a clip as the family's transformers video processor does and encode each frame pair.

        Args:
            video: a file path (PyAV, the ``[video]`` extra), a uint8 ``(T, H, W, 3)`` array with
                ``source_fps``, a list of ``(seconds, frame)`` pairs, or a
                :class:`~glm4v_mtmd.video.PreprocessedVideo`. See :func:`glm4v_mtmd.preprocess_video`.
            source_fps, duration, fps, min_pixels, max_pixels, max_frames: as
                :func:`~glm4v_mtmd.preprocess_video` (pixels over all sampled frames; defaults: the video
                processors'; ``max_frames`` departs from the reference to fit a long clip).
            variant: ``"glm4v"`` or ``"glm46v"``; default: the one of this model's family.
            progress: a tqdm bar over the pairs.

        Raises:
            VideoError: unreadable video, or a frame pair outside the projector's token window.
            ContextOverflowError: the video alone needs more tokens than ``n_ctx`` (checked before encoding).
        """
        return self._encode_video(video, None, source_fps=source_fps, duration=duration, fps=fps, variant=variant,
                                  min_pixels=min_pixels, max_pixels=max_pixels, max_frames=max_frames,
                                  progress=progress)

    def _encode_video(self, video: Any, stats: Optional[CallStats], *, source_fps: Optional[float] = None,
                      duration: Optional[float] = None, fps: Optional[float] = None, variant: Optional[str] = None,
                      min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                      max_frames: Optional[int] = None, progress: bool = False) -> VideoEmbedding:
        from .video import (
            VIDEO_MAX_PIXELS,
            VIDEO_MIN_PIXELS,
            PreprocessedVideo,
            VideoError,
            default_variant,
            preprocess_video,
        )

        _check_video_patch()  # before a clip is decoded
        if isinstance(video, PreprocessedVideo):
            pre = video
        else:
            pre = preprocess_video(video, source_fps=source_fps, duration=duration, fps=fps,
                                   variant=variant or default_variant(self.chat_family.name),
                                   min_pixels=VIDEO_MIN_PIXELS if min_pixels is None else min_pixels,
                                   max_pixels=VIDEO_MAX_PIXELS if max_pixels is None else max_pixels,
                                   max_frames=max_frames)
        per_pair = pre.tokens_per_pair
        low, high = (w // PIXELS_PER_TOKEN for w in self._pixel_window)
        if not low <= per_pair <= high:
            width, height = pre.resized_size
            raise VideoError(
                f"each frame pair of this video is {width}x{height} = {per_pair} image tokens, outside the "
                f"projector's window of {low}..{high} tokens per image: "
                + ("lower max_pixels" if per_pair > high else "raise min_pixels")
                + f" (now spread over {len(pre.frame_indices)} frames)")
        # Cells the video fills: per pair its tokens, two markers and the timestamp; two more markers.
        stamp_tokens = sum(len(self.tokenize(t)) for t in pre.timestamp_texts)
        needed = pre.n_pairs * (per_pair + 2) + stamp_tokens + 2
        if needed > self.n_ctx:
            raise ContextOverflowError(
                f"this video needs {needed} tokens ({pre.n_pairs} frame pairs of {per_pair} tokens) and n_ctx is "
                f"{self.n_ctx}: raise n_ctx, lower max_pixels (the pixels of all sampled frames, now "
                f"{pre.resized_size[0]}x{pre.resized_size[1]} each), or use fewer frames (max_frames, now "
                f"{len(pre.frame_indices)}; or a lower fps with the glm4v variant)")
        pairs = []
        bar = None
        if progress and pre.n_pairs > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=pre.n_pairs, desc="video", unit="pair")
        try:
            for k in range(pre.n_pairs):
                frames = pre.frames[2 * k: 2 * k + 2]
                key = "pair:" + hashlib.blake2b(frames.tobytes(), digest_size=20).hexdigest() \
                    if self.image_cache.max_bytes else None
                pairs.append(self._cached(key, lambda frames=frames: self._encode_pair(frames, stats)))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return VideoEmbedding(tuple(pairs), pre.timestamp_texts, pre.timestamps,
                              tuple(int(i) for i in pre.frame_indices), pre.original_size, pre.resized_size,
                              pre.variant)

    def _encode_pair(self, frames: np.ndarray, stats: Optional[CallStats] = None) -> ImageEmbedding:
        """One video frame pair, uint8 ``[2, height, width, 3]`` already at its final size (sides
        multiples of 28): frame 0 through the first temporal kernel, frame 1 through the second."""
        _check_video_patch()
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != 2 or frames.shape[3] != 3:
            raise ImageError(f"a frame pair is uint8 [2, height, width, 3], not {frames.dtype} {frames.shape}")
        _, height, width, _ = frames.shape
        first, second = np.ascontiguousarray(frames[0]), np.ascontiguousarray(frames[1])
        with call_scope():
            encoded = self._h().encode(first, width, height, second)
        if stats is not None:
            stats.preprocess_ms += encoded.preprocess_ms
            stats.encode_ms += encoded.encode_ms
        return ImageEmbedding(encoded.array, encoded.grid, (width, height), (width, height))

    # ----------------------------------------------------------------------------- chat

    @functools.cached_property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template: the one given to the constructor, else the GGUF's, if any."""
        return self._chat_template_override or self.metadata("tokenizer.chat_template")

    @functools.cached_property
    def chat_family(self) -> ChatFamily:
        """The :class:`~glm4v_mtmd.chat.ChatFamily` (prompt format and default sampling) of this model."""
        from .chat import detect_family

        return detect_family(self.architecture, self.chat_template, self.metadata("general.name"))

    def chat_many(
        self,
        conversations: Sequence[Sequence[Message]],
        config: Optional[GenerationConfig] = None,
        *,
        thinking: Optional[bool] = None,
        box_image: int = -1,
        progress: bool = True,
    ) -> list[ChatResult]:
        """Answer many independent conversations, up to ``n_parallel`` at once; results in order.

        The common bulk job — many pictures, one question — as
        ``model.chat_many([[{"role": "user", "content": [{"type": "image", "image": p}, q]}] for p in pictures])``.
        Each conversation gets a fresh context (the free ones, opened here and closed at the end), in
        its own thread, so their tokens are decoded in shared engine passes and one conversation's
        image encode overlaps the others' decoding. ``progress`` shows a tqdm bar.

        Raises:
            NoFreeContextError: every context of the model is already open elsewhere.
        """
        from tqdm.auto import tqdm

        if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
            raise ConfigError("conversations must be a list of message lists")
        if not conversations:
            return []
        with self._lock:
            free = self.n_parallel - len(self._contexts)
            if free <= 0:
                raise NoFreeContextError(
                    f"chat_many needs a free context, but all {self.n_parallel} of this model are open"
                )
            contexts = [self.context() for _ in range(min(free, len(conversations)))]
        pool: list[Context] = list(contexts)
        pool_lock = threading.Lock()

        def answer(messages: Sequence[Message]) -> ChatResult:
            with pool_lock:
                ctx = pool.pop()
            try:
                # No reset: the context keeps only the prefix this conversation shares with the last.
                return ctx.chat(messages, config, thinking=thinking, box_image=box_image)
            finally:
                with pool_lock:
                    pool.append(ctx)

        bar = tqdm(total=len(conversations), desc="chat_many", unit="conv", disable=not progress)
        try:
            with ThreadPoolExecutor(max_workers=len(contexts), thread_name_prefix="glm4v-chat") as ex:
                futures = [ex.submit(answer, conv) for conv in conversations]
                for fut in futures:
                    fut.add_done_callback(lambda _f: bar.update(1))
                return [fut.result() for fut in futures]
        finally:
            bar.close()
            for ctx in contexts:
                ctx.close()

    # ----------------------------------------------------------------------------- hub

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: Union[str, os.PathLike],
        quant: Optional[str] = None,
        mmproj: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        local_files_only: bool = False,
        **model_kwargs: Any,
    ) -> Model:
        """Open the GGUF pair of a hub repository or a local directory.

        The text model is the only one there is, or, among several, the one ``quant`` names (the
        label in its file name, e.g. ``Q8_0``; ``Q4_K_M`` when not given). The projector is the
        ``mmproj*.gguf`` file (``mmproj`` names one; among several, the precision this CPU runs
        fastest is taken: :func:`glm4v_mtmd.hub.projector_preference`). Remaining keyword
        arguments go to the constructor. Needs ``huggingface_hub`` for repository ids; when the hub
        cannot be reached, a cached snapshot is used (:func:`glm4v_mtmd.hub.resolve_pair`).
        """
        from .hub import resolve_pair

        model, proj = resolve_pair(repo_id_or_dir, quant, mmproj, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        return cls(model, proj, **model_kwargs)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}, n_parallel={self.n_parallel}"
        return f"{type(self).__name__}({os.path.basename(self.model_path)!r}, {state})"
