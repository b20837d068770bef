"""Tests of imgbench.images on a corpus of bad and unusual image files.

Every file is generated with Pillow and numpy in ``tmp_path``, so each test
shows exactly which bytes it feeds to the decoder.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgbench.images import ImageDecodeError, decode_rgb, inspect_image, is_junk_name, to_rgb

EXIF_ORIENTATION_TAG = 0x0112
# Orientation 6: the stored pixels must be rotated 90 degrees clockwise to display.
ROTATE_90_CLOCKWISE = 6


def encode(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_options)
    return buffer.getvalue()


def write_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture
def noise_image() -> Image.Image:
    """A 48x64 (width x height) RGB image of seeded noise, so it compresses poorly."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def bad_files(tmp_path: Path, noise_image: Image.Image) -> dict[str, Path]:
    """Files that ``inspect_image`` must reject, by case name."""
    jpeg = encode(noise_image, "JPEG", quality=90)
    png = encode(noise_image, "PNG")
    return {
        "truncated_jpeg": write_file(tmp_path, "truncated.jpg", jpeg[: len(jpeg) // 2]),
        "truncated_png": write_file(tmp_path, "truncated.png", png[: len(png) // 2]),
        "zero_bytes": write_file(tmp_path, "empty.jpg", b""),
        "text_as_jpeg": write_file(tmp_path, "notes.jpg", b"these are notes, not an image\n"),
        "header_only_jpeg": write_file(tmp_path, "header.jpg", jpeg[:20]),
    }


# The parameter is not called ``case`` because the imgbench pytest plugin
# parametrizes every test that takes a ``case`` argument over the benchmark matrix.
@pytest.mark.parametrize(
    "bad_case", ["truncated_jpeg", "truncated_png", "zero_bytes", "text_as_jpeg", "header_only_jpeg"]
)
def test_inspect_rejects_bad_file(bad_files: dict[str, Path], bad_case: str) -> None:
    path = bad_files[bad_case]

    with pytest.raises(ImageDecodeError) as excinfo:
        inspect_image(path.read_bytes(), str(path))

    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "bad_case", ["truncated_jpeg", "truncated_png", "zero_bytes", "text_as_jpeg", "header_only_jpeg"]
)
def test_decode_rgb_rejects_bad_file(bad_files: dict[str, Path], bad_case: str) -> None:
    path = bad_files[bad_case]

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_rgb(path.read_bytes(), str(path))

    assert str(path) in str(excinfo.value)


def test_inspect_empty_file_message() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        inspect_image(b"", "train/a/empty.jpg")


def test_inspect_truncated_says_truncated(bad_files: dict[str, Path]) -> None:
    path = bad_files["truncated_jpeg"]

    with pytest.raises(ImageDecodeError, match="truncated"):
        inspect_image(path.read_bytes(), str(path))


def test_decode_error_is_value_error() -> None:
    # Callers that only know the standard library can catch ValueError.
    assert issubclass(ImageDecodeError, ValueError)


def test_inspect_valid_jpeg(noise_image: Image.Image) -> None:
    data = encode(noise_image, "JPEG")

    info = inspect_image(data, "noise.jpg")

    assert info.width == 48
    assert info.height == 64
    assert info.mode == "RGB"
    assert len(info.sha256) == 64


def test_inspect_hash_depends_on_bytes(noise_image: Image.Image) -> None:
    first = inspect_image(encode(noise_image, "JPEG", quality=90), "a.jpg")
    again = inspect_image(encode(noise_image, "JPEG", quality=90), "b.jpg")
    other = inspect_image(encode(noise_image, "JPEG", quality=50), "c.jpg")

    assert first.sha256 == again.sha256
    assert first.sha256 != other.sha256


def test_cmyk_jpeg_decodes_as_rgb(noise_image: Image.Image) -> None:
    data = encode(noise_image.convert("CMYK"), "JPEG")

    info = inspect_image(data, "cmyk.jpg")
    decoded = decode_rgb(data, "cmyk.jpg")

    assert info.mode == "CMYK"
    assert decoded.mode == "RGB"
    assert decoded.size == (48, 64)


def test_palette_transparency_becomes_white() -> None:
    # Palette index 0 is opaque red, index 1 is blue marked fully transparent
    # through the PNG tRNS chunk. The left half of the image uses index 1.
    palette_image = Image.new("P", (10, 10), 0)
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette_image.paste(1, (0, 0, 5, 10))
    data = encode(palette_image, "PNG", transparency=1)

    decoded = decode_rgb(data, "palette.png")

    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((4, 9)) == (255, 255, 255)
    assert decoded.getpixel((9, 9)) == (255, 0, 0)


def test_rgba_transparency_becomes_white() -> None:
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 1] = 255  # green
    pixels[:, :2, 3] = 0  # left half fully transparent
    pixels[:, 2:, 3] = 255  # right half opaque
    data = encode(Image.fromarray(pixels, mode="RGBA"), "PNG")

    decoded = decode_rgb(data, "rgba.png")

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((3, 3)) == (0, 255, 0)


def test_grayscale_transparency_becomes_white() -> None:
    # Gray level 0 is marked transparent through the tRNS chunk.
    gray = Image.new("L", (4, 4), 0)
    gray.paste(200, (2, 0, 4, 4))
    data = encode(gray, "PNG", transparency=0)

    decoded = decode_rgb(data, "gray-trns.png")

    assert decoded.getpixel((3, 3)) == (200, 200, 200)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_rgb_transparency_becomes_white() -> None:
    # The colour (0, 0, 0) is marked transparent through the tRNS chunk.
    rgb = Image.new("RGB", (4, 4), (0, 0, 0))
    rgb.paste((0, 0, 200), (2, 0, 4, 4))
    data = encode(rgb, "PNG", transparency=(0, 0, 0))

    decoded = decode_rgb(data, "rgb-trns.png")

    assert decoded.getpixel((3, 3)) == (0, 0, 200)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_16bit_png_rescaled_not_clipped() -> None:
    # Values 0..3999 in a 16-bit PNG: a plain conversion would clip every
    # value above 255 to white, so most of the image would be 255.
    values = np.arange(4000, dtype=np.uint16).reshape(40, 100)
    data = encode(Image.fromarray(values), "PNG")

    opened = Image.open(io.BytesIO(data))
    pixels = np.asarray(to_rgb(opened))

    assert opened.mode.startswith("I")
    assert pixels.shape == (40, 100, 3)
    assert pixels.min() == 0
    assert pixels.max() == 255
    assert len(np.unique(pixels[..., 0])) == 256
    assert np.mean(pixels[..., 0] == 255) < 0.01
    assert abs(int(pixels[20, 0, 0]) - round(2000 * 255 / 3999)) <= 1


def test_16bit_png_keeps_order() -> None:
    values = np.arange(4000, dtype=np.uint16).reshape(40, 100)
    data = encode(Image.fromarray(values), "PNG")

    gray = np.asarray(decode_rgb(data, "gray16.png"))[..., 0].ravel()

    assert np.all(np.diff(gray.astype(int)) >= 0)


def test_16bit_constant_image_decodes() -> None:
    values = np.full((8, 8), 1234, dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")

    decoded = decode_rgb(data, "flat16.png")

    assert decoded.mode == "RGB"
    assert decoded.size == (8, 8)


def test_exif_rotation_swaps_size(noise_image: Image.Image) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CLOCKWISE
    data = encode(noise_image, "JPEG", exif=exif.tobytes())

    stored = inspect_image(data, "rotated.jpg")
    rotated = to_rgb(Image.open(io.BytesIO(data)))

    assert (stored.width, stored.height) == (48, 64)
    assert rotated.size == (64, 48)
    assert rotated.mode == "RGB"


def test_exif_rotation_in_decode_rgb(noise_image: Image.Image) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CLOCKWISE
    data = encode(noise_image, "JPEG", exif=exif.tobytes())

    assert decode_rgb(data, "rotated.jpg").size == (64, 48)


def test_exif_rotation_moves_pixels() -> None:
    # A red top-left pixel of the stored image ends up top-right once rotated
    # 90 degrees clockwise. PNG keeps the pixels exact.
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_90_CLOCKWISE
    data = encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())

    rotated = decode_rgb(data, "rotated.png")

    assert rotated.size == (4, 6)
    assert rotated.getpixel((3, 0)) == (255, 0, 0)


@pytest.fixture
def small_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """Lower Pillow's decompression-bomb limit to 1000 pixels for one test.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that.
    """
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    return 1000


@pytest.mark.parametrize("width", [1500, 2500], ids=["warning-zone", "error-zone"])
def test_inspect_rejects_decompression_bomb(small_bomb_limit: int, width: int) -> None:
    data = encode(Image.new("RGB", (width, 1)), "PNG")

    with pytest.raises(ImageDecodeError) as excinfo:
        inspect_image(data, "huge.png")

    assert "huge.png" in str(excinfo.value)
    assert "too large" in str(excinfo.value)
    assert str(small_bomb_limit) in str(excinfo.value)


def test_decode_rgb_rejects_large_bomb(small_bomb_limit: int) -> None:
    data = encode(Image.new("RGB", (2500, 1)), "PNG")

    with pytest.raises(ImageDecodeError) as excinfo:
        decode_rgb(data, "huge.png")

    assert "huge.png" in str(excinfo.value)


def test_decode_rgb_rejects_small_bomb(small_bomb_limit: int) -> None:
    # Between the limit and twice the limit Pillow only warns. decode_rgb must
    # reject the image even when the caller ignores that warning.
    data = encode(Image.new("RGB", (1500, 1)), "PNG")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError):
            decode_rgb(data, "huge.png")


def test_inspect_accepts_image_under_limit(small_bomb_limit: int) -> None:
    data = encode(Image.new("RGB", (500, 1)), "PNG")

    assert inspect_image(data, "small.png").width == 500


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "I", "F", "1"])
def test_to_rgb_gives_rgb(mode: str) -> None:
    image = Image.new(mode, (5, 3))

    converted = to_rgb(image)

    assert converted.mode == "RGB"
    assert converted.size == (5, 3)


@pytest.mark.parametrize(
    "name", [".DS_Store", "Thumbs.db", "thumbs.db", "._foo.jpg", "notes.txt", "desktop.ini", "~lock.jpg"]
)
def test_junk_names_detected(name: str) -> None:
    assert is_junk_name(Path("train") / "cat" / name)


@pytest.mark.parametrize("name", ["a.JPG", "b.jpeg", "c.png", "d.webp", "e.TIFF"])
def test_image_names_not_junk(name: str) -> None:
    assert not is_junk_name(Path("train") / "cat" / name)
