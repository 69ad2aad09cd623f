"""Video frame pairs through the engine (patch 0005) against transformers' get_video_features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import reference
import tolerances
from conftest import ARCHS, random_image, rel_l2

from glm4v_mtmd import Model
from glm4v_mtmd.video import patchify_video

# Four frames of 56 x 112 (a 2 x 4 merged grid per pair, inside the projector's 8-token minimum): two pairs,
# every frame different.
CLIP = np.stack([random_image(56, 112, seed=20 + k) for k in range(4)])


@pytest.fixture
def model_for(exact_session: Callable[..., Any]) -> Callable[[str], Model]:
    return lambda arch: exact_session(arch).model


@pytest.mark.parametrize("arch", ARCHS)
def test_frame_pairs_match_get_video_features(arch, model_for, reference_model):
    model = model_for(arch)
    expected = reference.reference_video_features(reference_model(arch), patchify_video(CLIP), (2, 4, 8))
    for k in range(2):
        emb = model._encode_pair(CLIP[2 * k: 2 * k + 2])
        assert emb.grid == (2, 4) and emb.array.shape == expected[k].shape
        rel = rel_l2(emb.array, expected[k])
        assert rel <= tolerances.EMBED_REL_L2, f"pair {k}: relative L2 error {rel:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_swapped_frames_do_not_match(arch, model_for, reference_model):
    """Each frame goes through its own temporal kernel: the pair in the wrong order is a different input."""
    model = model_for(arch)
    expected = reference.reference_video_features(reference_model(arch), patchify_video(CLIP[:2]), (1, 4, 8))[0]
    swapped = model._encode_pair(CLIP[[1, 0]])
    assert rel_l2(swapped.array, expected) > 100 * tolerances.EMBED_REL_L2


@pytest.mark.parametrize("arch", ARCHS)
def test_a_repeated_frame_is_the_still_image(arch, model_for):
    model = model_for(arch)
    pair = model._encode_pair(np.stack([CLIP[0], CLIP[0]]))
    image = model.encode_image(CLIP[0])
    assert pair.grid == image.grid
    np.testing.assert_allclose(pair.array, image.array, rtol=0, atol=1e-6 * float(np.abs(image.array).max()))


# The engine's per-image window (1 .. 30,000 tokens) spans every pair the video processors can make:
# a long clip's frames may shrink to one merged token each, and a 2-frame clip may use the whole
# 30,000-token budget. Still images keep transformers' 8 .. 6,144 (in Python).


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("height", "width"), [(28, 28), (28, 84), (56, 28)])
def test_pairs_below_the_image_minimum_are_not_resized(arch, height, width, model_for, reference_model):
    clip = np.stack([random_image(height, width, seed=40 + k) for k in range(2)])
    grid = (1, height // 14, width // 14)
    expected = reference.reference_video_features(reference_model(arch), patchify_video(clip), grid)[0]
    emb = model_for(arch)._encode_pair(clip)
    assert emb.grid == (height // 28, width // 28) and emb.n_tokens == (height // 28) * (width // 28) < 8
    rel = rel_l2(emb.array, expected)
    assert rel <= tolerances.EMBED_REL_L2, f"relative L2 error {rel:.2e}"


def test_a_pair_above_the_image_maximum_is_not_resized(gguf_pair):
    """6,237 tokens: above the still-image cap of 6,144, which the engine used to enforce on pairs
    too. Flash attention keeps the vision tower's memory linear in the 24,948 patches."""
    height, width = 28 * 81, 28 * 77
    clip = np.stack([random_image(height, width, seed=50 + k) for k in range(2)])
    with Model(*gguf_pair("glm4v", 0, "f16"), n_ctx=256, n_threads=2, flash_attn=True) as model:
        emb = model._encode_pair(clip)
    assert emb.grid == (81, 77) and emb.n_tokens == 81 * 77
    assert np.isfinite(emb.array).all()


def test_a_pair_beyond_the_window_is_refused_before_encoding(model_for):
    from glm4v_mtmd import VideoError
    from glm4v_mtmd.video import PreprocessedVideo

    # What preprocess_video makes of a 2-frame clip with max_pixels above the processors' default:
    # 178 x 170 merged tokens per pair (30,260). Only its shape matters: it is refused before encoding.
    pre = PreprocessedVideo(variant="glm4v", frame_indices=np.array([0, 1]), frame_timestamps=(0.0, 0.5),
                            timestamps=(0.0,), timestamp_texts=("0",), original_size=(4760, 4984),
                            resized_size=(4760, 4984), grid=(1, 356, 340),
                            frames=np.zeros((2, 28, 28, 3), dtype=np.uint8))
    assert pre.tokens_per_pair > 30000
    with pytest.raises(VideoError, match=r"window of 1\.\.30000 tokens per image: lower max_pixels"):
        model_for("glm4v").encode_video(pre)
