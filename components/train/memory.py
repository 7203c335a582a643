"""A worker's training data held in memory at the training size, augmented in the worker.

With ``train.data_cache: memory`` each Ray Train worker reads its shard of the Ray Dataset once
(decoded and resized to the training size by Ray Data, not augmented), keeps it as one uint8 array,
and from then on draws every epoch from memory: a full shuffle, the albumentations policy applied in a
background thread of the worker (on a small uint8 image it costs well under a millisecond), the batch
standardised there. On a small machine this removes what made the streamed path slow: decoding every
full-size PNG every epoch, and Ray Data tasks competing with the training threads for the same cores.

``stream`` (the Ray Data pipeline every epoch) stays for data sets that do not fit in a worker's memory.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from components.augment.operator import AugmentOperator


@dataclass
class MemorySplit:
    """``images`` uint8 (N, H, W, C) at the training size and ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_shard(cls, shard, in_chans: int, batch_size: int = 256) -> "MemorySplit":
        """Read a Ray Data shard of ``image`` (uint8 HWC arrays) and ``label`` rows once."""
        images, labels = [], []
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            images.append(np.asarray(batch["image"], dtype=np.uint8))
            labels.append(np.asarray(batch["label"], dtype=np.int64))
        if not images:
            return cls(np.zeros((0, 1, 1, in_chans), np.uint8), np.zeros(0, np.int64))
        return cls(np.concatenate(images), np.concatenate(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split standardised (no augmentation), for evaluation."""
        return torch.from_numpy(standardise(self.images)), torch.from_numpy(self.labels)

    def batches(self, order: np.ndarray, batch_size: int, operator: AugmentOperator | None, prefetch: int = 2):
        """Batches ``{"image": float NCHW, "label"}`` of the rows in ``order``; with ``operator`` each
        image goes through its policy. Batches are made ``prefetch`` ahead in a background thread
        (cv2 and numpy release the GIL), so augmentation overlaps the training step."""
        def make(idx: np.ndarray) -> dict:
            imgs = self.images[idx]
            if operator is not None and operator.policy is not None:
                imgs = np.stack([operator._augment(im) for im in imgs])
            return {"image": torch.from_numpy(standardise(imgs)), "label": torch.from_numpy(self.labels[idx])}

        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if prefetch <= 0:
            yield from (make(c) for c in chunks)
            return
        out: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()

        def producer() -> None:
            try:
                for c in chunks:
                    if stop.is_set():
                        return
                    out.put(make(c))
            except BaseException as exc:  # surfaced in the consumer, never swallowed
                out.put(exc)
                return
            out.put(None)

        thread = threading.Thread(target=producer, daemon=True, name="resops-batches")
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def standardise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), the same scaling as the streamed path."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 63.75


def epoch_order(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``n`` rows cut to ``steps`` batches. ``steps`` is the smallest
    ``ceil(n / batch_size)`` over the DDP ranks, so every rank runs the same number of steps."""
    return np.random.default_rng(seed).permutation(n)[: steps * batch_size]
