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


def save_class_grid(frame, class_names: list[str], out_path, *, title: str = "", per_class: int = 8,
                    cell: int = 64, in_chans: int = 1, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A PNG for a person to look at: one row per class of ``per_class`` images drawn at random from
    ``frame`` (``image`` bytes, ``label``), the class name on the left, ``title`` on top."""
    from PIL import ImageDraw

    k, pad, label_w, head = len(class_names), 4, 140, 20
    canvas = Image.new("RGB", (label_w + per_class * (cell + pad) + pad, head + k * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=(0, 0, 0))
    rng = np.random.default_rng(seed)
    images, labels = frame["image"].to_numpy(), frame["label"].to_numpy()
    for c, name in enumerate(class_names):
        y = head + c * (cell + pad)
        pool = np.flatnonzero(labels == c)
        draw.text((pad, y + cell // 2 - 6), f"{str(name)[:16]} ({len(pool)})", fill=(0, 0, 0))
        for j, i in enumerate(rng.choice(pool, size=min(per_class, len(pool)), replace=False) if len(pool) else []):
            img = decode_image(images[i], in_chans, max_pixels)
            tile = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).convert("RGB")
            canvas.paste(tile.resize((cell, cell), Image.Resampling.LANCZOS), (label_w + j * (cell + pad), y))
    return save_picture(canvas, out_path)


def save_picture(image: Image.Image, out_path):
    """A drawn picture (a Pillow image) as a PNG file at ``out_path``, its directory made; returns the path."""
    from pathlib import Path

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out
