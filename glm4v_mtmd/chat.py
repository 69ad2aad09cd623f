"""Chat on top of a :class:`~glm4v_mtmd.Context`: messages -> GLM prompt -> reasoning and answer.

Prompts are rendered with the model's own Jinja chat template (from the GGUF, in a sandbox), with
a built-in renderer of the two GLM-4.xV template families as the fallback; tests check that both
give the same string. The rendered text's ``<|begin_of_image|><|image|><|end_of_image|>`` markers
are replaced by the conversation's images, which the context expands to one ``<|image|>`` per image
token, exactly as transformers' processor does.

This module needs only what :class:`ChatBackend` names; it never imports the context or session
modules (they import it).
"""

from __future__ import annotations

import base64
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Protocol

from ._prompt import CallStats
from .boxes import Box, parse_boxes
from .errors import ConfigError
from .types import (
    FinishReason,
    GenerationConfig,
    GenerationResult,
    ImageEmbedding,
    StreamChunk,
    Timings,
    VideoEmbedding,
)

IMAGE_MARKER = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO_MARKER = "<|begin_of_video|><|video|><|end_of_video|>"


@dataclass(frozen=True)
class VideoPart:
    """A ``{"type": "video"}`` / ``video_url`` message part, encoded when the prompt is built."""

    video: Any
    fps: Optional[float] = None


Message = Mapping[str, Any]


class ChatBackend(Protocol):
    """What chat needs of a conversation (:class:`~glm4v_mtmd.Context` provides it)."""

    @property
    def n_cells(self) -> int: ...

    @property
    def last_reused(self) -> int: ...

    def _chat_model(self) -> Any:
        """The model: ``chat_family``, ``chat_template`` and ``_encode(image, stats)``."""

    def _generate(self, parts: Sequence[Any], config: Optional[GenerationConfig],
                  stats: Optional[CallStats] = None) -> GenerationResult: ...

    def _chunks(self, parts: Sequence[Any], config: Optional[GenerationConfig], tokens_per_step: int,
                stats: Optional[CallStats] = None) -> Iterator[StreamChunk]: ...


@dataclass(frozen=True)
class ChatFamily:
    """How a GLM-4.xV model formats and sampling defaults (from the model cards)."""

    name: str
    always_thinks: bool
    defaults: GenerationConfig


#: GLM-4.1V-9B-Thinking: always reasons, ``<think>…</think><answer>…</answer>``; card: temperature 1.0, top_k 2.
GLM41V = ChatFamily(
    "glm-4.1v-thinking", True,
    GenerationConfig(max_tokens=8192, temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0),
)
#: GLM-4.5V / 4.6V / 4.6V-Flash: thinking switchable with ``/nothink``; card: top_p 0.6, top_k 2, T 0.8, rep 1.1.
GLM45V = ChatFamily(
    "glm-4.5v", False,
    GenerationConfig(max_tokens=8192, temperature=0.8, top_k=2, top_p=0.6, repetition_penalty=1.1),
)


def detect_family(architecture: str, chat_template: Optional[str], name: Optional[str]) -> ChatFamily:
    """The template family of a model from its GGUF metadata.

    ``glm4moe`` is always GLM-4.5V/4.6V. A ``glm4`` model is GLM-4.6V-Flash when its template knows
    ``/nothink`` (or its name says 4.6V), else GLM-4.1V-Thinking.
    """
    if architecture == "glm4moe":
        return GLM45V
    template = chat_template or ""
    if "/nothink" in template or "enable_thinking" in template or re.search(r"4\.[56]V", name or "", re.I):
        return GLM45V
    return GLM41V


# ----------------------------------------------------------------------------------------------- messages


def _image_from_url(url: str, kind: str = "image") -> Any:
    """A data URL's bytes or a local path; nothing is fetched from the network."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ConfigError(f"{kind}_url data URLs must be base64-encoded (data:{kind}/...;base64,...)")
        return base64.b64decode(payload, validate=False)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I):
        raise ConfigError(f"{kind}_url {url[:60]!r}: only data: URLs and local paths are supported (no downloads)")
    return pathlib.Path(url)


def _url_of(part: Mapping[str, Any], key: str) -> str:
    value = part.get(key)
    return str(value["url"] if isinstance(value, Mapping) else value)


def normalize_messages(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Template-ready messages (images as ``{"type": "image"}``, videos as ``{"type": "video"}``) and the
    media in order of appearance (videos as :class:`VideoPart`)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise ConfigError(f"message {i} must be a dict with 'role' and 'content'")
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            raise ConfigError(f"message {i}: role {role!r} is not one of system, user, assistant")
        content = msg.get("content", "")
        if isinstance(content, str):
            out.append({**msg, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image":
                images.append(part["image"])
                parts.append({"type": "image"})
            elif kind == "image_url":
                images.append(_image_from_url(_url_of(part, "image_url")))
                parts.append({"type": "image"})
            elif kind in ("video", "video_url"):
                source = part.get("video") if kind == "video" else _image_from_url(_url_of(part, "video_url"), "video")
                if source is None:
                    raise ConfigError(f"message {i}: a video part needs 'video' (a path, an array or frames)")
                fps = part.get("fps")
                if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
                    raise ConfigError(f"message {i}: video fps={fps!r} must be a positive number")
                images.append(VideoPart(source, fps))
                parts.append({"type": "video"})
            else:
                raise ConfigError(f"message {i}: unsupported content part {part!r} "
                                  "(text, image, image_url, video, video_url)")
        out.append({**msg, "content": parts})
    return out, images


# ----------------------------------------------------------------------------------------------- rendering


def render_template(template: str, messages: list[dict[str, Any]], *, enable_thinking: Optional[bool],
                    add_generation_prompt: bool = True) -> str:
    """Render a chat template as transformers' ``apply_chat_template`` does, in a bounded Jinja sandbox.

    Raises:
        ConfigError: the template fails, touches what the sandbox forbids, or exceeds its time or size
            bounds (``glm4v_mtmd._sandbox``: 5 s, 8 Mi characters beyond twice the conversation's size).
    """
    import jinja2

    from ._sandbox import MAX_CHARS, BoundedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    # transformers.utils.chat_template_utils._compile_jinja_template: same options and helpers.
    conversation = sum(len(_text_of(m.get("content", ""))) for m in messages)
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                             max_chars=MAX_CHARS + 2 * conversation)
    env.globals["raise_exception"] = raise_exception
    kwargs: dict[str, Any] = {"messages": messages, "add_generation_prompt": add_generation_prompt}
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    try:
        return env.render_bounded(template, **kwargs)
    except jinja2.TemplateError as exc:  # includes the sandbox's SecurityError and TemplateBoundsError
        raise ConfigError(f"the model's chat template failed to render: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - untrusted code: TypeError, RecursionError, MemoryError, ...
        raise ConfigError(f"the model's chat template failed to render: {type(exc).__name__}: {exc}") from exc


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    markers = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
    return "".join(markers[p["type"]] if p["type"] in markers else p["text"] for p in content)


def render_builtin(family: ChatFamily, messages: list[dict[str, Any]], *, enable_thinking: Optional[bool]) -> str:
    """The fallback renderer: the published GLM-4.1V / GLM-4.5V templates, written out in Python."""
    if family is GLM41V:
        return _render_glm41v(messages)
    return _render_glm45v(messages, enable_thinking)


def _render_glm41v(messages: list[dict[str, Any]]) -> str:
    out = ["[gMASK]<sop>"]
    for m in messages:
        if m["role"] == "system":
            out.append(f"<|system|>\n{_text_of(m['content'])}")
        elif m["role"] == "user":
            out.append(f"<|user|>\n{_text_of(m['content'])}")
        elif m.get("metadata"):
            out.append(f"<|assistant|>{m['metadata']}\n{_text_of(m['content'])}")
        else:
            out.append(f"<|assistant|>\n{_text_of(m['content'])}")
    out.append("<|assistant|>\n")
    return "".join(out)


def _render_glm45v(messages: list[dict[str, Any]], enable_thinking: Optional[bool]) -> str:
    nothink = enable_thinking is not None and not enable_thinking
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = ["[gMASK]<sop>"]
    for i, m in enumerate(messages):
        text = _text_of(m["content"])
        if m["role"] == "system":
            out.append(f"<|system|>\n{text}")
        elif m["role"] == "user":
            out.append(f"<|user|>\n{text}")
            if nothink and not text.endswith("/nothink"):
                out.append("/nothink")
        else:
            reasoning, content = m.get("reasoning_content"), text
            if not isinstance(reasoning, str):
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            keep = i > last_user and reasoning
            out.append(f"<|assistant|>\n<think>{reasoning.strip() if keep else ''}</think>")
            if content.strip():
                out.append("\n" + content.strip())
    out.append("<|assistant|>\n<think></think>\n" if nothink else "<|assistant|>\n")
    return "".join(out)


def prompt_parts(rendered: str, media: list[Any]) -> list[Any]:
    """Split a rendered prompt at the image and video markers and put the media there (a video is one
    part: the context expands it into its markers, pairs and timestamps)."""
    pieces = re.split("(" + re.escape(IMAGE_MARKER) + "|" + re.escape(VIDEO_MARKER) + ")", rendered)
    markers = pieces[1::2]
    want = ["video" if isinstance(m, VideoEmbedding) else "image" for m in media]
    got = ["video" if m == VIDEO_MARKER else "image" for m in markers]
    if got != want:
        raise ConfigError(f"the chat template placed {got.count('image')} image and {got.count('video')} video "
                          f"markers for {want.count('image')} images and {want.count('video')} videos in the messages")
    parts: list[Any] = []
    for i, text in enumerate(pieces[0::2]):
        if text:
            parts.append(text)
        if i < len(media):
            parts.append(media[i])
    return parts


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Usage:
    """Token accounting of one chat call, in KV cells where it concerns the cache."""

    prompt_tokens: int
    completion_tokens: int
    kv_cells: int
    reused_cells: int


@dataclass(frozen=True)
class GroundedBox:
    """A box of the answer, in the model's 0-1000 coordinates and in the referred image's pixels.

    ``pixels`` is ``(left, top, right, bottom)`` in the original (un-resized) image number
    ``image_index`` of the conversation (see :meth:`glm4v_mtmd.Box.to_pixels`); None without images.
    """

    box: Box
    pixels: Optional[tuple[int, int, int, int]]
    image_index: Optional[int]


@dataclass(frozen=True)
class ChatResult:
    """The reply to :meth:`Session.chat`: reasoning and answer split, raw text, boxes, accounting.

    ``boxes`` are the grounding boxes of the answer (``<|begin_of_box|>…<|end_of_box|>``), mapped to
    the pixels of the most recent image of the conversation unless ``box_image`` chose another.
    """

    reasoning: str
    answer: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    boxes: tuple[GroundedBox, ...] = field(default=())


@dataclass(frozen=True)
class ChatChunk:
    """A piece of a streamed reply; ``kind`` says whether it is reasoning or answer text.

    The last chunk carries ``finish_reason``, the call's ``timings`` (its image encodes included),
    its ``usage`` and the answer's grounding ``boxes`` (as :attr:`ChatResult.boxes`).
    """

    text: str
    kind: Literal["reasoning", "answer"]
    finish_reason: Optional[FinishReason] = None
    timings: Optional[Timings] = field(default=None, repr=False)
    usage: Optional[Usage] = field(default=None, repr=False)
    boxes: tuple[GroundedBox, ...] = field(default=(), repr=False)


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class OutputSplitter:
    """Incremental split of generated text into reasoning and answer (tags removed).

    Handles tags split across chunks by holding back a possible tag prefix.
    """

    def __init__(self, thinking: bool) -> None:
        # When the prompt already closed the think block (thinking off), everything is answer.
        self.kind: Literal["reasoning", "answer"] = "answer"
        self._thinking = thinking
        self._buf = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Literal["reasoning", "answer"]]]:
        self._buf += text
        out: list[tuple[str, Literal["reasoning", "answer"]]] = []
        while self._buf:
            idx = self._buf.find("<")
            if idx < 0:
                out.append((self._buf, self.kind))
                self._buf = ""
                break
            if idx > 0:
                out.append((self._buf[:idx], self.kind))
                self._buf = self._buf[idx:]
            tag = next((t for t in _TAGS if self._buf.startswith(t)), None)
            if tag:
                self._buf = self._buf[len(tag):]
                if tag == "<think>" and self._thinking:
                    self.kind = "reasoning"
                elif tag in ("</think>", "<answer>", "</answer>"):
                    self.kind = "answer"
                continue
            if not final and any(t.startswith(self._buf) for t in _TAGS):
                break  # maybe the start of a tag: wait for more text
            out.append((self._buf[0], self.kind))
            self._buf = self._buf[1:]
        return [(t, k) for t, k in out if t]


def split_output(text: str, thinking: bool = True) -> tuple[str, str]:
    """(reasoning, answer) of a complete reply, tags removed and whitespace stripped."""
    splitter = OutputSplitter(thinking)
    reasoning, answer = [], []
    for piece, kind in splitter.feed(text, final=True):
        (reasoning if kind == "reasoning" else answer).append(piece)
    return "".join(reasoning).strip(), "".join(answer).strip()


# ----------------------------------------------------------------------------------------------- driver


def build_prompt(
    model: Any, messages: Sequence[Message], thinking: Optional[bool], stats: Optional[CallStats] = None
) -> tuple[list[Any], bool, list[ImageEmbedding]]:
    """Prompt parts for ``messages``, whether the reply starts in thinking mode, and the images' embeddings.

    ``model`` gives ``chat_family``, ``chat_template`` and ``_encode``. Images are encoded through the
    model's embedding cache, so a conversation's earlier images are not encoded again on later turns;
    the time of those encoded now goes to ``stats``.
    """
    family = model.chat_family
    if family.always_thinks and thinking is False:
        raise ConfigError("GLM-4.1V-Thinking always reasons; thinking=False is not available for this model")
    msgs, images = normalize_messages(messages)
    enable = None if family.always_thinks else thinking
    template = model.chat_template
    if template:
        rendered = render_template(template, msgs, enable_thinking=enable)
    else:
        rendered = render_builtin(family, msgs, enable_thinking=enable)
    thinks = family.always_thinks or thinking is not False
    # In a message part a str image is a path (in a raw prompt a str would be text).
    media: list[Any] = []
    for item in images:
        if isinstance(item, VideoPart):
            video = item.video
            if not isinstance(video, VideoEmbedding):
                video = model._encode_video(video, stats, fps=item.fps)
            media.append(video)
        elif isinstance(item, ImageEmbedding):
            media.append(item)
        else:
            media.append(model._encode(pathlib.Path(item) if isinstance(item, str) else item, stats))
    embeddings = [m for m in media if isinstance(m, ImageEmbedding)]
    return prompt_parts(rendered, media), thinks, embeddings


class SizedImage(Protocol):
    """An image of a conversation as boxes need it: :class:`ImageEmbedding`, or what
    :func:`glm4v_mtmd.connect` sends."""

    @property
    def original_size(self) -> tuple[int, int]: ...


def check_box_image(embeddings: Sequence[SizedImage], box_image: int) -> None:
    """Raise ConfigError unless ``box_image`` indexes the conversation's images (any value without images)."""
    if embeddings and not -len(embeddings) <= box_image < len(embeddings):
        raise ConfigError(f"box_image={box_image}: the conversation has {len(embeddings)} images")


def ground_boxes(answer: str, embeddings: Sequence[SizedImage], box_image: int) -> tuple[GroundedBox, ...]:
    """The answer's boxes, mapped to the original pixels (``original_size``) of image ``box_image`` of
    the conversation."""
    boxes = parse_boxes(answer)
    if not embeddings:
        return tuple(GroundedBox(b, None, None) for b in boxes)
    check_box_image(embeddings, box_image)
    emb = embeddings[box_image]
    index = box_image % len(embeddings)
    width, height = emb.original_size
    return tuple(GroundedBox(b, b.to_pixels(width, height), index) for b in boxes)


def chat_stream(ctx: ChatBackend, messages: Sequence[Message], config: Optional[GenerationConfig] = None,
                *, thinking: Optional[bool] = None, box_image: int = -1,
                tokens_per_step: int = 1) -> Iterator[ChatChunk]:
    """Stream a reply as :class:`ChatChunk` s (see :meth:`Context.chat_stream`).

    ``tokens_per_step``: tokens generated per call into C, for callers that do not need each token
    at once (the engine still checks ``cancel()`` before every token); 1 streams each token as soon as
    it is ready, the engine decoding ahead of the reader meanwhile (see ``Context._chunks``).
    """
    model = ctx._chat_model()
    stats = CallStats()
    parts, thinks, embeddings = build_prompt(model, messages, thinking, stats)
    check_box_image(embeddings, box_image)
    splitter = OutputSplitter(thinks)
    answer: list[str] = []
    n_generated = 0
    for chunk in ctx._chunks(parts, config or model.chat_family.defaults, tokens_per_step, stats):
        n_generated += len(chunk.token_ids)
        pieces = splitter.feed(chunk.text, final=chunk.finish_reason is not None)
        answer.extend(text for text, kind in pieces if kind == "answer")
        if chunk.finish_reason is None:
            for text, kind in pieces:
                yield ChatChunk(text, kind)
            continue
        assert chunk.timings is not None
        usage = Usage(chunk.timings.prompt_tokens, n_generated, ctx.n_cells, ctx.last_reused)
        boxes = ground_boxes("".join(answer).strip(), embeddings, box_image)
        last_text, last_kind = pieces[-1] if pieces else ("", splitter.kind)
        for text, kind in pieces[:-1]:
            yield ChatChunk(text, kind)
        yield ChatChunk(last_text, last_kind, chunk.finish_reason, chunk.timings, usage, boxes)


def chat(ctx: ChatBackend, messages: Sequence[Message], config: Optional[GenerationConfig] = None,
         *, thinking: Optional[bool] = None, box_image: int = -1) -> ChatResult:
    """Answer ``messages`` (see :meth:`Context.chat`)."""
    model = ctx._chat_model()
    stats = CallStats()
    parts, thinks, embeddings = build_prompt(model, messages, thinking, stats)
    check_box_image(embeddings, box_image)  # before generating, not after
    result = ctx._generate(parts, config or model.chat_family.defaults, stats)
    reasoning, answer = split_output(result.text, thinks)
    usage = Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids),
        kv_cells=ctx.n_cells,
        reused_cells=ctx.last_reused,
    )
    boxes = ground_boxes(answer, embeddings, box_image)
    return ChatResult(reasoning, answer, result.text, result.finish_reason, usage, result.timings, boxes)
