"""A video in a prompt against transformers: prompt ids, M-RoPE positions and greedy tokens (exact mode).

The clip's frames are given at their final size (56 x 112: sides multiples of 28, inside the video
processor's budget), so neither side resizes; preprocessing is test_video.py's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import reference
from conftest import ARCHS, random_image

from glm4v_mtmd import GenerationConfig, Session
from glm4v_mtmd.video import preprocess_video

FPS = 2.0
BEFORE = "[gMASK]<sop><|user|>\n"
AFTER = "What happens in this video?<|assistant|>\n"
GREEDY = GenerationConfig(max_tokens=32, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)


def clip(n_frames: int) -> np.ndarray:
    return np.stack([random_image(56, 112, seed=40 + k) for k in range(n_frames)])


@pytest.fixture
def session_for(exact_session: Callable[..., Any]) -> Callable[[str], Session]:
    return exact_session


def _both(arch: str, variant: str, n_frames: int, session_for: Any, hf_checkpoint: Any) -> tuple[Any, Any]:
    frames = clip(n_frames)
    # Frames as given (one per 1/FPS s): the processor's sampling at 2 fps keeps them all.
    pre = preprocess_video(frames, source_fps=FPS, variant=variant)
    assert pre.frame_indices.tolist() == list(range(n_frames)) + ([n_frames - 1] if n_frames % 2 else [])
    video = session_for(arch).model.encode_video(pre)
    inputs = reference.build_video_inputs(hf_checkpoint(arch), BEFORE, pre.frames, pre.frame_indices.tolist(),
                                          FPS, variant, AFTER)
    return [BEFORE, video, AFTER], inputs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
@pytest.mark.parametrize("n_frames", [4, 5, 6])
def test_video_prompt_ids_and_positions(arch, variant, n_frames, session_for, hf_checkpoint, reference_model):
    prompt, inputs = _both(arch, variant, n_frames, session_for, hf_checkpoint)
    ev = session_for(arch).evaluate(prompt)
    np.testing.assert_array_equal(ev.tokens, inputs["input_ids"][0].numpy())
    expected = reference.reference_positions(reference_model(arch), inputs)
    np.testing.assert_array_equal(ev.positions, expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_pairs", [2, 3])
def test_32_greedy_tokens_with_a_video(arch, n_pairs, session_for, hf_checkpoint, reference_model):
    variant = "glm4v" if arch == "glm4v" else "glm46v"
    prompt, inputs = _both(arch, variant, 2 * n_pairs, session_for, hf_checkpoint)
    expected = reference.reference_greedy(reference_model(arch), inputs, n=32)
    got = session_for(arch).generate(prompt, GREEDY)
    assert list(got.token_ids) == expected
