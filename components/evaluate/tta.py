"""Test-time augmentation: average the class probabilities over label-preserving views of a batch.

``evaluate.tta``: ``none``; ``flips`` (identity, horizontal, vertical, both: 4 views); ``dihedral``
(the 8 rotations by 90 degrees and their mirror images: the symmetries of a square cell). Views
are exact pixel permutations, so they need no interpolation; inputs are square NCHW batches.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

TTA_MODES = ("none", "flips", "dihedral")


def views(x, mode: str) -> list:
    """The views of a batch ``x`` (a torch tensor or numpy array, N x C x H x W)."""
    if mode not in TTA_MODES:
        raise ValueError(f"evaluate.tta must be one of {TTA_MODES}, got {mode!r}")
    lib = torch if isinstance(x, torch.Tensor) else np
    flip = (lambda a, dims: torch.flip(a, dims)) if lib is torch else (lambda a, dims: np.flip(a, dims).copy())
    rot = (lambda a, k: torch.rot90(a, k, (2, 3))) if lib is torch else (lambda a, k: np.rot90(a, k, (2, 3)).copy())
    if mode == "none":
        return [x]
    if mode == "flips":
        return [x, flip(x, (3,)), flip(x, (2,)), flip(x, (2, 3))]
    mirrored = flip(x, (3,))
    return [rot(x, k) for k in range(4)] + [rot(mirrored, k) for k in range(4)]


def tta_proba(predict: Callable, x, mode: str):
    """Mean of ``predict(view)`` (class probabilities, N x K) over the views of ``x``."""
    outs = [predict(v) for v in views(x, mode)]
    return sum(outs[1:], outs[0]) / len(outs)
