"""The image-embedding LRU cache: keyed by content, bounded in bytes."""

from __future__ import annotations

import numpy as np

from glm4v_mtmd import ImageEmbedding
from glm4v_mtmd._cache import EmbeddingCache, content_key


def _emb(n_bytes: int) -> ImageEmbedding:
    return ImageEmbedding(np.zeros((n_bytes // 16, 4), np.float32), (n_bytes // 16, 1), (1, 1), (1, 1), "d")


def test_lru_evicts_the_least_recently_used_beyond_the_bound():
    cache = EmbeddingCache(max_bytes=3000)
    for key in "abc":
        cache.put(key, _emb(1000))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _emb(1000))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.size_bytes <= 3000 and len(cache) == 3


def test_an_embedding_larger_than_the_cache_is_not_kept():
    cache = EmbeddingCache(max_bytes=100)
    cache.put("big", _emb(1000))
    assert len(cache) == 0


def test_keys_follow_content_and_limits(tmp_path):
    arr = np.zeros((4, 4, 3), np.uint8)
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assert content_key(arr, (1, 2)) == content_key(arr.copy(), (1, 2))
    assert content_key(arr, (1, 2)) != content_key(arr, (1, 3))
    assert content_key(arr, (1, 2)) != content_key(arr + 1, (1, 2))
    assert content_key(path, (1,)) == content_key(b"abc", (1,))
    assert content_key(tmp_path / "missing", (1,)) is None


def test_session_reuses_and_can_disable_the_cache(gguf_pair):
    from conftest import random_image

    from glm4v_mtmd import Session

    image = random_image(84, 84)
    with Session(*gguf_pair("glm4v", 0, "f32"), n_ctx=256, n_threads=1) as s:
        a = s.encode_image(image)
        assert s.encode_image(image) is a and s.image_cache.hits == 1
    with Session(*gguf_pair("glm4v", 0, "f32"), n_ctx=256, n_threads=1, image_cache_mb=0) as s:
        assert s.encode_image(image) is not s.encode_image(image)
        assert s.image_cache.hits == 0
