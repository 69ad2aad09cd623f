"""The chat API against a remote OpenAI-compatible GLM-4.xV endpoint: :func:`connect`.

For models beyond one machine served by a GPU engine (vLLM, SGLang), by llama.cpp's
``llama-server`` or by this package's own ``glm4v-mtmd serve``, the same messages give the same
:class:`~glm4v_mtmd.chat.ChatResult` as :meth:`Context.chat`: reasoning split from the answer,
grounding boxes mapped to the pixels of the caller's own image, token usage.

What crosses the wire:

- Images go as PNG data URLs. By default (``image_size="model"``) each image is first resized here
  exactly as the reference processor resizes it (``smart_resize``, bicubic, stretched), so its sides
  are multiples of 28 and its token count is inside the limits: no engine resizes it again, and an
  engine whose own preprocessing differs from the reference (llama.cpp letterboxes) sees the
  reference pixels. Boxes are in 0-1000 coordinates of the picture, so they map back to the
  original image unchanged. ``image_size="original"`` sends the decoded image at its own size.
- Reasoning is read from ``reasoning_content`` (llama.cpp, this package), ``reasoning`` (vLLM) or
  ``thinking``, whichever is non-empty; ``<think>`` / ``<answer>`` tags left in ``content`` by an
  endpoint without a reasoning parser are split here.
- ``thinking`` goes as ``chat_template_kwargs.enable_thinking`` (vLLM, SGLang, llama.cpp and this
  package's server all read it).

Only the standard library is used for HTTP (``urllib``), so this needs no extra dependency.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Optional

import numpy as np

from .chat import (
    ChatChunk,
    ChatResult,
    Message,
    OutputSplitter,
    Usage,
    VideoPart,
    check_box_image,
    ground_boxes,
    normalize_messages,
    split_output,
)
from .errors import ConfigError, ImageError, RemoteError
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, PIXELS_PER_TOKEN, load_rgb, prepare_image
from .types import FinishReason, GenerationConfig, ImageEmbedding, Timings

__all__ = ["Connection", "RemoteError", "connect"]

# The reasoning fields endpoints use, in the order they are read (the first non-empty one wins).
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")

_CACHE_SIZE = 32  # data URLs kept per connection (a conversation resends its images every turn)


@dataclasses.dataclass(frozen=True)
class _Image:
    url: str
    original_size: tuple[int, int]  # (width, height) of the caller's image, what boxes map to


def _normalize_base_url(base_url: str) -> str:
    if not isinstance(base_url, str) or not base_url.strip():
        raise ConfigError("base_url must be a URL such as 'http://127.0.0.1:8080/v1'")
    url = base_url.strip().rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"base_url {base_url!r}: must start with http:// or https:// and name a host")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"base_url {base_url!r}: must not carry a query or a fragment")
    return url if parsed.path else url + "/v1"


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}`` or ``{"message": ...}``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500]
    if isinstance(data, Mapping):
        err = data.get("error", data)
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return json.dumps(data)[:500]


def _config_fields(config: GenerationConfig) -> dict[str, Any]:
    """A GenerationConfig as request fields, under every name the common endpoints read.

    ``repetition_penalty`` (vLLM, SGLang, this package) and ``repeat_penalty`` (llama.cpp) both go;
    an endpoint ignores the one it does not know. A banned token (bias ``-inf``) is sent as -100,
    the OpenAI API's lowest bias.
    """
    body: dict[str, Any] = {
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "min_p": config.min_p,
        "repetition_penalty": config.repetition_penalty,
        "repeat_penalty": config.repetition_penalty,
        "repeat_last_n": config.repeat_last_n,
        "presence_penalty": config.presence_penalty,
        "frequency_penalty": config.frequency_penalty,
    }
    if config.seed is not None:
        body["seed"] = config.seed
    if config.stop:
        body["stop"] = list(config.stop)
    if config.logit_bias:
        body["logit_bias"] = {str(t): (-100.0 if b == -math.inf else b) for t, b in config.logit_bias}
    if config.stop_token_ids:
        body["stop_token_ids"] = list(config.stop_token_ids)
    if config.ignore_eos:
        body["ignore_eos"] = True
    return body


def _reasoning_of(obj: Mapping[str, Any]) -> str:
    for name in REASONING_FIELDS:
        value = obj.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def _finish(reason: Any) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _usage(data: Any) -> tuple[int, int, int]:
    """(prompt, completion, cached) tokens of a ``usage`` object (zeros where absent)."""
    if not isinstance(data, Mapping):
        return 0, 0, 0
    details = data.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0), int(cached or 0)


def _timings(data: Any, prompt: int, completion: int) -> Timings:
    """llama-server's ``timings`` object (also sent by ``glm4v-mtmd serve``) as :class:`Timings`."""
    t = data if isinstance(data, Mapping) else {}

    def ms(name: str) -> float:
        value = t.get(name)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0

    return Timings(preprocess_ms=ms("preprocess_ms"), encode_ms=ms("encode_ms"), prompt_ms=ms("prompt_ms"),
                   decode_ms=ms("predicted_ms"), prompt_tokens=prompt, generated_tokens=completion)


def _split_content(content: str, reasoning: str) -> tuple[str, str]:
    """(reasoning, answer) from a message's reasoning field and its content.

    An endpoint without a reasoning parser leaves the tags in ``content``; a template that opened
    ``<think>`` in the prompt leaves only the closing tag, so text before a leading ``</think>``
    is reasoning.
    """
    head, sep, tail = content.partition("</think>")
    if sep and "<think>" not in head:
        reasoning, content = (reasoning + head), tail
    more, answer = split_output(content, thinking=True)
    return (reasoning + more).strip(), answer


class Connection:
    """A remote OpenAI-compatible GLM-4.xV endpoint with the local chat API; see :func:`connect`.

    Thread-safe: calls from several threads run as concurrent requests.
    """

    def __init__(self, base_url: str, *, api_key: Optional[str], model: Optional[str], timeout: float,
                 image_size: Literal["model", "original"], max_image_tokens: Optional[int]) -> None:
        self.base_url = _normalize_base_url(base_url)
        if api_key is not None and (not isinstance(api_key, str) or not api_key or "\n" in api_key):
            raise ConfigError("api_key must be a non-empty string on one line")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"timeout={timeout!r}: must be a positive number of seconds")
        if image_size not in ("model", "original"):
            raise ConfigError(f"image_size={image_size!r}: must be 'model' or 'original'")
        if max_image_tokens is not None and (isinstance(max_image_tokens, bool)
                                             or not isinstance(max_image_tokens, int)
                                             or not 8 <= max_image_tokens):
            raise ConfigError(f"max_image_tokens={max_image_tokens!r}: must be an integer >= 8 or None")
        self._api_key = api_key
        self.timeout = float(timeout)
        self.image_size = image_size
        self._max_pixels = DEFAULT_MAX_PIXELS if max_image_tokens is None else max_image_tokens * PIXELS_PER_TOKEN
        self._lock = threading.Lock()
        self._images: OrderedDict[str, _Image] = OrderedDict()
        if model is not None and (not isinstance(model, str) or not model):
            raise ConfigError("model must be a non-empty string or None")
        # Reach the endpoint now, so a wrong URL or key fails at connect() rather than mid-conversation.
        ids = self.models()
        if model is None:
            if not ids:
                raise RemoteError(f"{self.base_url}/models lists no model; pass model=")
            model = ids[0]
        self.model: str = model

    def __repr__(self) -> str:
        return f"Connection({self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------------------------ HTTP

    def _open(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        where = f"{method} {self.base_url}{path}"
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 - http(s) checked above
        except urllib.error.HTTPError as exc:
            message = _error_message(exc.read())
            exc.close()
            hint = " (pass api_key=, or check it)" if exc.code in (401, 403) else ""
            raise RemoteError(f"{where}: HTTP {exc.code}: {message}{hint}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise RemoteError(f"{where}: no answer within {self.timeout:g} s (timeout=)") from exc
            raise RemoteError(f"{where}: cannot connect ({reason})") from exc

    def _json(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        with self._open(method, path, body) as resp:
            try:
                raw = resp.read()
            except (OSError, TimeoutError) as exc:
                raise RemoteError(f"{method} {self.base_url}{path}: the reply was cut off ({exc})") from exc
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteError(f"{method} {self.base_url}{path}: the reply is not JSON: {raw[:200]!r}") from None

    def models(self) -> list[str]:
        """The ids the endpoint's ``GET /models`` lists."""
        data = self._json("GET", "/models")
        items = data.get("data") if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            raise RemoteError(f"{self.base_url}/models: not an OpenAI model list: {json.dumps(data)[:200]}")
        return [str(m["id"]) for m in items if isinstance(m, Mapping) and "id" in m]

    # ------------------------------------------------------------------------------------ images

    def _image(self, source: Any) -> _Image:
        """The data URL and original size of one message image, cached by content."""
        if isinstance(source, ImageEmbedding):
            raise ConfigError("connect(): an ImageEmbedding lives in a local model; pass the image itself")
        if isinstance(source, (str, os.PathLike)):
            path = pathlib.Path(source)
            if not path.is_file():
                raise ImageError(f"image {str(source)[:120]!r}: no such file")  # as a local chat says it
            source = path.read_bytes()
        if isinstance(source, (bytes, bytearray, memoryview)):
            key = hashlib.sha256(bytes(source)).hexdigest()
        elif isinstance(source, np.ndarray):
            key = hashlib.sha256(repr((source.shape, source.dtype.str)).encode() + source.tobytes()).hexdigest()
        else:
            key = ""  # PIL images and file objects: not cached
        with self._lock:
            if key and key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        if self.image_size == "model":
            prepared = prepare_image(source, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=self._max_pixels)
            pixels, size = prepared.pixels, prepared.original_size
        else:
            pixels = load_rgb(source)
            size = (int(pixels.shape[1]), int(pixels.shape[0]))
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", compress_level=3)
        image = _Image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), size)
        if key:
            with self._lock:
                self._images[key] = image
                while len(self._images) > _CACHE_SIZE:
                    self._images.popitem(last=False)
        return image

    def _request(self, messages: Sequence[Message], config: Optional[GenerationConfig], thinking: Optional[bool],
                 box_image: int, stream: bool) -> tuple[dict[str, Any], list[_Image]]:
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError("config must be a GenerationConfig or None")
        if thinking is not None and not isinstance(thinking, bool):
            raise ConfigError(f"thinking={thinking!r}: must be True, False or None")
        if isinstance(box_image, bool) or not isinstance(box_image, int):
            raise ConfigError(f"box_image={box_image!r}: must be an integer")
        msgs, media = normalize_messages(messages)
        images: list[_Image] = []
        for item in media:
            if isinstance(item, VideoPart):
                raise ConfigError("connect(): video parts are not sent to remote endpoints; "
                                  "their video APIs differ (use a local Model for video)")
            images.append(self._image(item))
        # Placeholders {"type": "image"} back to image_url parts, in order.
        wire: list[dict[str, Any]] = []
        k = 0
        for msg in msgs:
            content = msg["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image":
                        parts.append({"type": "image_url", "image_url": {"url": images[k].url}})
                        k += 1
                    else:
                        parts.append(part)
                content = parts
            wire.append({**msg, "content": content})
        check_box_image(images, box_image)
        body: dict[str, Any] = {"model": self.model, "messages": wire, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if config is not None:
            body.update(_config_fields(config))
        if thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        return body, images

    # ------------------------------------------------------------------------------------ chat

    def chat(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None, *,
             thinking: Optional[bool] = None, box_image: int = -1) -> ChatResult:
        """Answer ``messages`` as :meth:`Context.chat` does, on the endpoint.

        ``config=None`` leaves sampling to the endpoint's defaults; a :class:`GenerationConfig`
        sends all its fields. ``usage.kv_cells`` is prompt plus completion tokens and
        ``usage.reused_cells`` the endpoint's ``cached_tokens`` (0 when it does not say);
        ``timings`` holds what the endpoint reports (llama-server's ``timings``), else zeros.
        ``text`` is the content as sent, after ``<think>…</think>`` holding the reasoning when
        the endpoint split it off.
        """
        body, images = self._request(messages, config, thinking, box_image, stream=False)
        data = self._json("POST", "/chat/completions", body)
        try:
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RemoteError(f"{self.base_url}/chat/completions: not a chat completion: "
                              f"{json.dumps(data)[:300]}") from None
        field_reasoning = _reasoning_of(message)
        reasoning, answer = _split_content(str(content), field_reasoning)
        text = f"<think>{field_reasoning}</think>{content}" if field_reasoning else str(content)
        prompt, completion, cached = _usage(data.get("usage"))
        usage = Usage(prompt, completion, prompt + completion, cached)
        timings = _timings(data.get("timings"), prompt, completion)
        return ChatResult(reasoning, answer, text, _finish(choice.get("finish_reason")), usage, timings,
                          ground_boxes(answer, images, box_image))

    def chat_stream(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None, *,
                    thinking: Optional[bool] = None, box_image: int = -1) -> Iterator[ChatChunk]:
        """Stream a reply as :class:`ChatChunk` s, as :meth:`Context.chat_stream` does.

        The last chunk carries ``finish_reason``, ``usage``, ``timings`` and ``boxes`` (see
        :meth:`chat`). Closing the iterator early closes the connection, which stops generation on
        endpoints that cancel on disconnect (llama-server, vLLM, this package's server).
        """
        body, images = self._request(messages, config, thinking, box_image, stream=True)
        where = f"{self.base_url}/chat/completions"
        resp = self._open("POST", "/chat/completions", body)
        splitter = OutputSplitter(thinking=True)
        answer: list[str] = []
        pending: list[tuple[str, Literal["reasoning", "answer"]]] = []
        finish: Optional[FinishReason] = None
        usage_data: Any = None
        timings_data: Any = None
        try:
            for raw in self._events(resp, where):
                if isinstance(raw, Mapping) and "error" in raw:
                    message = _error_message(json.dumps(raw).encode())
                    raise RemoteError(f"{where}: the stream ended with an error: {message}")
                if not isinstance(raw, Mapping):
                    continue
                if raw.get("usage"):
                    usage_data = raw["usage"]
                if raw.get("timings"):
                    timings_data = raw["timings"]
                for choice in raw.get("choices") or ():
                    delta = choice.get("delta") or {}
                    reasoning = _reasoning_of(delta)
                    if reasoning:
                        pending.append((reasoning, "reasoning"))
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        pieces = splitter.feed(content)
                        answer.extend(t for t, k in pieces if k == "answer")
                        pending.extend(pieces)
                    if choice.get("finish_reason"):
                        finish = _finish(choice["finish_reason"])
                # Hold back the last piece until the next event: the final chunk must carry text too.
                while len(pending) > 1:
                    text, kind = pending.pop(0)
                    yield ChatChunk(text, kind)
            if finish is None:
                raise RemoteError(f"{where}: the stream ended without a finish_reason (the endpoint stopped)")
            tail = splitter.feed("", final=True)
            answer.extend(t for t, k in tail if k == "answer")
            pending.extend(tail)
            prompt, completion, cached = _usage(usage_data)
            usage = Usage(prompt, completion, prompt + completion, cached)
            boxes = ground_boxes("".join(answer).strip(), images, box_image)
            for text, kind in pending[:-1]:
                yield ChatChunk(text, kind)
            last_text, last_kind = pending[-1] if pending else ("", splitter.kind)
            yield ChatChunk(last_text, last_kind, finish, _timings(timings_data, prompt, completion), usage, boxes)
        finally:
            resp.close()

    def _events(self, resp: Any, where: str) -> Iterator[Any]:
        """The JSON objects of a server-sent event stream, until ``[DONE]`` or the end."""
        data: list[str] = []
        try:
            for line in resp:
                line = line.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                    continue
                if line.startswith("error:"):  # llama-server sends errors as their own event field
                    yield {"error": json.loads(line[6:]) if line[6:].strip().startswith("{") else line[6:].strip()}
                    continue
                if line or not data:
                    continue
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    return
                try:
                    yield json.loads(payload)
                except ValueError:
                    raise RemoteError(f"{where}: a stream event is not JSON: {payload[:200]!r}") from None
        except (OSError, TimeoutError) as exc:
            raise RemoteError(f"{where}: the stream was cut off ({exc})") from exc


def connect(base_url: str, *, api_key: Optional[str] = None, model: Optional[str] = None,
            timeout: float = 600.0, image_size: Literal["model", "original"] = "model",
            max_image_tokens: Optional[int] = None) -> Connection:
    """The chat API of a local model, against an OpenAI-compatible GLM-4.xV endpoint.

    Args:
        base_url: the endpoint, such as ``"http://127.0.0.1:8080/v1"`` (``/v1`` is added to a
            URL without a path): this package's ``serve``, ``llama-server``, vLLM or SGLang.
        api_key: sent as ``Authorization: Bearer``; None sends no header.
        model: the model id of requests; None takes the first one ``GET /models`` lists.
        timeout: seconds to wait for a connection or for any read (a streamed token, a whole
            non-streamed reply).
        image_size: ``"model"`` (the default) resizes images here as the reference processor
            does before sending them, so every engine sees the same pixels; ``"original"`` sends
            them at their own size and leaves resizing to the endpoint.
        max_image_tokens: the token cap of that resize (default 6144, the models' own); an
            endpoint with a lower cap (llama-server: 4096) resizes larger images again.

    Returns:
        A :class:`Connection` with :meth:`~Connection.chat` and :meth:`~Connection.chat_stream`.

    Raises:
        RemoteError: the endpoint cannot be reached, rejects the key, or lists no model.
        ConfigError: an argument is invalid.

    Example::

        remote = glm4v_mtmd.connect("http://gpu-box:8000/v1")
        result = remote.chat([{"role": "user", "content": [
            {"type": "image", "image": "street.jpg"}, {"type": "text", "text": "Where is the bus?"}]}])
        print(result.answer, [b.pixels for b in result.boxes])
    """
    return Connection(base_url, api_key=api_key, model=model, timeout=timeout, image_size=image_size,
                      max_image_tokens=max_image_tokens)
