"""A prompt as the KV cache sees it: one key per cell, the token ids, image cell ranges.

Keys let a new prompt reuse the longest prefix it shares with what the cache holds: a text cell's
key is its token id, an image cell's key is (embedding digest, index). An image is
``<|begin_of_image|>``, one ``<|image|>`` per image token and ``<|end_of_image|>``, as the
transformers processor expands ``<|image|>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .types import ImageEmbedding


@dataclass
class CallStats:
    """Figures of one call that the engine's per-context timings do not see: its image encodes."""

    preprocess_ms: float = 0.0
    encode_ms: float = 0.0


@dataclass(frozen=True)
class Segment:
    """A prompt piece after normalisation: text token ids or one image embedding."""

    tokens: Optional[np.ndarray] = None
    image: Optional[ImageEmbedding] = None


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of ``<|begin_of_image|>``, ``<|image|>`` and ``<|end_of_image|>`` in the model's vocabulary."""

    begin: int
    image: int
    end: int


class PromptLayout:
    """Cell keys, prompt token ids and image cell ranges of a list of segments."""

    def __init__(self, segments: list[Segment], ids: ImageTokenIds) -> None:
        self.segments = segments
        self.ids = ids
        self.keys: list[Any] = []
        tokens: list[int] = []
        self.images: list[tuple[int, int]] = []
        for seg in segments:
            if seg.tokens is not None:
                self.keys.extend(seg.tokens.tolist())
                tokens.extend(seg.tokens.tolist())
            else:
                assert seg.image is not None
                self.keys.append(ids.begin)
                start = len(self.keys)
                self.keys.extend((seg.image.digest, i) for i in range(seg.image.n_tokens))
                self.images.append((start, len(self.keys)))
                self.keys.append(ids.end)
                tokens.extend([ids.begin] + [ids.image] * seg.image.n_tokens + [ids.end])
        self.tokens = np.asarray(tokens, dtype=np.int32)

    def reusable_prefix(self, cached: list[Any]) -> int:
        """How many leading cells of ``cached`` this prompt can keep (never ending inside an image)."""
        n = 0
        limit = min(len(cached), len(self.keys) - 1)  # the last cell is always evaluated (logits)
        while n < limit and cached[n] == self.keys[n]:
            n += 1
        for start, end in self.images:
            if start < n < end:
                n = start
        return n

    def new_parts(self, skip: int) -> tuple[list[tuple[str, np.ndarray, tuple[int, int]]], int]:
        """The parts after the first ``skip`` cells, as ``("text", int32 ids, _)`` or ``("image", float32
        rows, grid)``, and their cell count."""
        specs: list[tuple[str, np.ndarray, tuple[int, int]]] = []
        cell = 0
        for seg in self.segments:
            if seg.tokens is not None:
                toks = seg.tokens
                lo = max(0, skip - cell)
                if lo < len(toks):
                    specs.append(("text", np.ascontiguousarray(toks[lo:], dtype=np.int32), (0, 0)))
                cell += len(toks)
            else:
                assert seg.image is not None
                begin, body, end = cell, cell + 1, cell + 1 + seg.image.n_tokens
                if skip <= begin:
                    specs.append(("text", np.asarray([self.ids.begin], dtype=np.int32), (0, 0)))
                if skip <= body:
                    specs.append(("image", np.ascontiguousarray(seg.image.array, dtype=np.float32), seg.image.grid))
                if skip <= end:
                    specs.append(("text", np.asarray([self.ids.end], dtype=np.int32), (0, 0)))
                cell = end + 1
        return specs, sum(len(arr) for _, arr, _ in specs)


class StopStrings:
    """Finds stop strings in streamed text, holding back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        buf = self._held + text
        found = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if found:
            self._held = ""
            return buf[: min(found)], True
        keep = 0 if final else max(
            (k for s in self._stops for k in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:k])),
            default=0,
        )
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False


class PositionLog:
    """The (t, h, w) M-RoPE position of every KV cell; appending is amortised O(1) per cell.

    A generation appends one cell per token: re-concatenating the whole history each time made the
    per-token cost grow with the output length.
    """

    def __init__(self) -> None:
        self._buf = np.zeros((256, 3), dtype=np.int32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def truncate(self, n: int) -> None:
        self._n = min(n, self._n)

    def extend(self, rows: np.ndarray) -> None:
        need = self._n + len(rows)
        if need > len(self._buf):
            grown = np.zeros((max(need, 2 * len(self._buf)), 3), dtype=np.int32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = rows
        self._n = need

    def extend_text(self, start: int, n: int) -> None:
        """``n`` text cells at positions ``start, start + 1, ...`` (the same value on all three axes)."""
        self.extend(np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], 3, axis=1))

    def array(self) -> np.ndarray:
        """A copy of the positions, int32 ``[cells, 3]``."""
        return self._buf[: self._n].copy()
