"""Image decoding, validation and the one conversion every image goes through.

Every provider receives images prepared by ``to_rgb``: EXIF orientation
applied, mode converted to 8-bit RGB, and 16-bit or float images rescaled to
their own range rather than clipped. The local provider's server decodes with
the same function, so training and serving see identical pixels.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Extensions that are read as images. Anything else in a class folder is
# reported as junk and never sampled.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Operating-system and tool droppings that sit in image folders.
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", ".gitkeep", ".gitignore"})

# Conversion policy recorded in every manifest, so two runs can show that their
# images reached the providers the same way.
CONVERSION_POLICY = "exif-transpose;rgb8;16bit-rescaled-to-own-range;alpha-and-trns-on-white"


class ImageDecodeError(ValueError):
    """An image file cannot be decoded; the message names the file and the cause."""


@dataclass(frozen=True)
class ImageInfo:
    """Facts that scanning found about one decodable image file."""

    sha256: str
    width: int
    height: int
    mode: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_junk_name(path: Path) -> bool:
    """Return True for files that are clearly not dataset images."""
    name = path.name.lower()
    if name in JUNK_NAMES or name.startswith("._") or name.startswith("~"):
        return True
    return path.suffix.lower() not in IMAGE_EXTENSIONS


def inspect_image(data: bytes, label: str) -> ImageInfo:
    """Decode ``data`` fully and return its hash and size.

    ``label`` names the image in error messages (usually its path). Raises
    ``ImageDecodeError`` for empty, truncated, non-image and oversized files.
    """
    if not data:
        raise ImageDecodeError(f"{label}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns before it raises for images just under the bomb limit;
            # turn that into the same error so no oversized image is used.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                width, height, mode = image.width, image.height, image.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            f"{label}: the image is too large to decode safely ({exc}); resize it below "
            f"{Image.MAX_IMAGE_PIXELS} pixels"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{label}: not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{label}: the image is corrupt or truncated ({exc})") from exc
    return ImageInfo(sha256=sha256_bytes(data), width=width, height=height, mode=mode)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image to 8-bit RGB under ``CONVERSION_POLICY``."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: stretch their own min..max to 0..255, since
        # Pillow's own conversion clips everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array = np.rint((array - low) * scale).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def decode_rgb(data: bytes, label: str = "image") -> Image.Image:
    """Decode ``data`` and convert it with ``to_rgb``; raises ``ImageDecodeError``."""
    if not data:
        raise ImageDecodeError(f"{label}: the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return to_rgb(image)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{label}: not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{label}: the image cannot be decoded ({exc})") from exc
