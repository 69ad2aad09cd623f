"""Video preprocessing against transformers' GLM video processors (their own code; see video_reference)."""

from __future__ import annotations

import numpy as np
import pytest
import video_reference as ref

from glm4v_mtmd.errors import ConfigError
from glm4v_mtmd.video import (
    VideoError,
    preprocess_video,
    sample_frame_indices,
    timestamp_text,
    video_smart_resize,
)

# (frames, source fps, duration or None, sampling fps or None): short, long, odd, slow, fractional, missing.
SAMPLING_CASES = [
    (300, 30.0, None, None),  # duration derived: round(299/30) + 1 = 11 s
    (300, 30.0, 10.0, None),
    (301, 30.0, 10.0333, None),  # odd frame count
    (5, 24.0, None, None),  # a handful of frames
    (7, 30.0, 0.2333, None),  # under 1 s
    (2, 10.0, 0.2, None),
    (61, 29.97, 2.0354, None),  # NTSC rate
    (9000, 30.0, 300.0, None),  # the 300 s limit
    (9030, 30.0, 301.0, None),  # just over it
    (18000, 30.0, 600.0, None),  # > 300 s
    (150000, 25.0, 6000.0, None),  # > 2400 s
    (30, 1.0, 30.0, None),  # slow source: fewer frames than the rate asks
    (10, 0.5, 20.0, None),  # slower still
    (45, 15.0, 0.0, None),  # a zero duration counts as missing
    (240, 24.0, 10.0, 1.0),  # fps asked of the processor (glm46v ignores it)
    (240, 24.0, 10.0, 4.5),
    (73, 25.0, 2.92, None),
    (1, 30.0, None, None),  # one frame
    (900, 30.0, 30.0, None),  # the glm46v 30 s boundary
    (901, 30.0, 30.0333, None),
]


@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
@pytest.mark.parametrize("frames, fps, duration, sample_fps", SAMPLING_CASES)
def test_frame_indices_match_the_processor(variant, frames, fps, duration, sample_fps):
    want = ref.sample_frames(variant, frames, fps, duration, sample_fps)
    if len(want) == 0:  # the reference samples nothing (glm46v, < 1/6 s): a clear error here
        with pytest.raises(VideoError, match="1/6 s"):
            sample_frame_indices(frames, fps, duration, variant=variant, fps=sample_fps)
        return
    got = sample_frame_indices(frames, fps, duration, variant=variant, fps=sample_fps)
    assert got.tolist() == want.tolist()
    assert len(got) % 2 == 0


@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
def test_glm46v_under_a_sixth_of_a_second_is_an_error(variant):
    want = ref.sample_frames(variant, 3, 30.0, 0.1)
    if variant == "glm46v":
        assert len(want) == 0
        with pytest.raises(VideoError, match="1/6 s"):
            sample_frame_indices(3, 30.0, 0.1, variant=variant)
    else:
        assert sample_frame_indices(3, 30.0, 0.1, variant=variant).tolist() == want.tolist()


@pytest.mark.parametrize("bad", [dict(source_fps=0), dict(source_fps=float("nan")), dict(total_frames=0),
                                 dict(duration=-1.0), dict(fps=0)])
def test_bad_sampling_metadata_is_refused(bad):
    args = dict(total_frames=30, source_fps=30.0, duration=None, fps=None) | bad
    with pytest.raises((VideoError, ConfigError)):
        sample_frame_indices(args["total_frames"], args["source_fps"], args["duration"], fps=args["fps"])


@pytest.mark.parametrize("t, h, w", [(2, 1080, 1920), (20, 1080, 1920), (600, 1080, 1920), (2, 2160, 3840),
                                     (5, 480, 640), (3, 20, 900), (64, 28, 28), (2, 30, 31), (16, 720, 1280),
                                     (2, 10, 10), (640, 360, 640), (7, 333, 777)])
@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
def test_smart_resize_matches_the_processor(variant, t, h, w):
    want = ref.smart_resize(variant, t, h, w, 112 * 112, 28 * 28 * 2 * 30000)
    assert video_smart_resize(t, h, w) == want
    small = ref.smart_resize(variant, t, h, w, 112 * 112, 28 * 28 * 2 * 600)
    assert video_smart_resize(t, h, w, max_pixels=28 * 28 * 2 * 600) == small


def test_smart_resize_refuses_one_frame_and_extreme_aspect():
    with pytest.raises(VideoError, match="at least 2 frames"):
        video_smart_resize(1, 100, 100)
    with pytest.raises(VideoError, match="aspect ratio"):
        video_smart_resize(2, 28, 28 * 201)


@pytest.mark.parametrize("seconds, g4, g46", [(0.0, "0", "0.0 seconds"), (12.96, "12", "13.0 seconds"),
                                              (0.25, "0", "0.2 seconds"), (0.35, "0", "0.3 seconds"),
                                              (299.999, "299", "300.0 seconds")])
def test_timestamp_texts(seconds, g4, g46):
    assert timestamp_text(seconds, "glm4v") == g4
    assert timestamp_text(seconds, "glm46v") == g46


def _clip(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.stack([np.clip(base + rng.normal(0, 40, base.shape) + 9 * k, 0, 255) for k in range(t)]).astype(np.uint8)


@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
@pytest.mark.parametrize("t, fps", [(30, 10.0), (41, 12.0), (7, 30.0)])
def test_prompt_text_matches_replace_video_token(variant, t, fps):
    clip = _clip(t, 60, 90)
    pre = preprocess_video(clip, source_fps=fps, variant=variant)
    want = ref.video_text(variant, list(pre.grid), pre.frame_indices.tolist(), fps)
    assert pre.placeholder_text() == want
    assert pre.frame_indices.tolist() == ref.sample_frames(variant, t, fps, None).tolist()
    assert pre.timestamps == tuple(i / fps for i in pre.frame_indices.tolist()[::2])


def test_missing_metadata_is_refused():
    with pytest.raises(VideoError, match="source_fps"):
        preprocess_video(_clip(4, 56, 56))


def test_frames_with_timestamps_are_used_as_given():
    clip = _clip(3, 56, 84)
    pre = preprocess_video([(0.0, clip[0]), (0.5, clip[1]), (1.25, clip[2])], variant="glm46v")
    assert pre.frame_indices.tolist() == [0, 1, 2]
    assert pre.grid == (2, 4, 6) and pre.frames.shape == (4, 56, 84, 3)
    assert np.array_equal(pre.frames[3], pre.frames[2])  # odd count: the last frame repeated
    assert pre.timestamp_texts == ("0.0 seconds", "1.2 seconds")
    with pytest.raises(VideoError, match="at least 2 frames"):
        preprocess_video([(0.0, clip[0])])
    with pytest.raises(VideoError, match="same size"):
        preprocess_video([(0.0, clip[0]), (1.0, clip[1][:40])])


# ------------------------------------------------------------------------------------- resize and pixels


def _resize_cases() -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(3)
    cases = [(1080, 1920, 1092, 1932), (360, 640, 196, 364), (448, 640, 224, 308), (448, 640, 896, 1260),
             (60, 100, 56, 112), (2160, 3840, 224, 392), (30, 31, 28, 28), (28, 5600, 28, 5600), (480, 640, 476, 644),
             (100, 100, 28, 2800)]
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(20, 700, 2))
        cases.append((h, w, int(rng.integers(1, 30)) * 28, int(rng.integers(1, 30)) * 28))
    return cases


@pytest.mark.parametrize("h, w, out_h, out_w", _resize_cases())
def test_resize_is_torchvision_bit_exact(h, w, out_h, out_w):
    """torchvision's uint8 antialiased bicubic (torch's kernel, via the stand-in) = our numpy port, on noise
    (where Pillow's kernel differs most) and on a smooth picture."""
    import torch
    import tv_standin

    from glm4v_mtmd._resize import resize_bicubic_aa_uint8

    rng = np.random.default_rng(h * 7919 + w)
    noise = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    smooth = _clip(1, h, w, seed=h)
    for frames in (noise, smooth):
        video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # (1, T, C, H, W) as the processor passes it
        want = tv_standin.tv_resize_standin(video, [out_h, out_w])[0].permute(0, 2, 3, 1).numpy()
        got = resize_bicubic_aa_uint8(frames, out_h, out_w)
        assert got.shape == want.shape
        assert np.array_equal(got, want), f"max |diff| {np.abs(got.astype(int) - want).max()}"


@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
@pytest.mark.parametrize("t, h, w, fps", [(9, 90, 160, 3.0), (20, 333, 500, 10.0), (3, 40, 60, 30.0)])
def test_pixel_values_and_grid_match_the_processor(variant, t, h, w, fps):
    """The whole chain against the processor's own steps: sample, smart_resize, resize (stand-in),
    fused normalise (stand-in) and patchify."""
    import torch
    import tv_standin

    clip = _clip(t, h, w, seed=t)
    pre = preprocess_video(clip, source_fps=fps, variant=variant)
    indices = ref.sample_frames(variant, t, fps, None)
    assert pre.frame_indices.tolist() == indices.tolist()
    video = torch.from_numpy(clip[indices]).permute(0, 3, 1, 2)[None]
    size = ref.smart_resize(variant, len(indices), h, w, 112 * 112, 28 * 28 * 2 * 30000)
    resized = tv_standin.tv_resize_standin(video, list(size))
    assert pre.resized_size == (size[1], size[0])
    want, grid = ref.pixel_values(variant, resized)
    assert list(pre.grid) == grid
    got = pre.pixel_values
    assert got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.numpy())  # same float32 ops in the same order: bit-exact


def test_max_frames_keeps_an_even_spread_of_the_sampled_frames():
    clip = _clip(60, 56, 56)
    full = preprocess_video(clip, source_fps=6.0, duration=10.0)  # 10 s at 2 frames/s: 20 frames
    cut = preprocess_video(clip, source_fps=6.0, duration=10.0, max_frames=6)
    assert len(full.frame_indices) == 20
    assert cut.frame_indices.tolist() == full.frame_indices[[0, 4, 8, 11, 15, 19]].tolist()
    assert cut.timestamps == tuple(i / 6.0 for i in cut.frame_indices.tolist()[::2])
    same = preprocess_video(clip, source_fps=6.0, duration=10.0, max_frames=40)
    assert same.frame_indices.tolist() == full.frame_indices.tolist()
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ConfigError, match="max_frames"):
            preprocess_video(clip, source_fps=6.0, max_frames=bad)
