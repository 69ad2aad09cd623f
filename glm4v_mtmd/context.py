"""`Context`: one conversation on a :class:`~glm4v_mtmd.Model` (one KV sequence of it)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from . import chat as _chat
from ._handles import Sampling
from ._native import arm_interrupts, call_scope, lib
from ._prompt import CallStats, PositionLog, PromptLayout, Segment, StopStrings
from .chat import ChatChunk, ChatResult, Message
from .errors import ConfigError, ContextOverflowError, GenerationError
from .images import ImageInput
from .types import (
    Evaluation,
    FinishReason,
    GenerationConfig,
    GenerationResult,
    ImageEmbedding,
    StreamChunk,
    Timings,
    Tokens,
    VideoEmbedding,
)

if TYPE_CHECKING:
    from .model import Model

#: A prompt part: text (special pieces parsed), token ids as given, or an image.
PromptPart = Union[str, Tokens, ImageEmbedding, VideoEmbedding, ImageInput]

_FINISH: dict[int, FinishReason] = {
    lib.GLM4V_FINISH_STOP: "stop",
    lib.GLM4V_FINISH_LENGTH: "length",
    lib.GLM4V_FINISH_CONTEXT: "context",
    lib.GLM4V_FINISH_CANCELLED: "cancelled",
}


def tokens_per_call(config: GenerationConfig) -> int:
    """Tokens per call into C when nobody reads them one by one (the engine polls for Ctrl-C and
    cancel() before every token); fewer when a stop string may end the generation early."""
    return 16 if config.stop else 64


# Tokens a streamed generation may run ahead of its reader (the engine decodes on while the reader
# handles a chunk, rather than every step waiting for it to come back).
STREAM_AHEAD = 16


def _check_in_vocabulary(ids: Sequence[int], n_vocab: int, what: str = "") -> None:
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ConfigError(f"{what}token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")


class Context:
    """One conversation on a :class:`Model`: its KV sequence, the prefix it holds and its positions.

    Made by :meth:`Model.context`. Holds up to ``model.n_ctx`` KV cells (an image fills one per image
    token; generated tokens one each). Each call (``evaluate``, ``generate``, ``stream``, ``chat``,
    ``chat_stream``) keeps the longest prefix the new prompt shares with what this context holds,
    so a follow-up question computes only its new cells; other contexts of the model never share or
    disturb them.

    Threads: contexts of one model run in parallel in different threads, and their generations are
    decoded together (one engine pass per token for all of them). Calls on one context are
    serialised: a generation (or an open stream) holds it until it finishes, and other threads'
    calls wait. The same thread starting another call while its own stream is still open gets a
    :class:`GenerationError` rather than a deadlock. :meth:`cancel` may be called from any thread.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self._ctx = model._h().open_context()
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._gen_owner: Optional[int] = None  # thread ident of the open generation, if any
        # What the KV sequence holds: a key per cell (token id, or (image digest, index)) and
        # its positions, so a new prompt can reuse the longest common prefix.
        self._keys: list[Any] = []
        self._positions = PositionLog()
        self._generated_pending: list[int] = []  # emitted ids not yet in the KV cache
        self._last_reused = 0

    # ----------------------------------------------------------------------------- life cycle

    @property
    def n_ctx(self) -> int:
        """KV cells this context can hold."""
        return self.model.n_ctx

    def close(self) -> None:
        """Give the context's sequence back to the model. Safe to call more than once."""
        self._ctx.cancel()  # a generation of another thread stops at its next token
        with self._lock:
            if not self._ctx.closed:
                self._ctx.close()
                self.model._forget(self)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (or the model closed)."""
        return self._ctx.closed

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def cancel(self) -> None:
        """Ask the running evaluation or generation (in another thread) to stop.

        A generation then ends with ``finish_reason == "cancelled"``; an evaluation raises
        :class:`GenerationError`. The request holds for the whole call, however its work is split.
        """
        self._ctx.cancel()

    # ----------------------------------------------------------------------------- prompts

    def _segments(self, parts: Sequence[PromptPart], stats: CallStats) -> list[Segment]:
        if isinstance(parts, (str, bytes, Tokens)) or not isinstance(parts, Sequence):
            raise TypeError("a prompt is a list of strings, Tokens and images")
        model = self.model
        # A video is its markers, timestamps and one image part per frame pair.
        parts = [q for p in parts for q in (p.prompt_parts() if isinstance(p, VideoEmbedding) else [p])]
        segments = []
        for part in parts:
            if isinstance(part, str):
                if part:
                    segments.append(Segment(tokens=np.asarray(model.tokenize(part, special=True), dtype=np.int32)))
            elif isinstance(part, Tokens):
                _check_in_vocabulary(part.ids, model.n_vocab)
                if part.ids:
                    segments.append(Segment(tokens=np.asarray(part.ids, dtype=np.int32)))
            elif isinstance(part, ImageEmbedding):
                if part.array.shape[1] != model.n_embd:
                    raise ConfigError(
                        f"the image embedding has width {part.array.shape[1]}, this model needs {model.n_embd}"
                    )
                segments.append(Segment(image=part))
            else:
                segments.append(Segment(image=model._encode(part, stats)))
        ids = model.image_token_ids
        if any(s.image is not None for s in segments) and min(ids.begin, ids.image, ids.end) < 0:
            raise GenerationError("this model's vocabulary has no image tokens (<|begin_of_image|>, <|image|>)")
        return segments

    def _wait_idle(self) -> None:
        """With the lock held: wait until no generation of another thread is open (see the class doc)."""
        while self._gen_owner is not None:
            if self._gen_owner == threading.get_ident():
                raise GenerationError(
                    "a stream is still open on this context in this thread: exhaust it or call its close() "
                    "before starting another call"
                )
            self._idle.wait()

    def _evaluate(self, parts: Sequence[PromptPart], stats: CallStats) -> tuple[np.ndarray, int]:
        """With the lock held and the call begun: evaluate the prompt's new cells; (tokens, reused)."""
        segments = self._segments(parts, stats)
        layout = PromptLayout(segments, self.model.image_token_ids)
        keys = layout.keys
        if not keys:
            raise ConfigError("the prompt is empty: pass at least one non-empty string, Tokens or image")
        if len(keys) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt needs {len(keys)} KV cells (images count one cell per image token) but a "
                f"context holds n_ctx={self.n_ctx}; load the model with a larger n_ctx or use fewer/smaller images"
            )
        ctx = self._ctx
        # Poll for Ctrl-C in this evaluation and in a generation that follows it (set once per call,
        # not per token).
        arm_interrupts(ctx.ptr())
        reuse = layout.reusable_prefix(self._keys)
        if reuse < ctx.n_cells:
            ctx.truncate(reuse)
        self._keys = self._keys[:reuse]
        self._positions.truncate(reuse)
        self._generated_pending = []
        specs, n_new = layout.new_parts(reuse)
        positions = ctx.evaluate(specs, n_new)
        self._keys = keys
        self._positions.extend(positions)
        self._last_reused = reuse
        return layout.tokens, reuse

    def _begin_call(self) -> None:
        self._wait_idle()
        self._ctx.begin_call()

    def evaluate(self, parts: Sequence[PromptPart]) -> Evaluation:
        """Evaluate a prompt and return its tokens, M-RoPE positions and last logits.

        ``parts`` is a list of strings (special pieces are parsed), :class:`Tokens` (ids as given)
        and images (any image input or an :class:`ImageEmbedding`). The KV sequence keeps the longest
        prefix shared with the previous prompt, so only new cells are computed.
        """
        with self._lock, call_scope():
            self._begin_call()
            tokens, reused = self._evaluate(parts, CallStats())
            logits = self._ctx.logits(self.model.n_vocab)
            return Evaluation(tokens=tokens, positions=self._positions.array(), logits=logits, reused=reused)

    # ----------------------------------------------------------------------------- generation

    def _gen_begin(self, parts: Sequence[PromptPart], config: GenerationConfig, stats: CallStats) -> int:
        _check_in_vocabulary([t for t, _ in config.logit_bias], self.model.n_vocab, "logit_bias: ")
        tokens, _ = self._evaluate(parts, stats)
        seed = secrets.randbits(32) if config.seed is None else config.seed
        sampling = Sampling(
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
            repeat_penalty=config.repetition_penalty, repeat_last_n=config.repeat_last_n,
            presence_penalty=config.presence_penalty, frequency_penalty=config.frequency_penalty, seed=seed,
        )
        own = () if config.ignore_eos else self.model.stop_ids
        self._ctx.gen_begin(sampling, own + config.stop_token_ids, config.max_tokens, config.logit_bias)
        return len(tokens)

    def _step(self, max_steps: int) -> tuple[bytes, list[int], Optional[FinishReason]]:
        ctx = self._ctx
        raw, ids, finish = ctx.gen_step(max_steps)
        # Emitted tokens but the last are in the KV cache now; record them for prefix reuse.
        extra = ctx.n_cells - len(self._keys)
        if extra > 0:
            self._generated_pending.extend(ids)
            self._keys.extend(self._generated_pending[:extra])
            self._generated_pending = self._generated_pending[extra:]
            self._positions.extend_text(ctx.next_pos - extra, extra)
        else:
            self._generated_pending.extend(ids)
        reason = _FINISH.get(finish) if finish != lib.GLM4V_FINISH_NONE else None
        return raw, ids, reason

    def _timings(self, prompt_tokens: int, stats: CallStats) -> Timings:
        t = self._ctx.timings()
        return Timings(
            preprocess_ms=stats.preprocess_ms,
            encode_ms=stats.encode_ms,
            prompt_ms=t.t_eval_ms,
            decode_ms=t.t_decode_ms,
            sample_ms=t.t_sample_ms,
            prompt_tokens=prompt_tokens,
            generated_tokens=t.n_decode,
            prompt_batches=t.n_eval_batches,
        )

    def _chunks(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig], tokens_per_step: int,
                stats: Optional[CallStats] = None) -> Iterator[StreamChunk]:
        """The generation loop shared by :meth:`generate`, :meth:`stream` and chat; one call.

        ``stats`` carries what the call did before (chat's image encodes). ``tokens_per_step`` 1
        streams: with several contexts the engine decodes up to :data:`STREAM_AHEAD` tokens ahead of
        the reader, and each call into C returns what is ready (at most every 40 ms; the first token at
        once); with one, each call returns one token.
        """
        config = config or GenerationConfig()
        if not isinstance(config, GenerationConfig):
            raise TypeError("config must be a GenerationConfig")
        stats = stats or CallStats()
        # Each entry into C has its own Ctrl-C scope: nothing of it outlives a yield.
        with self._lock, call_scope():
            self._begin_call()
            n_prompt = self._gen_begin(parts, config, stats)
            if tokens_per_step == 1:
                self._ctx.gen_ahead(STREAM_AHEAD)
                tokens_per_step = STREAM_AHEAD
            self._gen_owner = threading.get_ident()
        try:
            stops = StopStrings(config.stop)
            reason: Optional[FinishReason] = None
            while reason is None:
                with self._lock, call_scope():
                    raw, ids, reason = self._step(tokens_per_step)
                text, hit = stops.feed(raw.decode("utf-8", "replace"), final=reason is not None)
                if hit:
                    reason = "stop"
                if reason is not None:
                    with self._lock:
                        self._ctx.gen_end()
                    yield StreamChunk(text=text, token_ids=tuple(ids), finish_reason=reason,
                                      timings=self._timings(n_prompt, stats))
                elif text or ids:
                    yield StreamChunk(text=text, token_ids=tuple(ids))
        finally:  # also when the stream is closed early, garbage-collected or interrupted
            with self._lock:
                if not self._ctx.closed:
                    self._ctx.gen_end()
                self._gen_owner = None
                self._idle.notify_all()

    def _generate(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig],
                  stats: Optional[CallStats] = None) -> GenerationResult:
        config = config or GenerationConfig()
        with self._lock:
            chunks = list(self._chunks(parts, config, tokens_per_call(config), stats))
        last = chunks[-1]
        assert last.timings is not None and last.finish_reason is not None
        return GenerationResult(
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=last.finish_reason,
            timings=last.timings,
            prompt_tokens=last.timings.prompt_tokens,
        )

    def generate(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig] = None) -> GenerationResult:
        """Evaluate ``parts`` and generate a reply; the sampling loop runs in C.

        ``finish_reason`` is "stop" (a stop token or string), "length" (``max_tokens``), "context"
        (the context's ``n_ctx`` cells are full) or "cancelled" (:meth:`cancel`).
        """
        return self._generate(parts, config)

    def stream(self, parts: Sequence[PromptPart], config: Optional[GenerationConfig] = None) -> Iterator[StreamChunk]:
        """Like :meth:`generate`, yielding :class:`StreamChunk` s as text is produced.

        Chunks hold complete UTF-8 characters only; the last chunk has ``finish_reason`` and the call's
        ``timings``. From its first chunk until it is exhausted or closed, the stream holds the context:
        other threads' calls wait, and this thread's raise :class:`GenerationError`.
        """
        return self._chunks(parts, config, 1)

    # ----------------------------------------------------------------------------- chat

    def chat(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None, *,
             thinking: Optional[bool] = None, box_image: int = -1) -> ChatResult:
        """Answer OpenAI-style ``messages``; returns a :class:`~glm4v_mtmd.chat.ChatResult`.

        Messages are ``{"role": "system"|"user"|"assistant", "content": str | [parts]}`` with parts
        ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <path|bytes|PIL|ndarray|
        ImageEmbedding>}`` or ``{"type": "image_url", "image_url": {"url": "data:...;base64,..." | path}}``.
        ``thinking=False`` switches reasoning off on GLM-4.5V/4.6V (``/nothink``); ``config`` defaults to
        the model family's card values. ``ChatResult.boxes`` are mapped to the pixels of image
        ``box_image`` of the conversation (default: the most recent one). ``timings`` include the
        images this call encoded.
        """
        return _chat.chat(self, messages, config, thinking=thinking, box_image=box_image)

    def chat_stream(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None, *,
                    thinking: Optional[bool] = None, box_image: int = -1) -> Iterator[ChatChunk]:
        """Like :meth:`chat`, yielding :class:`~glm4v_mtmd.chat.ChatChunk` s (reasoning or answer text).

        The last chunk carries ``finish_reason``, ``timings``, ``usage`` and the answer's ``boxes``.
        """
        return _chat.chat_stream(self, messages, config, thinking=thinking, box_image=box_image)

    def _chat_model(self) -> Model:
        return self.model

    # ----------------------------------------------------------------------------- state

    @property
    def n_cells(self) -> int:
        """KV cells in use (prompt, images and generated tokens)."""
        return self._ctx.n_cells

    @property
    def last_reused(self) -> int:
        """KV cells reused from the previous prompt by the last evaluation."""
        return self._last_reused

    def reset(self) -> None:
        """Empty this context's KV sequence."""
        with self._lock:
            self._wait_idle()
            self._ctx.truncate(0)
            self._keys = []
            self._positions = PositionLog()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"seq={self._ctx.seq_id}, n_cells={self.n_cells}/{self.n_ctx}"
        return f"Context({state})"

