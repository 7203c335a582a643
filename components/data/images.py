"""Image decoding and encoding with the guards a service facing untrusted input needs."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# Default ceiling on decoded pixels (width * height); params.yaml `data.max_image_pixels`
# and `serve.max_image_pixels` override it per call.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An input could not be turned into an image; the message says why."""


def decode_image(data: bytes, in_chans: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to a uint8 HxWxC array with C == in_chans.

    Refuses empty input, non-images, truncated files and images whose pixel count exceeds
    ``max_pixels`` (decompression bombs) before the pixel data is decoded.
    """
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image has {w}x{h}={w * h} pixels, above the limit of {max_pixels}")
            img.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"not a readable image: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo + 1e-12) * 255.0).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    img = img.convert("L" if in_chans == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    return arr


def encode_png(arr: np.ndarray) -> bytes:
    """Encode a uint8 HxW or HxWxC (C in 1, 3) array as PNG bytes."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
