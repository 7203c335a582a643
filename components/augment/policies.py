"""Named albumentations policies. Add a policy by decorating a builder with @register_policy."""
from __future__ import annotations

import random
from typing import Callable

import albumentations as A
import cv2
import numpy as np

_POLICIES: dict[str, Callable[[], A.Compose]] = {}


def register_policy(fn: Callable[[], A.Compose]) -> Callable[[], A.Compose]:
    _POLICIES[fn.__name__] = fn
    return fn


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def build_policy(name: str | None, seed: int | None = None) -> A.Compose | None:
    """The albumentations pipeline called ``name`` (None or "none" -> no augmentation)."""
    if name in (None, "none"):
        return None
    try:
        builder = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown augmentation policy {name!r}; known: {list_policies()}") from None
    policy = builder()
    if seed is not None:
        seed_policy(policy, seed)
    return policy


def seed_policy(policy: A.Compose, seed: int) -> None:
    """Give every transform of ``policy`` one shared random stream seeded with ``seed``.

    Not ``Compose.set_random_seed``: albumentations 2.x hands that same seed to each transform, so
    every transform draws the same first number and they fire all together or not at all.
    """
    policy.set_random_state(np.random.default_rng(seed), random.Random(seed))


@register_policy
def industrial() -> A.Compose:
    """Inspection imagery (EL cells, steel, castings): geometry-preserving flips, small rotations,
    illumination changes, sensor noise and slight defocus. No colour jitter: inputs are often grayscale."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Rotate(limit=10, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
        A.GaussianBlur(blur_limit=(3, 5), p=0.2),
    ])


@register_policy
def medical() -> A.Compose:
    """Radiology / angiography: no vertical flip (anatomy has an up), gentle contrast and noise."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.95, 1.05), translate_percent=(-0.03, 0.03), rotate=(-7, 7), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.08, contrast_limit=0.08, p=0.5),
        A.GaussNoise(std_range=(0.005, 0.02), p=0.2),
    ])


@register_policy
def light() -> A.Compose:
    """Flips only: the cheapest policy, for tests and scalograms-like inputs where geometry matters less."""
    return A.Compose([A.HorizontalFlip(p=0.5)])


@register_policy
def el() -> A.Compose:
    """Electroluminescence images of solar cells: the square cell's symmetries are label-preserving
    (any of the 8 rotations by 90 degrees and flips: a crack stays a crack), plus a small affine
    (the cell is never perfectly centred), brightness/contrast (exposure and cell efficiency differ)
    and mild sensor noise. No blur: fine cracks are the signal."""
    return A.Compose([
        A.SquareSymmetry(p=1.0),
        A.Affine(scale=(0.95, 1.05), translate_percent=(-0.03, 0.03), rotate=(-4, 4),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.7),
        A.GaussNoise(std_range=(0.005, 0.02), p=0.2),
    ])
