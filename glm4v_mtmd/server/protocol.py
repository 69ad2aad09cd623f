"""The OpenAI chat-completions wire format: request validation and response objects.

Pure Python (no web framework), so every rule is testable on its own. Requests are read as the
OpenAI API and llama-server take them; a field this server cannot honour and that changes the
meaning of the request (``tools``, ``response_format``, ``n`` > 1, audio, ...) is a 400 naming the
field, never a silent ignore. Unknown fields that do not change the answer are ignored, as both
anchors do.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import pathlib
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ..boxes import Box
from ..chat import ChatFamily, GroundedBox, Usage
from ..types import GenerationConfig, Timings


class RequestError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error type."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object (llama-server's field set, plus ``param``)."""
        return error_body(self.message, self.status, self.kind, self.param)


def error_body(message: str, status: int, kind: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": kind, "param": param}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the operator's ``serve`` options)."""

    max_images: int = 16
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 50_000_000
    max_messages: int = 1024
    max_stop: int = 16
    max_stop_chars: int = 256
    max_logit_bias: int = 1024
    media_dir: Optional[pathlib.Path] = None


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request, in the library's terms."""

    messages: list[dict[str, Any]]
    config: GenerationConfig
    thinking: Optional[bool]
    stream: bool
    include_usage: bool
    #: One digest per message (content and images), to route a follow-up to the context holding it.
    message_keys: list[str] = field(default_factory=list)
    n_images: int = 0
    #: max_tokens was left to the server (generation then runs until the context is full).
    default_length: bool = True


# ------------------------------------------------------------------------------------- field readers


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _bad_type(name: str, value: Any, expected: str) -> RequestError:
    return RequestError(f'invalid type for "{name}" (expected {expected}, got {_type_name(value)})', param=name)


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_type(name, value, "integer")
    if not lo <= value <= hi:
        raise RequestError(f'"{name}" = {value} is out of range [{lo}, {hi}]', param=name)
    return value


def _float(body: Mapping[str, Any], name: str, lo: float, hi: float, *, open_lo: bool = False) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad_type(name, value, "number")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (open_lo and value == lo):
        bracket = "(" if open_lo else "["
        raise RequestError(f'"{name}" = {value} is out of range {bracket}{lo}, {hi}]', param=name)
    return value


def _bool(body: Mapping[str, Any], name: str) -> Optional[bool]:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad_type(name, value, "boolean")
    return value


# ------------------------------------------------------------------------------------- images


_DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+(;[a-zA-Z0-9=._+-]+)*;base64", re.ASCII)


def read_image_url(url: Any, limits: Limits, where: str) -> bytes:
    """The bytes of an ``image_url``: a base64 data URL, or a ``file://`` URL inside ``--media-dir``.

    Nothing else is read or fetched: no bare paths, no http(s), no file outside the media directory
    (the resolved path must stay inside it, so symbolic links cannot lead out).
    """
    if not isinstance(url, str):
        raise _bad_type(f"{where}.url", url, "string")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not _DATA_URL.fullmatch(header):
            raise RequestError(f"{where}: invalid data URL (expected data:image/<type>;base64,<data>)", param=where)
        if len(payload) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
            raise RequestError(f"{where}: the image is larger than {limits.max_image_bytes} bytes", status=413,
                               param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the data URL is not valid base64", param=where) from None
        if not data:
            raise RequestError(f"{where}: the data URL holds no data", param=where)
        return data
    if url.startswith("file://"):
        if limits.media_dir is None:
            raise RequestError(f"{where}: file:// URLs are refused (the server has no --media-dir)", status=403,
                               kind="permission_error", param=where)
        return _read_media_file(url[len("file://"):], limits, where)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    if scheme:
        raise RequestError(f"{where}: {scheme.group(1)}: URLs are refused; send the image as a "
                           "data:image/...;base64 URL (this server never fetches from the network)", param=where)
    raise RequestError(f"{where}: a bare path is refused; send the image as a data:image/...;base64 URL",
                       param=where)


def _read_media_file(path: str, limits: Limits, where: str) -> bytes:
    from urllib.parse import unquote

    assert limits.media_dir is not None
    root = limits.media_dir
    if "\x00" in path:
        raise RequestError(f"{where}: invalid file URL", param=where)
    try:
        target = pathlib.Path(unquote(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        raise RequestError(f"{where}: invalid file URL", param=where) from None
    if not target.is_relative_to(root):
        raise RequestError(f"{where}: the file is outside the server's media directory", status=403,
                           kind="permission_error", param=where)
    try:
        size = target.stat().st_size
        if not target.is_file():
            raise FileNotFoundError
        if size > limits.max_image_bytes:
            raise RequestError(f"{where}: the image is larger than {limits.max_image_bytes} bytes", status=413,
                               param=where)
        return target.read_bytes()
    except OSError:
        raise RequestError(f"{where}: no such file in the media directory", status=404, kind="not_found_error",
                           param=where) from None


def check_image_header(data: bytes, limits: Limits, where: str) -> None:
    """Refuse an image that is not decodable or too large, from its header only (no pixels decoded)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - whatever Pillow makes of hostile bytes
        raise RequestError(f"{where}: the data is not an image Pillow can read", param=where) from None
    if width <= 0 or height <= 0 or width * height > limits.max_image_pixels:
        raise RequestError(f"{where}: {width}x{height} pixels is more than this server accepts "
                           f"({limits.max_image_pixels} pixels per image)", status=413, param=where)


# ------------------------------------------------------------------------------------- messages


def _content_parts(content: Any, i: int, limits: Limits, images: list[bytes]) -> Any:
    where = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad_type(where, content, "string, array or null")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pwhere = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise _bad_type(pwhere, part, "object")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad_type(f"{pwhere}.text", text, "string")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, Mapping) else spec
            if len(images) >= limits.max_images:
                raise RequestError(f"more than {limits.max_images} images in one request", param=pwhere)
            data = read_image_url(url, limits, f"{pwhere}.image_url")
            check_image_header(data, limits, f"{pwhere}.image_url")
            images.append(data)
            parts.append({"type": "image", "image": data})
        else:
            raise RequestError(f"unsupported content[].type {kind!r} in {pwhere} (text and image_url are)",
                               param=f"{pwhere}.type")
    return parts


def parse_messages(value: Any, limits: Limits) -> tuple[list[dict[str, Any]], list[str], int]:
    """Library messages (images as bytes), one routing key per message, and the number of images."""
    if not isinstance(value, list):
        raise _bad_type("messages", value, "array")
    if not value:
        raise RequestError('"messages" must not be empty', param="messages")
    if len(value) > limits.max_messages:
        raise RequestError(f"more than {limits.max_messages} messages in one request", param="messages")
    images: list[bytes] = []
    messages: list[dict[str, Any]] = []
    keys: list[str] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise _bad_type(f"messages[{i}]", msg, "object")
        role = msg.get("role")
        if role == "developer":  # OpenAI's newer name of the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                               param=f"messages[{i}].role")
        if role == "assistant" and msg.get("tool_calls"):
            raise RequestError(f"messages[{i}].tool_calls: tool calls are not supported", param=f"messages[{i}]")
        if role != "assistant" and "content" not in msg:
            raise RequestError(f"messages[{i}] has no content", param=f"messages[{i}].content")
        first_image = len(images)
        out: dict[str, Any] = {"role": role, "content": _content_parts(msg.get("content"), i, limits, images)}
        if role == "assistant":
            reasoning = msg.get("reasoning_content", msg.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise _bad_type(f"messages[{i}].reasoning_content", reasoning, "string")
                out["reasoning_content"] = reasoning
        messages.append(out)
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([role, _text_key(out["content"]), out.get("reasoning_content")]).encode())
        for data in images[first_image:]:
            h.update(hashlib.blake2b(data, digest_size=16).digest())
        keys.append(h.hexdigest())
    if messages[-1]["role"] == "assistant":
        raise RequestError("the last message is an assistant message: continuing a reply (prefill) is not "
                           "supported; end the conversation with a user message", param="messages")
    return messages, keys, len(images)


def _text_key(content: Any) -> Any:
    if isinstance(content, str):
        return content
    return [p["text"] if p["type"] == "text" else "<image>" for p in content]


# ------------------------------------------------------------------------------------- the request


#: Fields that change what is asked and that this server cannot do: 400, never ignored.
_REFUSED = {
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "top_logprobs": "log probabilities are not supported",
    "web_search_options": "web search is not supported",
    "grammar": "grammars are not supported",
    "json_schema": "JSON schemas are not supported",
}


def _check_refused(body: Mapping[str, Any]) -> None:
    for name, why in _REFUSED.items():
        value = body.get(name)
        if value not in (None, [], {}, False):
            raise RequestError(f'"{name}": {why} by this server', param=name)
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise RequestError('"tool_choice": tool calling is not supported by this server', param="tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise RequestError('"response_format": only {"type": "text"} is supported by this server',
                           param="response_format")
    if body.get("logprobs") not in (None, False):
        raise RequestError('"logprobs": log probabilities are not supported by this server', param="logprobs")
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or set(modalities) - {"text"}):
        raise RequestError('"modalities": only ["text"] output is supported', param="modalities")
    n = body.get("n")
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise RequestError(f'"n" = {n!r}: only n = 1 is supported', param="n")


def _stop(body: Mapping[str, Any], limits: Limits) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad_type("stop", value, "string or array of strings")
    items = [s for s in items if s]
    if len(items) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in items):
        raise RequestError(f'"stop": at most {limits.max_stop} strings of {limits.max_stop_chars} characters',
                           param="stop")
    return tuple(items)


def _logit_bias(body: Mapping[str, Any], limits: Limits, n_vocab: int) -> dict[int, float]:
    value = body.get("logit_bias")
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        items = [(p[0], p[1]) for p in value]
    else:
        raise _bad_type("logit_bias", value, "object of token id to bias")
    if len(items) > limits.max_logit_bias:
        raise RequestError(f'"logit_bias": at most {limits.max_logit_bias} entries', param="logit_bias")
    out: dict[int, float] = {}
    for key, bias in items:
        try:
            token = int(key) if isinstance(key, (str, int)) and not isinstance(key, bool) else -1
        except ValueError:
            token = -1
        if not 0 <= token < n_vocab:
            raise RequestError(f'"logit_bias": {key!r} is not a token id of this model (0..{n_vocab - 1})',
                               param="logit_bias")
        if bias is False:
            bias = -math.inf
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not (
                math.isfinite(bias) or bias == -math.inf) or abs(bias) > 100 and math.isfinite(bias):
            raise RequestError(f'"logit_bias"[{key!r}] = {bias!r}: must be a number in [-100, 100] or false',
                               param="logit_bias")
        out[token] = float(bias)
    return out


def _thinking(body: Mapping[str, Any], default: Optional[bool]) -> Optional[bool]:
    thinking = default
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, Mapping):
            raise _bad_type("chat_template_kwargs", kwargs, "object")
        if "enable_thinking" in kwargs:
            value = kwargs["enable_thinking"]
            if not isinstance(value, bool):
                raise _bad_type("enable_thinking", value, "boolean")
            thinking = value
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise RequestError(f'"reasoning_effort" = {effort!r}: one of none, minimal, low, medium, high',
                               param="reasoning_effort")
        thinking = effort != "none"
    return thinking


def parse_request(body: Any, *, family: ChatFamily, n_ctx: int, n_vocab: int, limits: Limits,
                  default_thinking: Optional[bool] = None) -> ChatRequest:
    """Validate a decoded JSON body; raises :class:`RequestError` naming the first problem."""
    if not isinstance(body, Mapping):
        raise RequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    _check_refused(body)
    messages, keys, n_images = parse_messages(body.get("messages"), limits)
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise _bad_type("stream_options", options, "object")
    include_usage = bool(options and options.get("include_usage") is True)

    length = None
    for name in ("n_predict", "max_completion_tokens", "max_tokens"):
        value = _int(body, name, -1 if name == "n_predict" else 0, 2**31 - 1)
        if value is not None and value >= 0:
            length = value
            break
    if length is not None and length > n_ctx:
        raise RequestError(f'"max_tokens" = {length} is more than a context holds (n_ctx = {n_ctx})',
                           kind="exceed_context_size_error", param="max_tokens")

    card = family.defaults
    seed = _int(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None and seed < 0:
        seed = None  # -1 (llama-server): a random seed
    elif seed is not None:
        seed %= 2**32
    top_k = _int(body, "top_k", -1, n_vocab)
    rep = _float(body, "repetition_penalty", 0.0, 10.0, open_lo=True)
    if rep is None:
        rep = _float(body, "repeat_penalty", 0.0, 10.0, open_lo=True)
    values: dict[str, Any] = {
        "max_tokens": n_ctx if length is None else length,
        "temperature": _float(body, "temperature", 0.0, 100.0),
        "top_p": _float(body, "top_p", 0.0, 1.0, open_lo=True),
        "top_k": None if top_k is None else max(top_k, 0),
        "min_p": _float(body, "min_p", 0.0, 0.999),
        "presence_penalty": _float(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _float(body, "frequency_penalty", -2.0, 2.0),
        "repetition_penalty": rep,
        "repeat_last_n": _int(body, "repeat_last_n", -1, n_ctx),
        "seed": seed,
        "stop": _stop(body, limits),
        "logit_bias": _logit_bias(body, limits, n_vocab),
        "ignore_eos": _bool(body, "ignore_eos"),
    }
    config = dataclasses.replace(card, **{k: v for k, v in values.items() if v is not None})
    return ChatRequest(messages=messages, config=config, thinking=_thinking(body, default_thinking),
                       stream=stream, include_usage=include_usage, message_keys=keys, n_images=n_images,
                       default_length=length is None)


# ------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(16)


def finish_reason(reason: Optional[str]) -> str:
    """The wire's finish_reason: a full context reads as "length", as in llama-server."""
    return "stop" if reason == "stop" else "length"


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.reused_cells},
    }


def timings_object(t: Timings, usage: Usage) -> dict[str, Any]:
    """llama-server's ``timings``, plus this package's image figures (``encode_ms``, ``preprocess_ms``)."""
    prompt_n = max(usage.prompt_tokens - usage.reused_cells, 0)
    predicted_n = usage.completion_tokens

    def per(n: int, ms: float) -> tuple[float, float]:
        return (ms / n if n else 0.0), (1000.0 * n / ms if ms > 0 else 0.0)

    p_tok, p_sec = per(prompt_n, t.prompt_ms)
    d_ms = t.decode_ms + t.sample_ms
    g_tok, g_sec = per(predicted_n, d_ms)
    return {
        "cache_n": usage.reused_cells, "prompt_n": prompt_n, "prompt_ms": round(t.prompt_ms, 3),
        "prompt_per_token_ms": round(p_tok, 3), "prompt_per_second": round(p_sec, 3),
        "predicted_n": predicted_n, "predicted_ms": round(d_ms, 3),
        "predicted_per_token_ms": round(g_tok, 3), "predicted_per_second": round(g_sec, 3),
        "encode_ms": round(t.encode_ms, 3), "preprocess_ms": round(t.preprocess_ms, 3),
    }


def boxes_object(boxes: Sequence[GroundedBox]) -> list[dict[str, Any]]:
    """The ``boxes`` extension: each box in 0-1000 coordinates and in the referenced image's pixels."""

    def coords(b: Box) -> list[float]:
        return [int(v) if float(v).is_integer() else v for v in (b.x1, b.y1, b.x2, b.y2)]

    return [{"box": coords(g.box), "point": g.box.point,
             "pixels": list(g.pixels) if g.pixels is not None else None, "image_index": g.image_index}
            for g in boxes]


def now() -> int:
    return int(time.time())
