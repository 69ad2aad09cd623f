"""One request's generation, run on a worker thread and read from the event loop.

The worker encodes the request's images (through the model's embedding cache, one encode per
picture however many requests send it at once), then streams the reply from its context. Events
go to the loop through ``call_soon_threadsafe``; :meth:`Job.cancel` (a client gone) stops the
job's own image encode at its next vision layer, or the generation at its next token or prompt batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Optional

from .. import chat as _chat
from .._handles import EncodeCancel
from .._prompt import CallStats
from ..chat import ChatChunk, OutputSplitter, ground_boxes
from ..context import tokens_per_call
from ..errors import ContextOverflowError, GenerationError, Glm4vError, ImageError, RpcError, SessionClosedError
from .protocol import ChatRequest, RequestError


def to_request_error(exc: BaseException) -> RequestError:
    """A library error as the HTTP error the client should see."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return RequestError(str(exc), kind="exceed_context_size_error")
    if isinstance(exc, (ImageError, ValueError)):  # ConfigError is a ValueError
        return RequestError(str(exc))
    if isinstance(exc, SessionClosedError):
        return RequestError("the server is shutting down", status=503, kind="unavailable_error")
    if isinstance(exc, RpcError):  # the model is gone until the server is restarted
        return RequestError(f"{exc} (restart glm4v-mtmd serve)", status=503, kind="unavailable_error")
    if isinstance(exc, Glm4vError):
        return RequestError(str(exc), status=500, kind="server_error")
    return RequestError(f"internal error: {type(exc).__name__}", status=500, kind="server_error")


class Job:
    """A request's run on one context: a thread producing :class:`ChatChunk` s, read asynchronously."""

    def __init__(self, model: Any, context: Any, request: ChatRequest, replay: Optional[str] = None) -> None:
        self.model = model
        self.context = context
        self.request = request
        self.replay = replay
        self.stats = CallStats()
        self.images_encoded = 0
        self.encodes_cancelled = 0
        # Set when the client leaves; the engine reads it too, to stop this job's running encode (not one
        # it waits for).
        self.cancelled = EncodeCancel()
        self.finish: Optional[str] = None
        self.error: Optional[BaseException] = None  # what ended the run, if it failed
        self._lock = threading.Lock()
        self._finished = False  # the context is no longer this job's (it may serve the next request)
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def cancel(self) -> None:
        """Stop the generation (from any thread): at its next token, or its next prompt batch.

        A no-op once the job has finished: its context may already serve another request.
        """
        with self._lock:
            if self._finished:
                return
            self.cancelled.set()
            self.context.cancel()

    def _emit(self, kind: str, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _messages(self) -> list[dict[str, Any]]:
        """The request's messages with its images encoded (cached embeddings where the model has them)."""
        out = []
        for msg in self.request.messages:
            content = msg["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image":
                        before = self.stats.encode_ms
                        try:
                            emb = self.model._encode(part["image"], self.stats, cancel=self.cancelled)
                        except GenerationError:
                            self.encodes_cancelled += self.cancelled.is_set()
                            raise
                        self.images_encoded += self.stats.encode_ms > before
                        part = {"type": "image", "image": emb}
                    parts.append(part)
                msg = {**msg, "content": parts}
            out.append(msg)
        return out

    def run(self, on_done: Callable[[], None]) -> None:
        """The worker thread's body; ``on_done`` runs (on the worker) once the context is free again."""
        try:
            messages = self._messages()
            if self.cancelled.is_set():
                raise GenerationError("cancelled")
            req = self.request
            config = req.config if self.replay is None else dataclasses.replace(req.config, max_tokens=0)
            # A non-streamed reply is read whole: several tokens per call into C.
            steps = 1 if req.stream else tokens_per_call(config)
            stream = _chat.chat_stream(self.context, messages, config, thinking=req.thinking, tokens_per_step=steps)
            if self.replay is not None:
                stream = self._replayed(stream, messages)
            try:
                for chunk in stream:
                    if self.cancelled.is_set():
                        self.context.cancel()
                    if chunk.finish_reason is not None:
                        self.finish = chunk.finish_reason
                        assert chunk.timings is not None
                        chunk = dataclasses.replace(chunk, timings=dataclasses.replace(
                            chunk.timings, encode_ms=self.stats.encode_ms, preprocess_ms=self.stats.preprocess_ms))
                    self._emit("chunk", chunk)
            finally:
                stream.close()
        except BaseException as exc:  # noqa: BLE001 - every failure goes to the client as an error object
            if self.cancelled.is_set():
                self.finish = "cancelled"
            self.error = exc
            self._emit("error", exc)
        finally:
            with self._lock:
                self._finished = True
            on_done()
            self._emit("end", None)

    def _replayed(self, stream: Iterator[ChatChunk], messages: list[dict[str, Any]]) -> Iterator[ChatChunk]:
        """The test hook of ``ServerOptions.replay``: the prompt is evaluated, the reply is the fixed text
        (split and grounded as a generated one), one chunk per character."""
        *_, last = stream
        family = self.model.chat_family
        thinks = family.always_thinks or self.request.thinking is not False
        splitter = OutputSplitter(thinks)
        pieces = [p for ch in self.replay or "" for p in splitter.feed(ch)] + splitter.feed("", final=True)
        answer = "".join(text for text, kind in pieces if kind == "answer").strip()
        images = [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"]
        usage = dataclasses.replace(last.usage, completion_tokens=len(self.model.tokenize(self.replay or "")))
        for text, kind in pieces:
            yield ChatChunk(text, kind)
        yield dataclasses.replace(last, text="", finish_reason="stop", usage=usage,
                                  boxes=ground_boxes(answer, images, -1))

    async def events(self) -> AsyncIterator[ChatChunk]:
        """The reply's chunks as they come; raises the job's failure as a :class:`RequestError`."""
        while True:
            kind, value = await self._queue.get()
            if kind == "chunk":
                yield value
            elif kind == "error":
                raise to_request_error(value)
            else:
                return
