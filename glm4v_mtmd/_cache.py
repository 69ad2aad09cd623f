"""A bounded LRU cache of image embeddings, keyed by the image's content.

Encoding an image is the slowest step of a first answer; a conversation sends the same images
again on every turn, so their embeddings are kept (up to a size in bytes) and reused.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from .types import ImageEmbedding


def content_key(image: Any, limits: tuple[int, ...]) -> Optional[str]:
    """A digest of the image's content and the size limits, or None when it cannot be hashed cheaply."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(limits).encode())
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None  # let the loader raise its own, clearer error
    elif isinstance(image, (bytes, bytearray, memoryview)):
        h.update(bytes(image))
    elif isinstance(image, np.ndarray):
        h.update(repr((image.shape, image.dtype.str)).encode())
        h.update(np.ascontiguousarray(image).tobytes())
    elif hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL image
        exif = image.getexif() if hasattr(image, "getexif") else {}
        h.update(repr((image.mode, image.size, dict(exif))).encode())
        h.update(image.tobytes())
    else:
        return None  # file objects: reading would consume them
    return h.hexdigest()


class EmbeddingCache:
    """LRU of :class:`ImageEmbedding` s bounded by ``max_bytes`` of embedding data."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._bytes = 0

    def get(self, key: Optional[str]) -> Optional[ImageEmbedding]:
        if key is None or key not in self._items:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Optional[str], emb: ImageEmbedding) -> None:
        size = emb.array.nbytes
        if key is None or size > self.max_bytes or key in self._items:
            return
        self._items[key] = emb
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.array.nbytes

    @property
    def size_bytes(self) -> int:
        """Bytes of embedding data held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0
