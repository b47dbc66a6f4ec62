"""Safe image decoding with Pillow plus size/aspect/format QA."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MediaRejected

__all__ = ["ImageQA", "decode_image"]


@dataclass(kw_only=True, slots=True)
class ImageQA:
    """Limits for accepting an image."""

    max_pixels: int = 40_000_000  # decompression-bomb guard, checked from the header before decoding
    min_side: int = 32
    max_aspect: float = 4.0
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode_image(data: bytes, qa: ImageQA) -> np.ndarray:
    """Decode to uint8 RGB [H, W, 3]; MediaRejected on bombs, corruption or failed QA."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt, (w, h) = img.format, img.size
            if w * h > qa.max_pixels:
                raise MediaRejected("too_many_pixels", f"{w}x{h} exceeds {qa.max_pixels} pixels")
            if fmt not in qa.formats:
                raise MediaRejected("unsupported_format", f"{fmt} not in {qa.formats}")
            img.load()
            rgb = np.asarray(img.convert("RGB"))
    except MediaRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaRejected("too_many_pixels", str(e)) from None
    except UnidentifiedImageError as e:
        raise MediaRejected("wrong_container", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt streams
        raise MediaRejected("corrupt", f"{type(e).__name__}: {e}") from None
    if min(w, h) < qa.min_side:
        raise MediaRejected("too_small", f"{w}x{h} below {qa.min_side} px")
    if max(w, h) / min(w, h) > qa.max_aspect:
        raise MediaRejected("bad_aspect", f"{w}x{h} aspect above {qa.max_aspect}")
    return rgb
