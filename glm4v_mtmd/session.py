"""`Session`: one :class:`~glm4v_mtmd.Model` with one :class:`~glm4v_mtmd.Context` — the one-conversation facade."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from .context import Context, PromptPart
from .images import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageInput
from .model import KV_CACHE_TYPES, STOP_PIECES, TEXT_ARCHITECTURES, Model
from .rpc import RpcServers
from .types import Evaluation, GenerationConfig, GenerationResult, ImageEmbedding, StreamChunk, VideoEmbedding

if TYPE_CHECKING:
    from ._cache import EmbeddingCache
    from ._prompt import ImageTokenIds
    from .chat import ChatChunk, ChatFamily, ChatResult, Message

__all__ = ["KV_CACHE_TYPES", "STOP_PIECES", "TEXT_ARCHITECTURES", "PromptPart", "Session"]


class Session:
    """A GLM-4.xV text model plus its vision projector, with one conversation (KV cache).

    ``Session(...)`` is ``Model(..., n_parallel=1)`` plus its one :meth:`Model.context`; for several
    conversations on one loaded model use :class:`Model` and :class:`Context` directly. The arguments
    are :class:`Model`'s (without ``n_parallel``); ``n_ctx`` is the conversation's KV cells.

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
        n_gpu_layers: Optional[int] = None,
        flash_attn: Optional[bool] = None,
        kv_cache_type: str = "f16",
        n_batch: int = 2048,
        use_mmap: bool = True,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        image_cache_mb: float = 256,
        rpc_servers: RpcServers = None,
        tensor_split: Optional[Sequence[float]] = None,
        mmproj_device: Optional[str] = None,
        cpu_repack: bool = True,
        rpc_timeout_s: float = 120.0,
    ) -> None:
        self.model = Model(
            model_path, mmproj_path, n_ctx=n_ctx, n_parallel=1, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn, kv_cache_type=kv_cache_type, n_batch=n_batch, use_mmap=use_mmap,
            min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=max_image_pixels,
            image_cache_mb=image_cache_mb, rpc_servers=rpc_servers, tensor_split=tensor_split,
            mmproj_device=mmproj_device, cpu_repack=cpu_repack,
            rpc_timeout_s=rpc_timeout_s,
        )
        self.context: Context = self.model.context()

    # ----------------------------------------------------------------------------- the model's facts

    @property
    def model_path(self) -> str:
        return self.model.model_path

    @property
    def mmproj_path(self) -> Optional[str]:
        return self.model.mmproj_path

    @property
    def architecture(self) -> str:
        """``glm4`` (GLM-4.1V, GLM-4.6V-Flash) or ``glm4moe`` (GLM-4.5V, GLM-4.6V)."""
        return self.model.architecture

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def n_embd(self) -> int:
        return self.model.n_embd

    @property
    def n_ctx(self) -> int:
        """KV cells of the conversation."""
        return self.model.n_ctx

    @property
    def image_token_ids(self) -> ImageTokenIds:
        return self.model.image_token_ids

    @property
    def image_cache(self) -> EmbeddingCache:
        return self.model.image_cache

    @property
    def min_pixels(self) -> int:
        return self.model.min_pixels

    @property
    def max_pixels(self) -> int:
        return self.model.max_pixels

    @property
    def max_image_pixels(self) -> int:
        return self.model.max_image_pixels

    @property
    def chat_template(self) -> Optional[str]:
        """The model's Jinja chat template from its GGUF metadata, if any."""
        return self.model.chat_template

    @property
    def chat_family(self) -> ChatFamily:
        """The :class:`~glm4v_mtmd.chat.ChatFamily` (prompt format and default sampling) of this model."""
        return self.model.chat_family

    def metadata(self, key: str) -> Optional[str]:
        """A metadata value of the text model as a string, or ``None`` if absent."""
        return self.model.metadata(key)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS is added; ``special`` parses pieces like ``<|user|>``)."""
        return self.model.tokenize(text, special=special)

    def detokenize(self, ids: Sequence[int], *, special: bool = True) -> str:
        """Text of ``ids``; ``special`` renders special pieces (e.g. ``<|begin_of_box|>``)."""
        return self.model.detokenize(ids, special=special)

    def encode_image(self, image: ImageInput, *, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                     max_image_pixels: Optional[int] = None) -> ImageEmbedding:
        """See :meth:`Model.encode_image`."""
        return self.model.encode_image(image, min_pixels=min_pixels, max_pixels=max_pixels,
                                       max_image_pixels=max_image_pixels)

    def encode_video(self, video: Any, *, source_fps: Optional[float] = None, duration: Optional[float] = None,
                     fps: Optional[float] = None, variant: Optional[str] = None, min_pixels: Optional[int] = None,
                     max_pixels: Optional[int] = None, max_frames: Optional[int] = None,
                     progress: bool = False) -> VideoEmbedding:
        """See :meth:`Model.encode_video`."""
        return self.model.encode_video(video, source_fps=source_fps, duration=duration, fps=fps, variant=variant,
                                       min_pixels=min_pixels, max_pixels=max_pixels, max_frames=max_frames,
                                       progress=progress)

    # ----------------------------------------------------------------------------- the conversation

    def evaluate(self, parts: Sequence[PromptPart]) -> Evaluation:
        """See :meth:`Context.evaluate`."""
        return self.context.evaluate(parts)

    def generate(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig] = None) -> GenerationResult:
        """See :meth:`Context.generate`."""
        return self.context.generate(parts, config)

    def stream(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig] = None) -> Iterator[StreamChunk]:
        """See :meth:`Context.stream`."""
        return self.context.stream(parts, config)

    def chat(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None, *,
             thinking: Optional[bool] = None, box_image: int = -1) -> ChatResult:
        """See :meth:`Context.chat`."""
        return self.context.chat(messages, config, thinking=thinking, box_image=box_image)

    def chat_stream(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None, *,
                    thinking: Optional[bool] = None, box_image: int = -1) -> Iterator[ChatChunk]:
        """See :meth:`Context.chat_stream`."""
        return self.context.chat_stream(messages, config, thinking=thinking, box_image=box_image)

    def reset(self) -> None:
        """Empty the KV cache."""
        self.context.reset()

    def cancel(self) -> None:
        """Ask a running evaluation or generation (in another thread) to stop."""
        self.context.cancel()

    @property
    def n_cells(self) -> int:
        """KV cells in use (prompt, images and generated tokens)."""
        return self.context.n_cells

    @property
    def last_reused(self) -> int:
        """KV cells reused from the previous prompt by the last evaluation."""
        return self.context.last_reused

    # ----------------------------------------------------------------------------- life cycle

    def close(self) -> None:
        """Free the conversation and the model. Safe to call more than once."""
        self.model.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self.model.closed

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: Union[str, os.PathLike],
        quant: Optional[str] = None,
        mmproj: Optional[str] = None,
        revision: Optional[str] = None,
        cache_dir: Union[str, os.PathLike, None] = None,
        local_files_only: bool = False,
        **session_kwargs: Any,
    ) -> Session:
        """Open the GGUF pair of a hub repository or a local directory (see :meth:`Model.from_pretrained`)."""
        from .hub import resolve_pair

        model, proj = resolve_pair(repo_id_or_dir, quant, mmproj, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        return cls(model, proj, **session_kwargs)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.n_ctx}"
        return f"Session({os.path.basename(self.model_path)!r}, {state})"
