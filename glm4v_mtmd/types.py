"""Public result and configuration types (small frozen dataclasses)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from .errors import ConfigError, ImageError

#: Why a generation ended: a stop token or stop string ("stop"), ``max_tokens`` ("length"), the
#: context's KV cells ran out ("context"), or ``cancel()`` / Ctrl-C ("cancelled").
FinishReason = Literal["stop", "length", "context", "cancelled"]


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling and stopping options of one generation.

    The defaults are the GLM-4.6V / 4.6V-Flash model-card values (top_p 0.6, top_k 2,
    temperature 0.8, repetition penalty 1.1). ``temperature=0`` means greedy decoding.

    Attributes:
        max_tokens: most tokens to generate (the stop token is not counted).
        temperature: softmax temperature; 0 selects the most likely token.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        min_p: drop tokens below min_p times the top probability (0 = off).
        repetition_penalty: penalty on tokens seen in the last ``repeat_last_n`` (1.0 = off).
        repeat_last_n: window of the repetition penalty (-1 = the whole context).
        presence_penalty, frequency_penalty: OpenAI-style penalties (0 = off).
        seed: random seed of the sampler; ``None`` draws one.
        stop_token_ids: extra token ids that end the generation, added to the model's own
            stop tokens (``<|endoftext|>``, ``<|user|>``, ``<|observation|>``).
        ignore_eos: do not stop on the model's own stop tokens (benchmarks and tests);
            ``stop_token_ids`` still apply.
        stop: strings that end the generation; the text is cut before the first one found
            (``finish_reason`` "stop"). Streaming holds back text that may begin one.
        logit_bias: ``{token_id: bias}`` added to the logits before sampling (OpenAI's
            ``logit_bias``); ``-math.inf`` bans a token. Stored as sorted ``(id, bias)`` pairs.
    """

    max_tokens: int = 512
    temperature: float = 0.8
    top_k: int = 2
    top_p: float = 0.6
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"GenerationConfig.{name}={getattr(self, name)!r}: {rule}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise bad("max_tokens", "must be an integer >= 0")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise bad("min_p", "must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not isinstance(self.repeat_last_n, int) or self.repeat_last_n < -1:
            raise bad("repeat_last_n", "must be an integer >= -1")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise bad("seed", "must be None or an integer in [0, 2**32)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise bad("stop", "must be non-empty strings")
        object.__setattr__(self, "stop", stops)
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs; ids >= 0, biases finite or -inf."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(t, b) for t, b in items]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"GenerationConfig.logit_bias={value!r}: must be a {{token_id: bias}} mapping") from None
    out: dict[int, float] = {}
    for token, bias in pairs:
        if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or token < 0:
            raise ConfigError(f"GenerationConfig.logit_bias: token id {token!r} must be an integer >= 0")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
            raise ConfigError(f"GenerationConfig.logit_bias[{token}]={bias!r}: must be a finite number or -inf")
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


def embedding_digest(array: np.ndarray) -> str:
    """The content hash of an embedding array (shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((array.shape, array.dtype.str)).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ImageEmbedding:
    """An encoded image: the projector's output, ready to be placed in a prompt.

    Attributes:
        array: float32 ``[n_tokens, n_embd]``, rows in raster order of the merged grid. Kept
            read-only (a writeable array given here is copied first).
        grid: ``(rows, cols)`` of the merged grid (after the 2x2 merge); ``rows * cols`` must be
            ``n_tokens``.
        original_size: ``(width, height)`` of the image as given.
        resized_size: ``(width, height)`` the model saw.
        digest: content hash of ``array``, used to reuse the KV cache across prompts; computed
            from the array when not given, so two different arrays never share one.

    Raises:
        ImageError: the array is not 2-D float32 or does not match ``grid``.
    """

    array: np.ndarray = field(repr=False)
    grid: tuple[int, int]
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    digest: str = field(repr=False, default="")

    def __post_init__(self) -> None:
        array = self.array
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype != np.float32:
            is_array = isinstance(array, np.ndarray)
            kind = f"{array.dtype} array of shape {array.shape}" if is_array else type(array).__name__
            raise ImageError(f"an ImageEmbedding needs a 2-D float32 array [n_tokens, n_embd], not a {kind}")
        try:
            rows, cols = (int(v) for v in self.grid)
        except (TypeError, ValueError):
            raise ImageError(f"ImageEmbedding grid={self.grid!r}: must be (rows, cols)") from None
        if rows <= 0 or cols <= 0 or rows * cols != array.shape[0]:
            raise ImageError(
                f"ImageEmbedding grid {rows}x{cols} = {rows * cols} tokens does not match the array's "
                f"{array.shape[0]} rows"
            )
        object.__setattr__(self, "grid", (rows, cols))
        if array.flags.writeable:
            array = array.copy()
            array.setflags(write=False)
            object.__setattr__(self, "array", array)
        if not self.digest:
            object.__setattr__(self, "digest", embedding_digest(array))

    @property
    def n_tokens(self) -> int:
        """Number of image tokens (= KV cells the image fills)."""
        return int(self.array.shape[0])

    @property
    def n_positions(self) -> int:
        """How far the image moves the M-RoPE position: ``max(rows, cols)``."""
        return max(self.grid)


@dataclass(frozen=True)
class VideoEmbedding:
    """An encoded video: one :class:`ImageEmbedding` per frame pair, and the pairs' timestamps.

    A prompt part like an image: it expands to ``<|begin_of_video|>``, then per pair
    ``<|begin_of_image|>`` + its embedding + ``<|end_of_image|>`` + the timestamp text, then
    ``<|end_of_video|>``, exactly as the GLM processors expand ``<|video|>``.

    Attributes:
        pairs: per frame pair, the projector's output (each an image part to the prompt).
        timestamp_texts: per pair, the timestamp as the prompt writes it (``"3"`` / ``"3.0 seconds"``).
        timestamps: per pair, the time of its first frame in seconds.
        frame_indices: the source frames used (even count; the last may repeat).
        original_size: ``(width, height)`` of the source frames.
        resized_size: ``(width, height)`` the model saw.
        variant: the processor variant used (``"glm4v"`` or ``"glm46v"``).
    """

    pairs: tuple[ImageEmbedding, ...]
    timestamp_texts: tuple[str, ...]
    timestamps: tuple[float, ...]
    frame_indices: tuple[int, ...]
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    variant: str

    def __post_init__(self) -> None:
        if not self.pairs or len(self.pairs) != len(self.timestamp_texts):
            raise ImageError(f"a VideoEmbedding needs one timestamp per pair: {len(self.pairs)} pairs, "
                             f"{len(self.timestamp_texts)} timestamps")

    @property
    def n_tokens(self) -> int:
        """Image tokens of all pairs (KV cells the frames fill, without the text between them)."""
        return sum(p.n_tokens for p in self.pairs)

    def prompt_parts(self) -> list:
        """The video as prompt parts: ``<|begin_of_video|>``, per pair an image part (which the prompt
        wraps in ``<|begin_of_image|>`` ... ``<|end_of_image|>`` as any image) and its timestamp text,
        then ``<|end_of_video|>``: what the processors make of ``<|begin_of_video|><|video|><|end_of_video|>``."""
        parts: list = ["<|begin_of_video|>"]
        for pair, stamp in zip(self.pairs, self.timestamp_texts):
            parts += [pair, stamp]
        parts.append("<|end_of_video|>")
        return parts


@dataclass(frozen=True, init=False)
class Tokens:
    """Token ids placed in a prompt as given, without tokenizing text (e.g. a reference's ids).

    ``Tokens([151331, 151333, ...])`` is a prompt part like a string or an image; each id must be
    in the model's vocabulary (checked before evaluation).
    """

    ids: tuple[int, ...]

    def __init__(self, ids: Iterable[int]) -> None:
        if isinstance(ids, (str, bytes)):
            raise ConfigError("Tokens(...) takes integer token ids; put text in the prompt as a str")
        values = tuple(ids)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in values):
            raise ConfigError("Tokens(...) takes an iterable of integer token ids")
        object.__setattr__(self, "ids", tuple(int(i) for i in values))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Timings:
    """Wall-clock timings of one call, in milliseconds (0 where a stage did not run).

    Every figure belongs to the one call that returned it (a ``chat`` includes the images it encoded).

    Attributes:
        preprocess_ms: the engine's pixel preprocessing (normalise, cut into patches) of the
            images this call encoded; resizing in Python (:func:`glm4v_mtmd.preprocess`) is not
            included. 0 when every image came from the cache or as an :class:`ImageEmbedding`.
        encode_ms: the vision encoder and projector on those images (what ``llama-mtmd-cli``
            reports as the image encode time).
        prompt_ms: evaluation of the prompt's new KV cells (text and image embeddings).
        decode_ms: the forward passes over generated tokens (one per token after the first, whose
            logits come from the prompt); ``generated_tokens`` counts those passes. Contexts of one
            model that generate at once share each pass, and each reports its wall time.
        sample_ms: choosing every generated token from its logits.
        prompt_tokens: the prompt's length in KV cells.
        prompt_batches: the engine calls that evaluated them, each of up to ``n_batch`` cells
            (``Session(n_batch=...)``; ``n_batch - n_parallel + 1`` on a model with several
            contexts, room for their tokens). Text and images of one prompt share batches, so this
            is ``ceil(new cells / that size)``; 0 when every cell was reused.
    """

    preprocess_ms: float = 0.0
    encode_ms: float = 0.0
    prompt_ms: float = 0.0
    decode_ms: float = 0.0
    sample_ms: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_batches: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decoded tokens per second (0 when nothing was decoded)."""
        return 1000.0 * self.generated_tokens / self.decode_ms if self.decode_ms > 0 else 0.0


@dataclass(frozen=True)
class Evaluation:
    """The result of :meth:`Session.evaluate`.

    Attributes:
        tokens: int32 ``[n]`` prompt ids; an image is ``<|begin_of_image|>``, one
            ``<|image|>`` id per image token, ``<|end_of_image|>``.
        positions: int32 ``[n, 3]`` M-RoPE positions (temporal, height, width).
        logits: float32 ``[n_vocab]`` logits of the last position.
        reused: number of leading KV cells reused from the previous prompt.
    """

    tokens: np.ndarray = field(repr=False)
    positions: np.ndarray = field(repr=False)
    logits: np.ndarray = field(repr=False)
    reused: int = 0


@dataclass(frozen=True)
class GenerationResult:
    """The result of :meth:`Session.generate`.

    ``text`` renders special pieces (so grounding markers such as ``<|begin_of_box|>`` are
    kept); the stop token is not part of ``text`` or ``token_ids``.
    """

    text: str
    token_ids: tuple[int, ...] = field(repr=False)
    finish_reason: FinishReason
    timings: Timings
    prompt_tokens: int = 0


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed output: complete UTF-8 text and the ids that produced it.

    ``finish_reason`` and ``timings`` (of the whole call) are set on the last chunk only.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: Optional[FinishReason] = None
    timings: Optional[Timings] = field(default=None, repr=False)
