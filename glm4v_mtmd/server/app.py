"""The ASGI application of ``glm4v-mtmd serve`` (Starlette): routes, key check, limits, metrics.

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events or not), ``GET /v1/models``,
``GET /health`` (public; 503 while the model loads), ``GET /metrics`` (Prometheus text) and the chat
page at ``/`` (public, static; it calls the API with the key the user gives it). One
:class:`~glm4v_mtmd.Model` with ``parallel`` contexts serves every request; requests generating at
the same time are decoded together by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import RpcError
from .jobs import Job, to_request_error
from .page import ui_routes
from .pool import ContextPool, QueueFullError
from .protocol import (
    ChatRequest,
    Limits,
    RequestError,
    boxes_object,
    completion_id,
    error_body,
    finish_reason,
    now,
    parse_request,
    timings_object,
    usage_object,
)

logger = logging.getLogger("glm4v_mtmd.server")

FINGERPRINT = f"glm4v-mtmd-{__version__}"


@dataclass
class ServerOptions:
    """What the operator chose (``glm4v-mtmd serve`` flags)."""

    model_name: str = "glm4v"
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_queue: int = 16
    #: Open connections the server keeps at once (uvicorn's ``limit_concurrency``); past it, new
    #: requests get 503 at once, so idle or slow connections cannot pile up. None: no limit (the
    #: command line's default is ``2 * (parallel + max_queue) + 32``).
    max_connections: Optional[int] = None
    max_body_bytes: int = 32 << 20
    limits: Limits = field(default_factory=Limits)
    default_thinking: Optional[bool] = None
    #: Which reasoning fields replies carry: "both", "reasoning_content" or "reasoning".
    reasoning_field: str = "both"
    #: Serve the chat page at ``/`` (``--no-ui`` turns it off).
    ui: bool = True
    #: A streamed reply whose first token takes longer than this (seconds; a long prompt, many images)
    #: starts at once and sends an SSE comment (``: ping``) this often until it comes, so clients and
    #: proxies do not time out; a failure after that is an error event, not an HTTP status.
    keepalive_s: float = 5.0
    #: Test hook: every reply is this text instead of the model's (the prompt is still evaluated and
    #: the text split and grounded as a reply), for tests of the wire format and of clients.
    replay: Optional[str] = None


class Metrics:
    """Counters and gauges of the server, in Prometheus' text format."""

    _HELP = {
        "requests_total": ("counter", "HTTP requests to /v1/chat/completions by status code"),
        "prompt_tokens_total": ("counter", "prompt tokens of finished requests"),
        "cached_tokens_total": ("counter", "prompt tokens reused from the KV cache"),
        "completion_tokens_total": ("counter", "generated tokens"),
        "generations_total": ("counter", "generations started"),
        "generations_cancelled_total": ("counter", "generations stopped because the client left"),
        "images_total": ("counter", "images in requests"),
        "image_encodes_total": ("counter", "images encoded (the others came from the embedding cache)"),
        "image_encodes_cancelled_total": ("counter", "image encodes stopped part-way because the client left"),
        "queue_rejections_total": ("counter", "requests refused because the queue was full"),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, float] = {name: 0 for name in self._HELP}
        self.by_status: dict[int, int] = {}

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.values[name] += value

    def status(self, code: int) -> None:
        with self._lock:
            self.by_status[code] = self.by_status.get(code, 0) + 1

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in self._HELP.items():
                lines += [f"# HELP glm4v_{name} {text}", f"# TYPE glm4v_{name} {kind}"]
                if name == "requests_total":
                    lines += [f'glm4v_requests_total{{status="{c}"}} {n}' for c, n in sorted(self.by_status.items())]
                else:
                    lines.append(f"glm4v_{name} {self.values[name]:g}")
        for name, (value, text) in gauges.items():
            lines += [f"# HELP glm4v_{name} {text}", f"# TYPE glm4v_{name} gauge", f"glm4v_{name} {value:g}"]
        return "\n".join(lines) + "\n"


class ServerState:
    """The loaded model (None while loading), its contexts and the server's counters."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = Metrics()
        self.model: Any = None
        self.pool: Optional[ContextPool] = None
        self.load_error: Optional[str] = None
        #: Set when the loaded model became unusable (an RPC server of it was lost): ``/health`` and the
        #: API then answer 503 with this message, so health checks see it.
        self.lost: Optional[str] = None
        self.executor: Optional[ThreadPoolExecutor] = None
        self.created = now()
        #: Called (on the loop) when the model fails to load; ``run`` stops the server with it.
        self.on_load_error: Optional[Callable[[], None]] = None

    def attach(self, model: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Make a loaded model serve (call on the loop's thread)."""
        contexts = [model.context() for _ in range(model.n_parallel)]
        self.executor = ThreadPoolExecutor(max_workers=model.n_parallel, thread_name_prefix="glm4v-serve")
        self.pool = ContextPool(contexts, self.options.max_queue)
        self.model = model

    def close(self) -> None:
        if self.pool is not None:
            for slot in self.pool.slots:
                slot.context.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        if self.model is not None:
            self.model.close()


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ------------------------------------------------------------------------------------- request reading


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError("invalid Content-Length")
        if int(length) > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    data = b"".join(chunks)
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body was read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------------------------- the application


def create_app(state: ServerState, loader: Optional[Callable[[], Any]] = None) -> Starlette:
    """The ASGI app. ``loader`` (run on a thread at start-up) returns the :class:`~glm4v_mtmd.Model`;
    until it has, every route but ``/health`` answers 503. Without it, ``state.attach`` is the caller's."""
    opts = state.options

    def authorised(request: Request) -> bool:
        if not opts.api_keys:
            return True
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        token_b = token.encode("utf-8", "replace")
        ok = False
        for key in opts.api_keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(token_b, key.encode("utf-8"))
        return ok

    def unavailable() -> Optional[Response]:
        """503 while the model loads (or after it failed to, or after it was lost), else None."""
        if state.lost is not None:
            return JSONResponse(error_body(state.lost, 503, "unavailable_error"), status_code=503)
        if state.model is not None:
            return None
        return JSONResponse(error_body(state.load_error or "Loading model", 503, "unavailable_error"),
                            status_code=503)

    def gate(request: Request) -> Optional[Response]:
        if not authorised(request):
            return JSONResponse(error_body("Invalid API Key", 401, "authentication_error"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return unavailable()

    async def health(request: Request) -> Response:
        return unavailable() or JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        refused = gate(request)
        if refused is not None:
            return refused
        return JSONResponse({"object": "list", "data": [{
            "id": opts.model_name, "object": "model", "created": state.created, "owned_by": "glm4v-mtmd",
            "architecture": {"input_modalities": ["text", "image"], "output_modalities": ["text"]},
            "meta": {"n_ctx": state.model.n_ctx, "n_parallel": state.model.n_parallel,
                     "n_vocab": state.model.n_vocab, "chat_family": state.model.chat_family.name,
                     "thinking": "always" if state.model.chat_family.always_thinks else "switch",
                     "thinking_default": opts.default_thinking is not False},
        }]})

    async def metrics(request: Request) -> Response:
        refused = gate(request)
        if refused is not None:
            return refused
        pool = state.pool
        assert pool is not None
        cache = state.model.image_cache
        gauges = {
            "queue_depth": (pool.queued, "requests waiting for a context"),
            "contexts_busy": (pool.busy, "contexts serving a request"),
            "contexts_total": (len(pool.slots), "contexts of the model (--parallel)"),
            "image_cache_hits": (cache.hits, "embedding-cache lookups that found the image"),
            "image_cache_entries": (len(cache), "images held by the embedding cache"),
        }
        return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    async def chat_completions(request: Request) -> Response:
        try:
            refused = gate(request)
            if refused is not None:
                state.metrics.status(refused.status_code)
                return refused
            body = await _read_json(request, opts.max_body_bytes)
            model = state.model
            req = await asyncio.to_thread(
                parse_request, body, family=model.chat_family, n_ctx=model.n_ctx, n_vocab=model.n_vocab,
                limits=opts.limits, default_thinking=opts.default_thinking)
            response = await _serve(request, req)
        except RequestError as exc:
            response = _error(exc)
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client, never a dead server
            logger.exception("chat completion failed")
            response = _error(to_request_error(exc))
        state.metrics.status(response.status_code)
        return response

    async def _serve(request: Request, req: ChatRequest) -> Response:
        pool = state.pool
        assert pool is not None and state.executor is not None
        # Watched from the start: a client that leaves while its request waits in the queue never runs.
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        acquire = asyncio.ensure_future(pool.acquire(req.message_keys))
        await asyncio.wait({acquire, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not acquire.done():
            acquire.cancel()  # the pool takes back a context handed over meanwhile
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            return Response(status_code=499)
        try:
            slot = acquire.result()
        except QueueFullError:
            watcher.cancel()
            state.metrics.add("queue_rejections_total")
            raise RequestError(f"the server is busy: {len(pool.slots)} requests are running and {pool.max_queue} "
                               "wait; try again shortly", status=503, kind="unavailable_error",
                               headers={"Retry-After": "1"}) from None
        loop = asyncio.get_running_loop()
        job = Job(state.model, slot.context, req, opts.replay)
        state.metrics.add("generations_total")
        state.metrics.add("images_total", req.n_images)

        def done() -> None:
            state.metrics.add("image_encodes_total", job.images_encoded)
            state.metrics.add("image_encodes_cancelled_total", job.encodes_cancelled)
            if isinstance(job.error, RpcError) and state.lost is None:
                state.lost = to_request_error(job.error).message
                logger.error("the model is lost, every request now fails until a restart: %s", job.error)
            if job.finish == "cancelled":
                state.metrics.add("generations_cancelled_total")
            loop.call_soon_threadsafe(pool.release, slot, req.message_keys)

        loop.run_in_executor(state.executor, job.run, done)
        events = job.events()
        try:
            first = await _first_or_disconnect(events, watcher, opts.keepalive_s if req.stream else None)
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        if first is None:  # the client left before the first token
            job.cancel()
            return Response(status_code=499)
        if req.stream:  # `first` is the chunk, or (after keepalive_s) the future that will hold it
            return StreamingResponse(_sse(job, req, first, events, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            chunks = [first]
            pending = asyncio.ensure_future(_collect(events, chunks))
            await asyncio.wait({pending, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not pending.done():  # the client left
                job.cancel()
                with contextlib.suppress(BaseException):
                    await pending
                return Response(status_code=499)
            pending.result()
        finally:
            watcher.cancel()
        return JSONResponse(_completion(req, chunks))

    def _reasoning(text: str) -> dict[str, str]:
        if opts.reasoning_field == "both":
            return {"reasoning_content": text, "reasoning": text}
        return {opts.reasoning_field: text}

    def _completion(req: ChatRequest, chunks: Sequence[Any]) -> dict[str, Any]:
        last = chunks[-1]
        reasoning = "".join(c.text for c in chunks if c.kind == "reasoning").strip()
        answer = "".join(c.text for c in chunks if c.kind == "answer").strip()
        _count(last)
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        if reasoning:
            message.update(_reasoning(reasoning))
        if last.boxes:
            message["boxes"] = boxes_object(last.boxes)
        return {
            "id": completion_id(), "object": "chat.completion", "created": now(), "model": opts.model_name,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "finish_reason": finish_reason(last.finish_reason), "message": message}],
            "usage": usage_object(last.usage), "timings": timings_object(last.timings, last.usage),
        }

    def _count(last: Any) -> None:
        usage = last.usage
        state.metrics.add("prompt_tokens_total", usage.prompt_tokens)
        state.metrics.add("cached_tokens_total", usage.reused_cells)
        state.metrics.add("completion_tokens_total", usage.completion_tokens)

    async def _sse(job: Job, req: ChatRequest, first: Any, events: AsyncIterator[Any],
                   watcher: asyncio.Future[None]) -> AsyncIterator[bytes]:
        cid, created = completion_id(), now()
        # A client gone mid-stream stops the generation (the watcher ends; cancelling it at the end does not).
        watcher.add_done_callback(lambda f: None if f.cancelled() else job.cancel())
        completed = False

        def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": opts.model_name,
                   "system_fingerprint": FINGERPRINT, "choices": choices, **extra}
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        def delta(d: dict[str, Any], finish: Optional[str] = None) -> dict[str, Any]:
            return {"index": 0, "delta": d, "finish_reason": finish}

        try:
            while isinstance(first, asyncio.Future):  # the first token is late: keep the connection alive
                done, _ = await asyncio.wait({first}, timeout=opts.keepalive_s)
                if not done:
                    yield b": ping\n\n"
                    continue
                first = first.result()  # the job's failure is raised here, sent as an error event
            yield frame([delta({"role": "assistant", "content": None})])
            chunk = first
            # Whitespace around the reasoning and the answer is dropped, as in the non-streamed reply:
            # leading at once, trailing by holding it back until more text follows.
            held = {"reasoning": None, "answer": None}
            while True:
                text, kind = chunk.text, chunk.kind
                text = text.lstrip() if held[kind] is None else held[kind] + text
                body = text.rstrip()
                held[kind] = text[len(body):] if body or held[kind] is not None else None
                if body:
                    yield frame([delta(_reasoning(body) if kind == "reasoning" else {"content": body})])
                if chunk.finish_reason is not None:
                    break
                chunk = await events.__anext__()
            _count(chunk)
            usage, timings = usage_object(chunk.usage), timings_object(chunk.timings, chunk.usage)
            final: dict[str, Any] = {}
            if chunk.boxes:
                final["boxes"] = boxes_object(chunk.boxes)
            if req.include_usage:
                yield frame([delta(final, finish_reason(chunk.finish_reason))])
                yield frame([], usage=usage, timings=timings)
            else:
                yield frame([delta(final, finish_reason(chunk.finish_reason))], timings=timings)
            yield b"data: [DONE]\n\n"
            completed = True
        except RequestError as exc:
            completed = True
            yield b"data: " + json.dumps(exc.body()).encode() + b"\n\n"
        finally:
            watcher.cancel()
            if isinstance(first, asyncio.Future) and not first.done():
                first.cancel()
            if not completed:  # the stream was abandoned (the client left): stop the generation
                job.cancel()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
    ]
    if opts.ui:
        routes += ui_routes()
    middleware = []
    if opts.cors_origins:
        # No credentials: the key travels in a header, which browsers send with any allowed origin.
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(opts.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["*"], allow_credentials=False,
                                     max_age=600))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = None
        if loader is not None:
            loop = asyncio.get_running_loop()

            async def load() -> None:
                try:
                    model = await asyncio.to_thread(loader)
                except Exception as exc:  # noqa: BLE001 - reported on /health and in the log
                    state.load_error = f"the model failed to load: {exc}"
                    logger.error("%s", state.load_error)
                    if state.on_load_error is not None:
                        state.on_load_error()
                    return
                state.attach(model, loop)
                logger.info("model loaded: %s", opts.model_name)

            task = asyncio.ensure_future(load())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await asyncio.to_thread(state.close)

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


async def _first_or_disconnect(events: AsyncIterator[Any], watcher: asyncio.Future[None],
                               timeout: Optional[float] = None) -> Any:
    """The job's first chunk, or None when the client leaves first; raises the job's error. With a
    ``timeout``, a chunk still pending then is returned as its future."""
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.wait({first, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if first.done():
        return first.result()
    if not watcher.done():  # timed out, the client still there
        return first
    first.cancel()
    return None


async def _collect(events: AsyncIterator[Any], chunks: list[Any]) -> None:
    async for chunk in events:
        chunks.append(chunk)
