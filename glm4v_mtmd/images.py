"""Image inputs and the reference preprocessing geometry.

``smart_resize`` reproduces ``transformers.models.glm4v.image_processing_glm4v.smart_resize``
(factor 28, two temporal frames, Python rounding, upscaling of small sides), and images are
stretched (not letterboxed) to that size with bicubic resampling, as ``Glm4vImageProcessor``
does. The engine then receives an image whose sides are multiples of 28 and never resizes it.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import IO, Any, Union

import numpy as np

from .errors import ImageError

#: Checkpoint defaults of Glm4vImageProcessor (they count both temporal frames).
DEFAULT_MIN_PIXELS = 12_544
DEFAULT_MAX_PIXELS = 9_633_792
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
MAX_ASPECT_RATIO = 200

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
) -> tuple[int, int]:
    """Target ``(height, width)`` of an image, as transformers' GLM4V ``smart_resize``.

    Raises:
        ImageError: a side is 0, or the aspect ratio exceeds 200.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image size {width}x{height}: both sides must be positive")
    if num_frames < temporal_factor:
        raise ImageError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        # Upscale so the short side is `factor` (transformers does this before rounding).
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image size {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
            f"exceeds the model's limit of {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
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


@dataclass(frozen=True)
class PreparedImage:
    """An RGB image at the size the model sees, plus its original size."""

    pixels: np.ndarray  # uint8 [height, width, 3], C-contiguous
    original_size: tuple[int, int]  # (width, height)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` after resizing."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"image '{os.fspath(image)}'"
    if isinstance(image, (bytes, bytearray)):
        return f"image bytes ({len(image)} bytes)"
    if isinstance(image, np.ndarray):
        return f"image array {image.shape} {image.dtype}"
    return f"image {type(image).__name__}"


def load_rgb(image: ImageInput) -> np.ndarray:
    """Any supported input as a uint8 ``[height, width, 3]`` RGB array.

    Accepts a path, bytes, a binary file object, a PIL image or a uint8 ndarray
    (HxW, HxWx3, HxWx4).
    """
    from PIL import Image, ImageOps

    what = _describe(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, what)
    try:
        if isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise ImageError(f"{what}: no such file")
            pil = Image.open(image)
        elif isinstance(image, (bytes, bytearray)):
            pil = Image.open(io.BytesIO(bytes(image)))
        elif hasattr(image, "read"):
            pil = Image.open(image)
        elif isinstance(image, Image.Image):
            pil = image
        else:
            raise ImageError(
                f"{what}: unsupported input; pass a path, bytes, a file object, a PIL image "
                "or a uint8 numpy array"
            )
        if pil is not image:
            # Files carry their orientation in EXIF; apply it as viewers do.
            pil = ImageOps.exif_transpose(pil)
        pil.load()
        return np.asarray(pil.convert("RGB"), dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise ImageError(f"{what}: cannot be decoded ({exc})") from exc


def _array_to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageError(f"{what}: arrays must be uint8 (got {arr.dtype})")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{what}: expected HxW, HxWx3 or HxWx4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{what}: image size {arr.shape[1]}x{arr.shape[0]}: both sides must be positive")
    return np.ascontiguousarray(arr)


def prepare_image(
    image: ImageInput, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreparedImage:
    """Load ``image`` and stretch it to the reference size (bicubic, no padding)."""
    from PIL import Image

    rgb = load_rgb(image)
    height, width = rgb.shape[:2]
    new_h, new_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (new_h, new_w) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)
    return PreparedImage(np.ascontiguousarray(rgb), (int(width), int(height)))
