"""A video file end to end: PyAV writes a clip, the package decodes, samples, encodes and answers."""

from __future__ import annotations

import base64
import pathlib
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import video_reference as ref
from conftest import random_image

av = pytest.importorskip("av")

from glm4v_mtmd import GenerationConfig, Session  # noqa: E402
from glm4v_mtmd.video import preprocess_video  # noqa: E402

FPS = 4
N_FRAMES = 14  # 3.5 s


def write_clip(path: pathlib.Path, frames: np.ndarray, fps: int) -> None:
    """A lossless clip (FFV1 in Matroska), so decoded frames equal the array."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, np.ndarray]:
    frames = np.stack([random_image(60, 100, seed=60 + k) for k in range(N_FRAMES)])
    path = tmp_path_factory.mktemp("video") / "clip.mkv"
    write_clip(path, frames, FPS)
    return path, frames


@pytest.mark.parametrize("variant", ["glm4v", "glm46v"])
def test_a_file_is_read_as_its_frames(clip, variant):
    path, frames = clip
    from_file = preprocess_video(path, variant=variant)
    # Metadata as the PyAV reader takes it: frame count (counted when the container does not say), rate,
    # duration = frames / rate; the sampling is the processor's for that metadata.
    want = ref.sample_frames(variant, N_FRAMES, float(FPS), N_FRAMES / FPS)
    assert from_file.frame_indices.tolist() == want.tolist()
    from_array = preprocess_video(frames, source_fps=FPS, duration=N_FRAMES / FPS, variant=variant)
    assert np.array_equal(from_file.frames, from_array.frames)  # lossless: the same pixels
    assert from_file.timestamp_texts == from_array.timestamp_texts
    assert from_file.original_size == (100, 60)


def test_unreadable_and_missing_files(tmp_path):
    from glm4v_mtmd.video import VideoError

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\0" * 100)
    with pytest.raises(VideoError, match="cannot be read"):
        preprocess_video(bad)
    with pytest.raises(VideoError, match="no such file"):
        preprocess_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="the video data: cannot be read"):
        preprocess_video(b"not a video at all")


@pytest.fixture(scope="module")
def session(gguf_pair: Any) -> Any:
    text, proj = gguf_pair("glm4v", 0, "f16")
    with Session(text, proj, n_ctx=2048, n_threads=2) as s:
        yield s


def test_chat_answers_about_a_video_file(clip, session):
    path, _ = clip
    greedy = GenerationConfig(max_tokens=8, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(path)},
                                             {"type": "text", "text": "What happens?"}]}]
    result = session.chat(messages, greedy)
    video = session.model.encode_video(path)
    # The prompt holds every pair's tokens (cached: the chat encoded them already).
    assert result.usage.prompt_tokens > video.n_tokens
    assert result.usage.completion_tokens > 0
    assert result.timings.encode_ms > 0
    # As a video_url (a local path), the same prompt: the KV cache covers it all.
    again = session.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(path)}},
                                                       {"type": "text", "text": "What happens?"}]}], greedy)
    assert again.text == result.text
    assert again.usage.reused_cells >= video.n_tokens
    # As a data URL: the file's bytes, decoded from memory, the same frames.
    url = "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()
    third = session.chat([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                       {"type": "text", "text": "What happens?"}]}], greedy)
    assert third.text == result.text and third.timings.encode_ms == 0  # every pair from the cache


def test_video_that_overflows_the_context_is_refused_before_encoding(gguf_pair, tmp_path):
    from glm4v_mtmd.errors import ContextOverflowError

    text, proj = gguf_pair("glm4v", 0, "f16")
    frames = np.stack([random_image(112, 112, seed=k) for k in range(40)])
    with Session(text, proj, n_ctx=256, n_threads=2) as s:
        with pytest.raises(ContextOverflowError, match="needs .* tokens.*max_frames, now 40"):
            s.model.encode_video(frames, source_fps=2)
        # The knob the error names makes it fit.
        video = s.model.encode_video(frames, source_fps=2, max_frames=4)
        assert video.frame_indices == (0, 13, 26, 39) and len(video.pairs) == 2


def test_cli_run_with_a_video(clip, gguf_pair, tmp_path):
    path, _ = clip
    text, proj = gguf_pair("glm4v", 0, "f16")
    result = subprocess.run(
        [sys.executable, "-m", "glm4v_mtmd", "run", "-m", str(text), "--mmproj", str(proj), "--video", str(path),
         "-p", "What happens?", "--max-tokens", "4", "--n-ctx", "2048"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # 3.5 s at 2 frames/s: frames 0, 2, ..., 12 and the last repeated, as 4 pairs
    assert re.search(r"clip\.mkv: 8 frames of 100x60 sampled, 4 pairs of \d+ tokens", result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    fewer = subprocess.run(
        [sys.executable, "-m", "glm4v_mtmd", "run", "-m", str(text), "--mmproj", str(proj), "--video", str(path),
         "--video-max-frames", "2", "-p", "What happens?", "--max-tokens", "2", "--n-ctx", "2048"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert fewer.returncode == 0 and "2 frames of 100x60 sampled, 1 pairs" in fewer.stderr, fewer.stderr
