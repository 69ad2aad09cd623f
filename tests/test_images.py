"""Image preprocessing equals transformers' Glm4vImageProcessorPil, and the engine sees exactly that image.

Bound on pixel values: exact equality. Both sides convert with the same Pillow calls and resize the same uint8
image with Pillow's BICUBIC (transformers' `image_transforms.resize` does not resize in float), then rescale in
float64 and normalise in float32 the same way, so nothing is left to differ (the issue allows 1/255).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import reference
import tiny_models
import tolerances
from conftest import ARCHS, random_image, rel_l2
from PIL import Image

from glm4v_mtmd import ConfigError, ImageError, Session, preprocess


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The PIL image processor with the real checkpoints' preprocessor_config.json."""
    out = tmp_path_factory.mktemp("preprocessor")
    tiny_models.write_preprocessor_config(out)
    return reference.load_image_processor(out)


def _pil(mode: str, h: int = 90, w: int = 130, seed: int = 0) -> Image.Image:
    return Image.fromarray(random_image(h, w, seed)).convert(mode)


def _rgba(h: int = 90, w: int = 130) -> np.ndarray:
    alpha = np.linspace(0, 255, h * w).reshape(h, w, 1).astype(np.uint8)
    return np.concatenate([random_image(h, w, seed=5), alpha], axis=2)


def _gray16() -> Image.Image:
    """Mode I;16 with values up to 765: Pillow's convert("RGB") clips them at 255, and so must we."""
    return Image.fromarray(random_image(90, 130)[:, :, 0].astype(np.uint16) * 3)


def _palette_with_transparency() -> Image.Image:
    pil = _pil("RGB").quantize(16)
    pil.info["transparency"] = 3
    return pil


def _file(pil: Image.Image, fmt: str, **save: Any) -> Callable[[Any], tuple[Any, Any]]:
    """Case maker: the image saved as `fmt`; we get the path, transformers gets the path (load_image)."""

    def make(tmp_path: Any) -> tuple[Any, Any]:
        path = tmp_path / f"image.{fmt.lower()}"
        pil.save(path, fmt, **save)
        return path, str(path)

    return make


def _photo_120x80() -> Image.Image:
    return Image.fromarray(random_image(80, 120, seed=7))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _same(image: Any) -> Callable[[Any], tuple[Any, Any]]:
    return lambda _tmp: (image, image)


def _array_vs_pil(h: int, w: int, seed: int = 0) -> Callable[[Any], tuple[Any, Any]]:
    """Case maker: we get the array, transformers the PIL image (built when the test runs: some are 24 Mpx)."""

    def make(_tmp: Any) -> tuple[Any, Any]:
        arr = random_image(h, w, seed)
        return arr, Image.fromarray(arr)

    return make


def _bytes_of(make: Callable[[Any], tuple[Any, Any]]) -> Callable[[Any], tuple[Any, Any]]:
    def wrapped(tmp_path: Any) -> tuple[Any, Any]:
        path, ref = make(tmp_path)
        return path.read_bytes(), ref

    return wrapped


def _file_object_of(make: Callable[[Any], tuple[Any, Any]]) -> Callable[[Any], tuple[Any, Any]]:
    def wrapped(tmp_path: Any) -> tuple[Any, Any]:
        path, ref = make(tmp_path)
        return io.BytesIO(path.read_bytes()), ref

    return wrapped


REF_SIZE = tiny_models.PREPROCESSOR_CONFIG["size"]
SMALL_MIN = {"min_pixels": 1568}  # one token: lets smart_resize's rounding show without the min_pixels upscale
SMALL_MAX = {"max_pixels": 1568 * 64}

# (our input, reference input) makers, our keyword arguments; sizes are W x H as in the issue.
CASES = [
    pytest.param(_array_vs_pil(2, 2), {}, id="2x2-smallest-accepted-upscaled-like-reference"),
    pytest.param(_array_vs_pil(3, 2), {}, id="2x3-upscaled-like-reference"),
    pytest.param(_array_vs_pil(900, 27), {}, id="27x900-small-side-upscaled"),
    pytest.param(_array_vs_pil(28, 28), {}, id="28x28-below-min-pixels"),
    pytest.param(_array_vs_pil(57, 55), {}, id="55x57"),
    pytest.param(_array_vs_pil(70, 70), {}, id="70x70"),
    pytest.param(_array_vs_pil(70, 70), SMALL_MIN, id="70x70-rounds-half-to-even-56"),
    pytest.param(_array_vs_pil(70, 182), {}, id="182x70-rounds-half-to-even"),
    pytest.param(_array_vs_pil(84, 56), {}, id="56x84-llama.cpp-letterbox-case"),
    pytest.param(_array_vs_pil(4000, 224), {}, id="224x4000"),
    pytest.param(_array_vs_pil(28, 5600), {}, id="5600x28-aspect-200"),
    pytest.param(_array_vs_pil(2000, 3000), {}, id="3000x2000-above-max-pixels"),
    pytest.param(_array_vs_pil(4000, 6000), {}, id="6000x4000"),
    pytest.param(_array_vs_pil(6000, 4000), {}, id="4000x6000"),
    pytest.param(_array_vs_pil(1200, 1600), SMALL_MAX, id="1600x1200-per-image-max-pixels-downscale-5x"),
    pytest.param(_same(_pil("L")), {}, id="mode-L"),
    pytest.param(_same(_pil("LA")), {}, id="mode-LA"),
    pytest.param(_same(_pil("P")), {}, id="mode-P"),
    pytest.param(_same(_palette_with_transparency()), {}, id="mode-P-transparency"),
    pytest.param(_same(Image.fromarray(_rgba())), {}, id="mode-RGBA-composited-on-white"),
    pytest.param(_same(_rgba()), {}, id="array-HxWx4-blended-on-white"),
    pytest.param(lambda _t: (random_image(90, 130)[:, :, 0], random_image(90, 130)[:, :, :1]), {}, id="array-HxW"),
    pytest.param(_same(_pil("CMYK")), {}, id="mode-CMYK"),
    pytest.param(_same(_pil("1")), {}, id="mode-1"),
    pytest.param(_same(_gray16()), {}, id="mode-I;16"),
    pytest.param(_same(_pil("I")), {}, id="mode-I"),
    pytest.param(_same(_pil("F")), {}, id="mode-F"),
    pytest.param(_file(_photo_120x80(), "JPEG", exif=_exif(6)), {}, id="jpeg-exif-rotated-path"),
    pytest.param(_bytes_of(_file(_photo_120x80(), "JPEG", exif=_exif(3))), {}, id="jpeg-exif-rotated-bytes"),
    pytest.param(_file_object_of(_file(_pil("CMYK"), "JPEG")), {}, id="jpeg-cmyk-file-object"),
    pytest.param(_file(Image.fromarray(_rgba()), "PNG"), {}, id="png-rgba-path-alpha-dropped"),
    pytest.param(_file(_palette_with_transparency(), "PNG"), {}, id="png-palette-transparency-path"),
    pytest.param(_file(_gray16(), "PNG"), {}, id="png-16-bit-path"),
    pytest.param(_file(_pil("L"), "JPEG"), {}, id="jpeg-grayscale-path"),
]


@pytest.mark.parametrize("make, kwargs", CASES)
def test_preprocess_equals_glm4v_image_processor(make, kwargs, processor, tmp_path):
    ours_input, ref_input = make(tmp_path)
    ours = preprocess(ours_input, **kwargs)
    size = {"shortest_edge": kwargs.get("min_pixels", REF_SIZE["shortest_edge"]),
            "longest_edge": kwargs.get("max_pixels", REF_SIZE["longest_edge"])}
    ref = processor(images=[ref_input], size=size, return_tensors="np")
    assert ours.grid == tuple(int(v) for v in ref["image_grid_thw"][0])
    assert ours.resized_size == (ours.grid[2] * 14, ours.grid[1] * 14)
    np.testing.assert_array_equal(ours.pixel_values, ref["pixel_values"])


def test_exif_orientation_is_applied_to_files(tmp_path):
    path = tmp_path / "rotated.jpg"
    _photo_120x80().save(path, "JPEG", exif=_exif(6))  # stored 120x80, shown rotated by 90 degrees
    assert preprocess(path).original_size == (80, 120)


def test_pil_images_are_taken_as_given_without_exif_transpose(tmp_path):
    path = tmp_path / "rotated.jpg"
    _photo_120x80().save(path, "JPEG", exif=_exif(6))
    with Image.open(path) as pil:
        assert preprocess(pil).original_size == (120, 80)


def test_rgba_array_is_composited_on_white_not_dropped():
    transparent = np.zeros((56, 56, 4), dtype=np.uint8)
    assert (preprocess(transparent).pixels == 255).all()


def test_every_input_kind_gives_the_same_pixels(tmp_path):
    arr = random_image(70, 100, seed=3)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    expected = preprocess(arr).pixels
    for image in (str(path), path, path.read_bytes(), bytearray(path.read_bytes()), io.BytesIO(path.read_bytes()),
                  Image.fromarray(arr), np.concatenate([arr, np.full((70, 100, 1), 255, np.uint8)], axis=2)):
        np.testing.assert_array_equal(preprocess(image).pixels, expected)


def test_resized_pixels_are_what_the_patches_hold():
    out = preprocess(random_image(60, 90, seed=4))
    first = out.pixel_values[0].reshape(3, 2, 14, 14)[:, 0]  # first patch, first frame: top-left 14x14
    mean = np.array([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    np.testing.assert_allclose(first * std + mean, np.moveaxis(out.pixels[:14, :14], -1, 0) / 255, atol=1e-6)


# ----------------------------------------------------------------------------- bad input


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))


def _png_bytes(h: int = 84, w: int = 84) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image(h, w)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_image(84, 84)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "image, kwargs, rule",
    [
        (np.zeros((0, 10, 3), dtype=np.uint8), {}, "both sides must be positive"),
        (np.zeros((1, 1, 3), dtype=np.uint8), {}, "1x1: each side must be at least 2 pixels"),
        (png_header_only(1, 1), {}, "1x1: each side must be at least 2 pixels"),
        (np.zeros((300, 1, 3), dtype=np.uint8), {}, "1x300: each side must be at least 2 pixels"),
        (np.zeros((2, 402, 3), dtype=np.uint8), {}, "aspect ratio 201.0, above the model's limit of 200"),
        (np.zeros((100, 100, 3), dtype=np.uint8), {"max_image_pixels": 9999}, "above max_image_pixels=9999"),
        (png_header_only(9000, 9000), {"max_image_pixels": 50_000_000}, "above max_image_pixels=50000000"),
        (png_header_only(20000, 20000), {"max_image_pixels": 10**9}, "Image.MAX_IMAGE_PIXELS"),
        (_png_bytes()[:300], {}, "cannot be decoded"),
        (_jpeg_bytes()[:400], {}, "cannot be decoded"),
        (b"definitely not an image", {}, "cannot be decoded"),
        (np.zeros((10, 10, 3), dtype=np.uint16), {}, "must be uint8"),
        (np.zeros((3, 40, 50), dtype=np.uint8), {}, "channels-last"),
        (12345, {}, "unsupported input"),
    ],
    ids=["zero-side", "1x1-array", "1x1-png", "1x300-array",
         "aspect-201", "over-max-image-pixels", "bomb-header-checked-before-decoding",
         "over-pillow-limit", "truncated-png", "truncated-jpeg", "not-an-image", "uint16-array", "channels-first",
         "unsupported-type"],
)
def test_bad_image_raises_image_error_naming_image_and_rule(image, kwargs, rule):
    with pytest.raises(ImageError, match=rule) as info:
        preprocess(image, **kwargs)
    assert str(info.value).startswith("image")  # names the image: its path, bytes, array or type


def test_error_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(_png_bytes()[:300])
    with pytest.raises(ImageError, match="broken.png"):
        preprocess(path)


@pytest.mark.parametrize("kwargs", [{"min_pixels": 0}, {"max_pixels": -1}, {"max_image_pixels": 1.5},
                                    {"min_pixels": 20000, "max_pixels": 15000}])
def test_invalid_limits_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        preprocess(random_image(56, 56), **kwargs)


# ----------------------------------------------------------------------------- through the Session


@pytest.fixture(scope="module")
def session_for(gguf_pair: Callable[..., Any]) -> Any:
    """``session_for(arch)``: an exact-mode Session (F32 GGUFs, F32 KV cache, no flash attention)."""
    opened: list[Session] = []

    @functools.cache
    def open_session(arch: str) -> Session:
        s = Session(*gguf_pair(arch, 0, "f32"), n_ctx=256, n_threads=2, kv_cache_type="f32", flash_attn=False)
        opened.append(s)
        return s

    yield open_session
    for s in opened:
        s.close()


# Not multiples of 28: each is resized before the engine sees it. (height, width) for random_image.
E2E_IMAGES = {
    "56x84-letterboxed-by-llama.cpp": random_image(84, 56, seed=11),
    "182x70-round-half-even": random_image(70, 182, seed=12),
    "300x27-small-side-upscaled": random_image(27, 300, seed=13),
    "131x97": random_image(97, 131, seed=14),
    "45x45-below-min-pixels": random_image(45, 45, seed=15),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", E2E_IMAGES)
def test_resized_image_embedding_matches_get_image_features(arch, name, session_for, reference_model, processor):
    image = E2E_IMAGES[name]
    emb = session_for(arch).encode_image(image)
    expected = reference.reference_image_features(reference_model(arch), image, f16_conv=True,
                                                  image_processor=processor)
    ours = preprocess(image)
    assert emb.original_size == (image.shape[1], image.shape[0])
    assert emb.resized_size == ours.resized_size != emb.original_size
    assert emb.grid == (ours.grid[1] // 2, ours.grid[2] // 2)
    assert emb.array.shape == expected.shape
    rel = rel_l2(emb.array, expected)
    assert rel <= tolerances.EMBED_REL_L2, f"relative L2 error {rel:.2e}"


def test_per_image_limits_override_the_session(session_for):
    session = session_for("glm4v")
    image = random_image(280, 280, seed=2)
    assert session.encode_image(image).n_tokens == 100
    assert session.encode_image(image, max_pixels=16 * 1568).n_tokens == 16


def test_session_limits_apply_to_every_image(gguf_pair):
    with Session(*gguf_pair("glm4v", 0, "f32"), n_ctx=128, n_threads=1, max_pixels=16 * 1568) as s:
        assert s.encode_image(random_image(280, 280, seed=2)).resized_size == (112, 112)


def test_session_max_image_pixels_rejects_large_images_and_session_survives(gguf_pair):
    with Session(*gguf_pair("glm4v", 0, "f32"), n_ctx=128, n_threads=1, max_image_pixels=100_000) as s:
        with pytest.raises(ImageError, match="max_image_pixels=100000"):
            s.encode_image(random_image(400, 300))
        assert s.encode_image(random_image(300, 300)).n_tokens == 121
        assert s.encode_image(random_image(400, 300), max_image_pixels=200_000).n_tokens > 0


# The engine's window is 1 .. 30,000 tokens (as wide as a video frame pair can be); 1 token = 1,568 pixels.
@pytest.mark.parametrize("kwargs", [{"max_pixels": 30001 * 1568}, {"min_pixels": 1567, "max_pixels": 1568 * 8},
                                    {"max_image_pixels": 0}])
def test_limits_outside_the_engine_window_are_rejected(gguf_pair, kwargs):
    with pytest.raises(ConfigError):
        Session(*gguf_pair("glm4v", 0, "f32"), n_ctx=128, n_threads=1, **kwargs)

