"""The Ray Data operator that applies an augmentation policy to batches of encoded images.

One class serves both uses:
* offline (the ``augment`` stage): ``output="png"`` writes augmented, re-encoded copies;
* online (inside training): ``output="tensor"`` decodes, augments, resizes and normalises
  to float32 CHW arrays ready for the model;
* cached training (``train.data_cache: memory``): ``output="uint8"`` decodes and resizes to the
  training size only (HWC uint8); the worker keeps the rows and augments them itself.
"""
from __future__ import annotations

import os
import zlib

import cv2
import numpy as np

from components.augment.policies import build_policy, seed_policy
from components.augment.resize import area_resize, normalise, shrink_to
from components.data.images import DEFAULT_MAX_PIXELS, decode_image, encode_png


class AugmentOperator:
    """Callable for ``Dataset.map_batches(AugmentOperator, fn_constructor_kwargs=...)`` or direct use.

    Batches are dicts of numpy arrays (``batch_format="numpy"``) with at least ``image``
    (encoded bytes) and ``label``.
    """

    def __init__(self, policy: str | None = None, output: str = "tensor", image_size: int | None = None,
                 in_chans: int = 1, copies: int = 1, seed: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if output not in ("tensor", "png", "uint8"):
            raise ValueError("output must be 'tensor', 'png' or 'uint8'")
        if output in ("tensor", "uint8") and not image_size:
            raise ValueError(f"output={output!r} needs image_size")
        # Each Ray worker process gets its own stream: seed + pid keeps runs varied across workers,
        # while an explicit seed in a single process stays reproducible.
        self.seed = seed
        self.policy = build_policy(policy, seed=None if seed is None else seed + os.getpid() % 10_000)
        self.output, self.image_size, self.in_chans = output, image_size, in_chans
        self.copies, self.max_pixels = copies, max_pixels
        cv2.setNumThreads(1)

    def _augment(self, img: np.ndarray) -> np.ndarray:
        if self.policy is None:
            return img
        out = self.policy(image=img)["image"]
        return out if out.ndim == 3 else out[:, :, None]

    def _resize(self, img: np.ndarray) -> np.ndarray:
        return area_resize(img, self.image_size)

    def _to_tensor(self, img: np.ndarray) -> np.ndarray:
        return normalise(self._resize(img))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [decode_image(b, self.in_chans, self.max_pixels) for b in batch["image"]]
        if self.output == "uint8":
            return {"image": np.stack([self._resize(self._augment(im)) for im in images]),
                    "label": np.asarray(batch["label"], dtype=np.int64)}
        if self.output == "tensor":
            if self.image_size:  # shrink before augmenting: cheaper and the same distribution
                images = [self._resize_pre(im) for im in images]
            out = {"image": np.stack([self._to_tensor(self._augment(im)) for im in images]),
                   "label": np.asarray(batch["label"], dtype=np.int64)}
            return out
        rows = {k: [] for k in batch}
        for c in range(self.copies):
            for i, im in enumerate(images):
                for k in batch:
                    rows[k].append(batch[k][i])
                if self.policy is not None and self.seed is not None:
                    # Offline copies are reproducible whichever Ray worker makes them: seed per row.
                    key = f"{batch['path'][i] if 'path' in batch else i}#{c}".encode()
                    seed_policy(self.policy, (self.seed * 1_000_003 + zlib.crc32(key)) % 2**32)
                rows["image"][-1] = encode_png(self._augment(im))
                if "source" in rows:
                    rows["source"][-1] = "augment"
                if "path" in rows:
                    rows["path"][-1] = f"{batch['path'][i]}#aug{c}"
        return {k: np.asarray(v, dtype=object if k in ("image", "path", "source") else None) for k, v in rows.items()}

    def _resize_pre(self, img: np.ndarray) -> np.ndarray:
        # Augment at 2x the target size (rotation/blur look right), then the final resize in _to_tensor.
        return shrink_to(img, 2 * self.image_size)
