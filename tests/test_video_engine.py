"""Video frame pairs through the engine (patch 0005) against transformers' get_video_features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import reference
import tolerances
from conftest import ARCHS, random_image

from glm4v_mtmd import Model
from glm4v_mtmd.video import patchify_video

# Four frames of 56 x 112 (a 2 x 4 merged grid per pair, inside the projector's 8-token minimum): two pairs,
# every frame different.
CLIP = np.stack([random_image(56, 112, seed=20 + k) for k in range(4)])


@pytest.fixture
def model_for(exact_session: Callable[..., Any]) -> Callable[[str], Model]:
    return lambda arch: exact_session(arch).model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("arch", ARCHS)
def test_frame_pairs_match_get_video_features(arch, model_for, reference_model):
    model = model_for(arch)
    expected = reference.reference_video_features(reference_model(arch), patchify_video(CLIP), (2, 4, 8))
    for k in range(2):
        emb = model._encode_pair(CLIP[2 * k: 2 * k + 2])
        assert emb.grid == (2, 4) and emb.array.shape == expected[k].shape
        rel = _rel(emb.array, expected[k])
        assert rel <= tolerances.EMBED_REL_L2, f"pair {k}: relative L2 error {rel:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_swapped_frames_do_not_match(arch, model_for, reference_model):
    """Each frame goes through its own temporal kernel: the pair in the wrong order is a different input."""
    model = model_for(arch)
    expected = reference.reference_video_features(reference_model(arch), patchify_video(CLIP[:2]), (1, 4, 8))[0]
    swapped = model._encode_pair(CLIP[[1, 0]])
    assert _rel(swapped.array, expected) > 100 * tolerances.EMBED_REL_L2


@pytest.mark.parametrize("arch", ARCHS)
def test_a_repeated_frame_is_the_still_image(arch, model_for):
    model = model_for(arch)
    pair = model._encode_pair(np.stack([CLIP[0], CLIP[0]]))
    image = model.encode_image(CLIP[0])
    assert pair.grid == image.grid
    np.testing.assert_allclose(pair.array, image.array, rtol=0, atol=1e-6 * float(np.abs(image.array).max()))
