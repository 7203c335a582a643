"""Drift reference statistics of a model's training inputs (torch; the monitor itself is numpy: :mod:`.drift`).

The calibrate stage calls :func:`drift_reference` on the promoted cloud model with the training and
validation splits (validation transform, no augmentation) and writes the result next to the served
model (``models/serve/drift_reference.json``) and into the edge bundle. :class:`EmbeddingTap` is how the
Serve app's cloud tier reads the same embeddings at serving time.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from components.feedback.drift import build_reference, input_histograms


def penultimate(model):
    """The model's last ``nn.Linear`` (the classifier head); its input is the penultimate-layer embedding."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head: no embedding to watch")
    return linears[-1]


class EmbeddingTap:
    """A forward hook on the head that keeps the input of the calling thread's latest forward pass
    (``last``: ``[N, D]`` float32; per thread, so a health check's pass cannot replace a batch's)."""

    def __init__(self, model):
        self._local = threading.local()
        self._handle = penultimate(model).register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._local.value = inputs[0].detach().flatten(1).float().cpu().numpy()

    @property
    def last(self) -> np.ndarray | None:
        return getattr(self._local, "value", None)

    def remove(self) -> None:
        self._handle.remove()


def embed(model, batches: Iterable[dict], bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input histograms [N, bins], embeddings [N, D])`` of every image in ``batches`` (dicts with a
    float32 NCHW ``image`` tensor, as the pipeline's Ray Data batches)."""
    import torch

    tap, hists, embs = EmbeddingTap(model), [], []
    try:
        with torch.inference_mode():
            for b in batches:
                x = b["image"]
                model(x.contiguous(memory_format=torch.channels_last))
                hists.append(input_histograms(x.float().numpy(), bins))
                embs.append(tap.last)
    finally:
        tap.remove()
    return np.concatenate(hists), np.concatenate(embs)


def drift_reference(model, train_batches: Iterable[dict], val_batches: Iterable[dict], *, window: int,
                    components: int, bins: int = 32, seed: int = 0) -> dict:
    """Reference statistics of the training split, null levels from windows of the validation split."""
    model = model.eval()
    train_h, train_e = embed(model, train_batches, bins)
    val_h, val_e = embed(model, val_batches, bins)
    ref = build_reference(train_h, train_e, val_h, val_e, window=window, k=components, seed=seed)
    ref.update(train_images=int(len(train_h)), val_images=int(len(val_h)), embedding_dim=int(train_e.shape[1]))
    return ref
