"""Video inputs and the reference preprocessing, as transformers' GLM video processors do it.

Two processor variants exist, and the checkpoint's processor (not its architecture) decides which:

- ``"glm4v"`` (``Glm4vVideoProcessor``: GLM-4.1V-Thinking, GLM-4.5V): frames at a fixed 2 fps (or the
  ``fps`` asked for), at most 300 s; pair timestamps written as whole seconds (``"12"``).
- ``"glm46v"`` (``Glm46VVideoProcessor``: GLM-4.6V, GLM-4.6V-Flash): a rate that falls with the
  duration (6 frames/s up to 30 s, 2 up to 300 s, 1 beyond), at most 640 frames; timestamps written
  ``"12.3 seconds"``. It ignores ``fps``.

The pipeline (each step names the transformers function it reproduces):

1. Sample (``sample_frames`` of the variant): frame indices from the clip's frame count, rate and
   duration, deduplicated, the last repeated when the count is odd.
2. Size (``video_processing_glm4v.smart_resize``): one size for every frame, from one pixel budget
   over all sampled frames (``min_pixels``/``max_pixels`` = the processor's ``size``).
3. Resize: torchvision's ``resize(uint8, BICUBIC, antialias=True)`` on CPU, i.e. torch's uint8
   antialiased bicubic kernel, reproduced exactly in numpy (:mod:`glm4v_mtmd._resize`); not
   Pillow's, which differs by a level or two on photos and more on noise.
4. ``pixel_values`` only: the fused rescale+normalise (float32 ``(x - 255*mean) / (255*std)``) and
   the processor's ``patchify`` layout, giving ``pixel_values_videos`` / ``video_grid_thw``.

Each pair of frames becomes one image-like group of ``(h/28)*(w/28)`` tokens, followed in the
prompt by the timestamp of its first frame.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np

from ._resize import resize_bicubic_aa_uint8
from .errors import ConfigError, ImageError
from .images import IMAGE_MEAN, IMAGE_STD, MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE, smart_resize

Variant = Literal["glm4v", "glm46v"]
VARIANTS: tuple[str, ...] = ("glm4v", "glm46v")

#: The video processors' ``size`` defaults (``shortest_edge`` / ``longest_edge``): pixels over all frames.
VIDEO_MIN_PIXELS = 112 * 112
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000
#: Glm4vVideoProcessor: ``fps`` and ``max_duration`` class defaults.
GLM4V_FPS = 2
GLM4V_MAX_DURATION = 300
#: Glm46VVideoProcessor's dynamic rate: groups per second up to a duration, frame cap, duration cap.
GLM46V_RATES = ((30, 3), (300, 1), (2400, 0.5))
GLM46V_MAX_FRAMES = 640
GLM46V_MAX_DURATION = 2400
#: The processors' fallback when a clip's fps is unknown (``replace_video_token``).
DEFAULT_FPS = 24

VideoInput = Union[str, os.PathLike, bytes, np.ndarray, Sequence[Any]]


class VideoError(ImageError):
    """A video that cannot be read or breaks a preprocessing rule."""


# ------------------------------------------------------------------------------------- sampling


def _dedupe_even(indices: Sequence[int]) -> np.ndarray:
    seen: set[int] = set()
    uniq = []
    for idx in indices:
        idx = int(idx)
        if idx not in seen:
            seen.add(idx)
            uniq.append(idx)
    if len(uniq) & 1:
        uniq.append(uniq[-1])
    return np.array(uniq, dtype=np.int64)


def _duration(total_frames: int, source_fps: float, duration: Optional[float]) -> float:
    # `metadata.duration or round(max_frame_idx / metadata.fps) + 1`: a duration of 0 counts as missing.
    return duration or round((total_frames - 1) / source_fps) + 1


def sample_frame_indices(total_frames: int, source_fps: float, duration: Optional[float] = None, *,
                         variant: Variant = "glm4v", fps: Optional[float] = None) -> np.ndarray:
    """The frames the variant's ``sample_frames`` picks (an even count of indices, in order).

    ``total_frames`` / ``source_fps`` / ``duration`` are the clip's own metadata (``duration``
    None or 0: derived from the other two, as the processors do); ``fps`` is the sampling rate
    asked of ``Glm4vVideoProcessor`` (default 2; ``glm46v`` ignores it).

    Raises:
        VideoError: no frames, a rate that is not positive, or (``glm46v``) a clip shorter than
            1/6 s, for which the reference samples nothing.
    """
    _check_variant(variant)
    if not isinstance(total_frames, (int, np.integer)) or total_frames < 1:
        raise VideoError(f"the video has {total_frames!r} frames: at least one is needed")
    if not source_fps or not math.isfinite(source_fps) or source_fps <= 0:
        raise VideoError(f"source_fps={source_fps!r}: the clip's frame rate must be a positive number")
    if duration is not None and (not math.isfinite(duration) or duration < 0):
        raise VideoError(f"duration={duration!r}: must be a non-negative number of seconds")
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise ConfigError(f"fps={fps!r}: the sampling rate must be a positive number")
    total_frames = int(total_frames)
    max_frame_idx = total_frames - 1
    length = _duration(total_frames, source_fps, duration)
    if variant == "glm4v":
        requested = fps if fps is not None else GLM4V_FPS
        if length <= GLM4V_MAX_DURATION:
            n = max(int(math.floor(length * requested)), 1)
            indices = [min(max_frame_idx, int(math.ceil(i * source_fps / requested))) for i in range(n)]
        else:
            n = int(GLM4V_MAX_DURATION * requested)
            if n >= total_frames:
                indices = list(range(total_frames))
            else:
                seconds = np.linspace(0, length, n, endpoint=True)
                indices = [min(max_frame_idx, int(math.ceil(t * source_fps))) for t in seconds]
        return _dedupe_even(indices)

    effective = min(length, GLM46V_MAX_DURATION)
    rate = next(r for limit, r in GLM46V_RATES if effective <= limit)
    extract_t = min(int(effective * rate * TEMPORAL_PATCH_SIZE), GLM46V_MAX_FRAMES)
    if extract_t == 0:
        raise VideoError(f"the video lasts {length:g} s: GLM-4.6V's processor needs at least 1/6 s "
                         "(it samples no frame from a shorter clip)")
    per_frame = 1 / source_fps
    max_second = int(length)
    if total_frames < extract_t:
        indices = np.linspace(0, total_frames - 1, extract_t, dtype=int).tolist()
    else:
        indices = []
        current = 0.0
        step = 1 / (TEMPORAL_PATCH_SIZE * rate)
        for i in range(total_frames):
            if i * per_frame >= current:
                current += step
                indices.append(i)
                if current >= max_second:
                    break
    if len(indices) < extract_t:
        start, end = (indices[0], indices[-1]) if indices else (0, max(total_frames - 1, 0))
        indices = np.linspace(start, end, extract_t, dtype=int).tolist()
    elif len(indices) > extract_t:
        indices = np.linspace(0, total_frames - 1, extract_t, dtype=int).tolist()
    return _dedupe_even(indices)


def timestamp_text(seconds: float, variant: Variant) -> str:
    """How the variant's processor writes a pair's timestamp after ``<|end_of_image|>``."""
    _check_variant(variant)
    return str(int(seconds)) if variant == "glm4v" else f"{seconds:.1f} seconds"


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r}: one of {', '.join(VARIANTS)}")


# ------------------------------------------------------------------------------------- size


def video_smart_resize(num_frames: int, height: int, width: int, *, min_pixels: int = VIDEO_MIN_PIXELS,
                       max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` of every frame, as ``video_processing_glm4v.smart_resize``: one budget over
    all ``num_frames`` frames (the video processors' ``size`` counts every frame's pixels)."""
    if num_frames < TEMPORAL_PATCH_SIZE:
        raise VideoError(f"a video needs at least {TEMPORAL_PATCH_SIZE} frames, got {num_frames} "
                         "(for a single picture, send an image)")
    try:
        return smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels, num_frames=num_frames,
                            what="the video's frames")
    except ImageError as exc:
        raise VideoError(str(exc)) from None


# ------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoSource:
    """A clip's metadata, and a way to read the frames picked from it."""

    total_frames: int
    source_fps: Optional[float]
    duration: Optional[float]
    height: int
    width: int
    #: frames given with their own timestamps (no sampling): the timestamps, else None
    given_timestamps: Optional[tuple[float, ...]] = None
    _array: Optional[np.ndarray] = field(default=None, repr=False)
    _path: Optional[Union[str, bytes]] = field(default=None, repr=False)  # a file, or its bytes

    def frames(self, indices: Sequence[int]) -> Iterator[np.ndarray]:
        """The RGB frames at ``indices`` (ascending, repeats allowed), in that order."""
        if self._array is not None:
            for i in indices:
                yield self._array[int(i)]
            return
        assert self._path is not None
        yield from _decode_frames(self._path, indices)


def _check_frame(frame: Any, what: str) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise VideoError(f"{what}: expected a uint8 (height, width, 3) RGB frame, got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 2:
        raise VideoError(f"{what} is {arr.shape[1]}x{arr.shape[0]}: each side must be at least 2 pixels")
    return arr


def open_video(video: VideoInput, *, source_fps: Optional[float] = None,
               duration: Optional[float] = None) -> VideoSource:
    """Metadata and frame access for a file or its bytes (PyAV), a ``(T, H, W, 3)`` uint8 array, or a
    list of ``(seconds, frame)`` pairs (frames already chosen, used as given)."""
    if isinstance(video, (str, os.PathLike)):
        return _probe_file(os.fspath(video), source_fps, duration)
    if isinstance(video, (bytes, bytearray, memoryview)):  # an encoded file's bytes (a video_url data URL)
        return _probe_file(bytes(video), source_fps, duration)
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3:
            raise VideoError(f"a video array must be uint8 (frames, height, width, 3), got {video.dtype} {video.shape}")
        if source_fps is None:
            raise VideoError("a video given as an array needs source_fps (its frame rate), to sample frames "
                             "and write their timestamps")
        if not len(video):
            raise VideoError("the video has no frames")
        _check_frame(video[0], "the first frame")
        return VideoSource(len(video), float(source_fps), duration, video.shape[1], video.shape[2], _array=video)
    if isinstance(video, Sequence) and not isinstance(video, (bytes, bytearray)):
        if source_fps is not None or duration is not None:
            raise ConfigError("frames given with their timestamps are used as given: drop source_fps/duration")
        stamps, frames = [], []
        for k, item in enumerate(video):
            if not (isinstance(item, tuple) and len(item) == 2):
                raise VideoError(f"frame {k}: expected a (seconds, frame) pair, got {type(item).__name__}")
            seconds, frame = item
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
                raise VideoError(f"frame {k}: the timestamp {seconds!r} is not a number of seconds")
            frames.append(_check_frame(frame, f"frame {k}"))
            stamps.append(float(seconds))
        if not frames:
            raise VideoError("the video has no frames")
        if any(f.shape != frames[0].shape for f in frames):
            raise VideoError("every frame of a video must have the same size")
        return VideoSource(len(frames), None, None, frames[0].shape[0], frames[0].shape[1],
                           given_timestamps=tuple(stamps), _array=np.stack(frames))
    raise VideoError(f"a video is a file path, a (frames, height, width, 3) uint8 array or a list of "
                     f"(seconds, frame) pairs, not {type(video).__name__}")


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ConfigError("reading a video file needs PyAV: pip install 'glm4v-mtmd[video]'") from None
    return av


def _open_container(av: Any, source: Union[str, bytes]) -> Any:
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _probe_file(path: Union[str, bytes], source_fps: Optional[float], duration: Optional[float]) -> VideoSource:
    """Metadata as transformers' PyAV reader takes it (``read_video_pyav``): the stream's frame count
    and average rate, duration = frames / rate. ``source_fps`` / ``duration`` override them."""
    av = _av()
    name = "the video data" if isinstance(path, bytes) else path
    if not isinstance(path, bytes) and not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    try:
        with _open_container(av, path) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: holds no video stream")
            stream = container.streams.video[0]
            total = int(stream.frames)
            if total <= 0:  # the container does not say: count the stream's packets
                total = sum(1 for p in container.demux(stream) if p.size)
            rate = float(stream.average_rate) if stream.average_rate else None
            height, width = int(stream.height), int(stream.width)
    except av.error.FFmpegError as exc:
        raise VideoError(f"{name}: cannot be read as a video ({exc})") from None
    fps = float(source_fps) if source_fps is not None else rate
    if fps is None:
        raise VideoError(f"{name}: the file gives no frame rate; pass source_fps")
    if duration is None:
        duration = total / fps
    return VideoSource(total, fps, duration, height, width, _path=path)


def _decode_frames(path: Union[str, bytes], indices: Sequence[int]) -> Iterator[np.ndarray]:
    av = _av()
    name = "the video data" if isinstance(path, bytes) else path
    wanted: dict[int, int] = {}
    for i in indices:
        wanted[int(i)] = wanted.get(int(i), 0) + 1
    last = max(wanted)
    try:
        with _open_container(av, path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i > last:
                    break
                if i in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    for _ in range(wanted[i]):
                        yield rgb
                    del wanted[i]
    except av.error.FFmpegError as exc:
        raise VideoError(f"{name}: decoding failed ({exc})") from None
    if wanted:
        raise VideoError(f"{name}: frame {min(wanted)} could not be decoded (the file has fewer frames than it says)")


# ------------------------------------------------------------------------------------- preprocess


@dataclass(frozen=True)
class PreprocessedVideo:
    """What the family's transformers video processor makes of one clip.

    Attributes:
        variant: ``"glm4v"`` or ``"glm46v"``.
        frame_indices: the source frames used, in order (even count; the last may repeat).
        frame_timestamps: ``index / source_fps`` of each (``metadata.timestamps``); given ones as given.
        timestamps: per frame pair, the first frame's time in seconds (what the prompt shows).
        timestamp_texts: those as the prompt writes them (``"3"`` or ``"3.0 seconds"``).
        original_size: ``(width, height)`` of the source frames.
        resized_size: ``(width, height)`` every frame is resized to; multiples of 28.
        grid: ``(t, h, w)``: pairs and 14-px patches, as a row of ``video_grid_thw``.
        frames: uint8 ``[T, height, width, 3]`` resized frames (what the engine receives).
    """

    variant: str
    frame_indices: np.ndarray
    frame_timestamps: tuple[float, ...]
    timestamps: tuple[float, ...]
    timestamp_texts: tuple[str, ...]
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    grid: tuple[int, int, int]
    frames: np.ndarray = field(repr=False)

    @property
    def n_pairs(self) -> int:
        return self.grid[0]

    @property
    def tokens_per_pair(self) -> int:
        """Image tokens of each pair after the 2x2 merge."""
        return self.grid[1] * self.grid[2] // (MERGE_SIZE * MERGE_SIZE)

    def placeholder_text(self, image_token: str = "<|image|>") -> str:
        """The text the processor puts in place of ``<|video|>`` (``replace_video_token``): per pair,
        ``<|begin_of_image|>``, its image tokens, ``<|end_of_image|>`` and the timestamp, no separators."""
        body = image_token * self.tokens_per_pair
        return "".join(f"<|begin_of_image|>{body}<|end_of_image|>{ts}" for ts in self.timestamp_texts)

    @property
    def pixel_values(self) -> np.ndarray:
        """float32 ``[t*h*w, 3*2*14*14]``: the processor's ``pixel_values_videos`` (computed on use)."""
        return patchify_video(self.frames)


def _normalise(frames: np.ndarray) -> np.ndarray:
    """The fused rescale+normalise: float32 ``(x - mean*255) / (std*255)``, mean/std in float32."""
    mean = (np.asarray(IMAGE_MEAN, dtype=np.float32) * np.float32(255.0)).astype(np.float32)
    std = (np.asarray(IMAGE_STD, dtype=np.float32) * np.float32(255.0)).astype(np.float32)
    return (frames.astype(np.float32) - mean) / std


def patchify_video(frames: np.ndarray) -> np.ndarray:
    """``pixel_values_videos`` of resized uint8 frames ``[T, H, W, 3]`` (T even), in the layout of the
    processor's ``patchify``: rows by pair, then 2x2 merge block, columns ``(c, t, py, px)``."""
    t, height, width, channels = frames.shape
    if t % TEMPORAL_PATCH_SIZE:
        frames = np.concatenate([frames, frames[-1:]])
        t += 1
    x = _normalise(frames)  # [T, H, W, C]
    gt, gh, gw = t // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    # [gt, tp, gh/m, m, p, gw/m, m, p, C] -> [gt, gh/m, gw/m, m, m, C, tp, p, p]
    x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, channels).transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, channels * tp * p * p))


def default_variant(family_name: str) -> Variant:
    """The video processor of a chat family (:attr:`glm4v_mtmd.chat.ChatFamily.name`)."""
    return "glm4v" if family_name == "glm-4.1v-thinking" else "glm46v"


def preprocess_video(
    video: VideoInput,
    *,
    source_fps: Optional[float] = None,
    duration: Optional[float] = None,
    fps: Optional[float] = None,
    variant: Variant = "glm4v",
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_frames: Optional[int] = None,
) -> PreprocessedVideo:
    """Sample, size and resize a clip exactly as the variant's transformers video processor does.

    Args:
        video: a file path or a file's bytes (decoded with PyAV, the ``[video]`` extra), a uint8 ``(T, H, W, 3)``
            array (``source_fps`` required), or a list of ``(seconds, frame)`` pairs, used as given
            (no sampling; an odd count repeats the last frame, as the processor pads).
        source_fps, duration: the clip's own metadata; read from a file (where they override it),
            required (``source_fps``) with an array; a missing ``duration`` is derived as the
            processors derive it.
        fps: the sampling rate asked of ``Glm4vVideoProcessor`` (default 2; ``glm46v`` ignores it).
        variant: ``"glm4v"`` (GLM-4.1V, GLM-4.5V) or ``"glm46v"`` (GLM-4.6V, GLM-4.6V-Flash).
        min_pixels, max_pixels: the processor's ``size`` (``shortest_edge`` / ``longest_edge``),
            pixels over all sampled frames.
        max_frames: keep at most this many of the sampled frames (an even number >= 2), spread
            evenly over them (first and last kept). Not a processor option: with it the model sees
            fewer frames than transformers would give it (a long clip in a small ``n_ctx``).

    Raises:
        VideoError: the video cannot be read or breaks a preprocessing rule.
        ConfigError: an option is invalid, or PyAV is missing for a file.
    """
    _check_variant(variant)
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < 2 or max_frames % 2):
        raise ConfigError(f"max_frames={max_frames!r}: must be an even integer >= 2 (frames go in pairs)")
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name}={value!r}: must be a positive integer")
    if min_pixels > max_pixels:
        raise ConfigError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}")
    source = open_video(video, source_fps=source_fps, duration=duration)
    if source.given_timestamps is not None:
        indices = np.arange(source.total_frames, dtype=np.int64)
        frame_times = source.given_timestamps
        if fps is not None:
            raise ConfigError("frames given with their timestamps are not sampled: drop fps")
    else:
        assert source.source_fps is not None
        indices = sample_frame_indices(source.total_frames, source.source_fps, source.duration,
                                       variant=variant, fps=fps)
        frame_times = tuple(float(i) / source.source_fps for i in indices)
    if max_frames is not None and len(indices) > max_frames:
        keep = np.linspace(0, len(indices) - 1, max_frames).round().astype(np.int64)
        indices = indices[keep]
        frame_times = tuple(frame_times[int(k)] for k in keep)
    n = len(indices)
    new_h, new_w = video_smart_resize(n, source.height, source.width, min_pixels=min_pixels, max_pixels=max_pixels)
    frames = np.empty((n + n % 2, new_h, new_w, 3), dtype=np.uint8)
    # Resized a few frames at a time: one set of weights per batch, memory bounded for long clips.
    batch = max(1, min(n, (64 << 20) // (source.height * source.width * 3)))
    pending: list[np.ndarray] = []
    for k, frame in enumerate(source.frames(indices)):
        frame = _check_frame(frame, f"frame {int(indices[k])}")
        if frame.shape[:2] != (source.height, source.width):
            raise VideoError(f"frame {int(indices[k])} is {frame.shape[1]}x{frame.shape[0]}, the video "
                             f"{source.width}x{source.height}: every frame must have the same size")
        pending.append(frame)
        if len(pending) == batch or k == n - 1:
            frames[k + 1 - len(pending): k + 1] = resize_bicubic_aa_uint8(np.stack(pending), new_h, new_w)
            pending.clear()
    if n % 2:  # patchify pads an odd count with the last frame
        frames[n] = frames[n - 1]
    pairs = frames.shape[0] // TEMPORAL_PATCH_SIZE
    # replace_video_token: timestamps[::2], cut or padded (with the last) to the number of pairs
    pair_times = list(frame_times[::2][:pairs])
    while len(pair_times) < pairs:
        pair_times.append(pair_times[-1] if pair_times else 0.0)
    return PreprocessedVideo(
        variant=variant,
        frame_indices=indices,
        frame_timestamps=tuple(frame_times),
        timestamps=tuple(pair_times),
        timestamp_texts=tuple(timestamp_text(t, variant) for t in pair_times),
        original_size=(source.width, source.height),
        resized_size=(new_w, new_h),
        grid=(pairs, new_h // PATCH_SIZE, new_w // PATCH_SIZE),
        frames=frames,
    )
