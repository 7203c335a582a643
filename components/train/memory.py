"""A worker's training data held in memory at the training size, augmented in the worker.

With ``train.data_cache: memory`` each Ray Train worker reads its rows of the Parquet shards once
(every ``world``-th row of its split, decoded and resized to the training size by a thread pool in the
worker), keeps them as one uint8 array,
and from then on draws every epoch from memory: a full shuffle, the albumentations policy applied in a
background thread of the worker (on a small uint8 image it costs well under a millisecond), the batch
standardised there. On a small machine this removes what made the streamed path slow: decoding every
full-size PNG every epoch, and Ray Data's tasks and actors (split coordinators, the dataset manager)
competing with the training threads for the same cores: measured here, they took a fifth of 2 cores
even while the worker trained from memory. The shard files must be readable by every worker's node
(a shared volume), as for Ray Data's own reads of local paths.

``stream`` (the Ray Data pipeline every epoch) stays for data sets that do not fit in a worker's memory.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from components.augment.operator import AugmentOperator


@dataclass
class MemorySplit:
    """``images`` uint8 (N, H, W, C) at the training size and ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_files(cls, files: list[str], split: str | None, *, rank: int, world: int, image_size: int,
                   in_chans: int, max_pixels: int, threads: int = 2) -> "MemorySplit":
        """Read Parquet shards (``image`` bytes, ``label``, ``split``) directly, keep the rows of ``split``
        (all when None) that fall to ``rank`` (every ``world``-th), decode and resize them with
        ``threads`` threads (PIL and cv2 release the GIL). No Ray Data actors stay behind to poll."""
        import pyarrow.parquet as pq
        from concurrent.futures import ThreadPoolExecutor

        frames = [pq.read_table(f, columns=["image", "label", "split"]).to_pandas() for f in files]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image", "label", "split"])
        if split is not None:
            frame = frame[frame["split"] == split]
        frame = frame.iloc[rank::world]
        decode = AugmentOperator(None, "uint8", image_size, in_chans, max_pixels=max_pixels)
        chunks = [frame.iloc[i:i + 64] for i in range(0, len(frame), 64)]
        with ThreadPoolExecutor(max(1, threads)) as pool:
            parts = list(pool.map(lambda c: decode({"image": c["image"].to_numpy(), "label": c["label"].to_numpy()}),
                                  chunks))
        if not parts:
            return cls(np.zeros((0, image_size, image_size, in_chans), np.uint8), np.zeros(0, np.int64))
        return cls(np.concatenate([p["image"] for p in parts]), np.concatenate([p["label"] for p in parts]))

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
