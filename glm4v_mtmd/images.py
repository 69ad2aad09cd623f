"""Image inputs and the reference preprocessing, as transformers' ``Glm4vImageProcessorPil`` does it.

The pipeline (each step cites the transformers function it reproduces):

1. Decode. A path, bytes or file object is opened with Pillow, its header size checked against
   ``max_image_pixels`` before any pixel is decoded, then ``ImageOps.exif_transpose`` and
   ``convert("RGB")`` are applied, as ``image_utils.load_image`` does for a path.
2. RGB. ``image_transforms.convert_to_rgb``: a PIL image with an alpha band or a ``transparency``
   entry is composited onto white (``Image.alpha_composite``); a 4-channel array is blended onto
   white with ``np.round``; one channel is repeated. A PIL image passed directly gets no EXIF
   transpose (transformers applies none either).
3. Size. ``smart_resize`` (factor 28, two temporal frames, Python rounding, upscaling of small
   sides, aspect ratio at most 200, min/max pixels counting both frames). One deliberate
   difference: a side of 1 pixel is rejected (``MIN_IMAGE_SIDE``). Such an image holds no
   spatial information (a tracking pixel, a broken download); transformers' PIL path would blow
   it up to an 84x84 block of one colour and its array path misreads a (1, W, 3) array as
   channels-first. Every image with both sides >= 2 px is prepared exactly as the reference.
4. Resize. Pillow ``BICUBIC`` on the uint8 image, no ``reducing_gap``, stretched (no padding), as
   ``image_transforms.resize`` does. The engine receives this uint8 image; its sides are multiples
   of 28 and its token count is inside the engine's window, so llama.cpp neither resizes nor pads it.
5. ``preprocess`` only: rescale (float64 ``x * (1/255)`` cast to float32), normalise with the CLIP
   mean/std in float32 and lay patches out as ``Glm4vImageProcessorPil.patchify``.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import IO, Any, Optional, Union

import numpy as np

from .errors import ConfigError, ImageError

#: Checkpoint defaults of Glm4vImageProcessor (they count both temporal frames).
DEFAULT_MIN_PIXELS = 12_544
DEFAULT_MAX_PIXELS = 9_633_792
#: Largest width*height accepted before decoding: Pillow's own DecompressionBombError threshold.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
#: min_pixels / max_pixels per image token (two frames of a 28x28 block).
PIXELS_PER_TOKEN = TEMPORAL_PATCH_SIZE * FACTOR * FACTOR
MAX_ASPECT_RATIO = 200
#: Smallest side accepted (pixels); see step 3 of the module docstring.
MIN_IMAGE_SIDE = 2
#: OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, the checkpoints' image_mean / image_std.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, os.PathLike, bytes, bytearray, IO[bytes], np.ndarray, Any]


def smart_resize(
    height: int,
    width: int,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    factor: int = FACTOR,
    num_frames: int = TEMPORAL_PATCH_SIZE,
    temporal_factor: int = TEMPORAL_PATCH_SIZE,
    what: str = "image",
) -> tuple[int, int]:
    """Target ``(height, width)`` of an image, as ``transformers.models.glm4v.image_processing_glm4v.smart_resize``.

    Raises:
        ImageError: a side is 0, or the aspect ratio exceeds 200 (``what`` names the image).
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"{what} is {width}x{height}: both sides must be positive")
    if num_frames < temporal_factor:
        raise ImageError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        # Upscale so the short side is `factor` (transformers does this before rounding).
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"{what} has aspect ratio {ratio:.1f}, above the model's limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor  # Python's round: halves to even
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_limits(
    min_pixels: Any, max_pixels: Any, max_image_pixels: Any, *, window: Optional[tuple[int, int]] = None
) -> None:
    """Validate size options; ``window`` is the (min, max) pixel range the engine accepts unchanged.

    Raises:
        ConfigError: an option is not a positive integer, min > max, or outside ``window``.
    """
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("max_image_pixels", max_image_pixels)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name}={value!r}: must be a positive integer")
    if min_pixels > max_pixels:
        raise ConfigError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}")
    if window is not None and not window[0] <= min_pixels <= max_pixels <= window[1]:
        raise ConfigError(
            f"min_pixels={min_pixels}, max_pixels={max_pixels}: the engine is loaded for {window[0]} .. {window[1]} "
            f"pixels ({window[0] // PIXELS_PER_TOKEN} .. {window[1] // PIXELS_PER_TOKEN} image tokens) and would "
            "resize images outside that range; choose limits inside it"
        )


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"image '{os.fspath(image)}'"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(image)} bytes)"
    if isinstance(image, np.ndarray):
        return f"image array {image.shape} {image.dtype}"
    if hasattr(image, "read"):
        return f"image file {getattr(image, 'name', type(image).__name__)!r}"
    return f"image {type(image).__name__}"


def _check_pixels(width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels, above max_image_pixels={limit} "
            "(decompression-bomb guard; raise max_image_pixels to accept it)"
        )


def _pil_to_rgb(pil: Any) -> np.ndarray:
    """``transformers.image_transforms.convert_to_rgb`` for a PIL image: transparency onto white."""
    from PIL import Image

    if "A" in pil.getbands() or pil.info.get("transparency") is not None:
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(background, rgba)
    return np.asarray(pil.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray, what: str, limit: int) -> np.ndarray:
    """``convert_to_rgb`` for a channels-last uint8 array (a bare HxW counts as HxWx1)."""
    if arr.dtype != np.uint8:
        raise ImageError(f"{what}: arrays must be uint8 (got {arr.dtype})")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{what}: expected a channels-last HxW, HxWx1, HxWx3 or HxWx4 array")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{what} is {arr.shape[1]}x{arr.shape[0]}: both sides must be positive")
    _check_pixels(arr.shape[1], arr.shape[0], limit, what)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[..., 3:4] / 255
        arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _decode(source: Any, what: str, limit: int) -> np.ndarray:
    """Open an encoded image as ``load_image`` does (EXIF transpose, then ``convert("RGB")``)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as pil:
            _check_pixels(pil.width, pil.height, limit, what)  # header only: nothing decoded yet
            upright = ImageOps.exif_transpose(pil)
            return _pil_to_rgb(upright.convert("RGB"))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what}: {exc} (Pillow's own Image.MAX_IMAGE_PIXELS guard)") from exc


def load_rgb(image: ImageInput, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any supported input as a uint8 ``[height, width, 3]`` RGB array, converted as transformers does.

    Accepts a path, bytes, a binary file object, a PIL image or a channels-last uint8 ndarray
    (HxW, HxWx1, HxWx3, HxWx4). EXIF orientation is applied to paths, bytes and file objects only.

    Raises:
        ImageError: unreadable, truncated or non-image data, a side of 0, more than
            ``max_image_pixels`` pixels, or an unsupported input.
    """
    from PIL import Image

    what = _describe(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, what, max_image_pixels)
    try:
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise ImageError(f"{what}: no such file")
            return _decode(os.fspath(image), what, max_image_pixels)
        if isinstance(image, (bytes, bytearray, memoryview)):
            return _decode(io.BytesIO(bytes(image)), what, max_image_pixels)
        if hasattr(image, "read"):
            return _decode(image, what, max_image_pixels)
        if isinstance(image, Image.Image):
            _check_pixels(image.width, image.height, max_image_pixels, what)
            return _pil_to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise ImageError(f"{what}: cannot be decoded ({type(exc).__name__}: {exc})") from exc
    raise ImageError(f"{what}: unsupported input; pass a path, bytes, a file object, a PIL image or a uint8 array")


@dataclass(frozen=True)
class PreparedImage:
    """An RGB image at the size the model sees, plus its original size."""

    pixels: np.ndarray  # uint8 [height, width, 3], C-contiguous
    original_size: tuple[int, int]  # (width, height)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` after resizing."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    @property
    def n_tokens(self) -> int:
        """Image tokens after the 2x2 merge."""
        return (self.pixels.shape[0] // FACTOR) * (self.pixels.shape[1] // FACTOR)


def prepare_image(
    image: ImageInput,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> PreparedImage:
    """Load ``image`` and stretch it to the ``smart_resize`` size (Pillow bicubic on uint8, no padding)."""
    from PIL import Image

    rgb = load_rgb(image, max_image_pixels=max_image_pixels)
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"{_describe(image)} is {width}x{height}: each side must be at least {MIN_IMAGE_SIDE} pixels "
            "(a 1-pixel side holds no picture to describe)"
        )
    new_h, new_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels, what=_describe(image))
    if (new_h, new_w) != (height, width):
        # image_transforms.resize: PIL resize of the uint8 image, reducing_gap=None.
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    return PreparedImage(np.ascontiguousarray(rgb), (int(width), int(height)))


@dataclass(frozen=True)
class PreprocessedImage:
    """What ``Glm4vImageProcessor`` makes of one image.

    Attributes:
        original_size: ``(width, height)`` as given (after EXIF orientation for files).
        resized_size: ``(width, height)`` the model sees; both multiples of 28.
        grid: ``(t, h, w)`` in 14-px patches, as one row of ``image_grid_thw``.
        pixel_values: float32 ``[h*w, 3*2*14*14]``, the processor's ``pixel_values`` layout.
        pixels: uint8 ``[height, width, 3]`` resized image (what the engine receives).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    grid: tuple[int, int, int]
    pixel_values: np.ndarray = field(repr=False)
    pixels: np.ndarray = field(repr=False)

    @property
    def n_tokens(self) -> int:
        """Image tokens after the 2x2 merge."""
        return self.grid[1] * self.grid[2] // (MERGE_SIZE * MERGE_SIZE)


def _patchify(rgb: np.ndarray) -> np.ndarray:
    """Rescale, normalise and lay out as ``Glm4vImageProcessorPil._preprocess`` / ``patchify``."""
    chw = np.moveaxis(rgb, -1, 0)
    scaled = (chw.astype(np.float64) * (1 / 255)).astype(np.float32)  # image_transforms.rescale
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)[:, None, None]  # image_transforms.normalize (float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)[:, None, None]
    image = (scaled - mean) / std
    channels, height, width = image.shape
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    m, p, t = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    # (C, gh, mh, ph, gw, mw, pw) -> (gh, gw, mh, mw, C, ph, pw): patches in 2x2 merge-block order
    patches = image.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))  # both frames are the image
    return np.ascontiguousarray(patches.reshape(gh * gw, channels * t * p * p))


def preprocess(
    image: ImageInput,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> PreprocessedImage:
    """Preprocess one image exactly as ``Glm4vImageProcessorPil`` (PIL backend) does.

    ``min_pixels`` / ``max_pixels`` are the processor's ``size["shortest_edge"]`` /
    ``size["longest_edge"]`` (they count both temporal frames: one image token is 1,568 pixels).

    Raises:
        ImageError: the image cannot be read or breaks a preprocessing rule.
        ConfigError: a limit is not a positive integer, or min_pixels > max_pixels.
    """
    check_limits(min_pixels, max_pixels, max_image_pixels)
    prepared = prepare_image(image, min_pixels=min_pixels, max_pixels=max_pixels, max_image_pixels=max_image_pixels)
    width, height = prepared.size
    return PreprocessedImage(
        original_size=prepared.original_size,
        resized_size=prepared.size,
        grid=(1, height // PATCH_SIZE, width // PATCH_SIZE),
        pixel_values=_patchify(prepared.pixels),
        pixels=prepared.pixels,
    )
