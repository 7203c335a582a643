"""Box-aware augmentation for detection (albumentations ``bbox_params``) and the Ray Data batch
function that turns detection shards into training tensors.

Boxes are (n, 5) ``class cx cy w h`` normalised to [0, 1] (:mod:`components.data.detection`); the
policies move them with the pixels, drop boxes less than 30 % visible after a transform and clip the
rest to the image.
"""
from __future__ import annotations

import os

import numpy as np

from components.data.detection import MAX_BOXES, boxes_from_json, pad_boxes
from components.data.images import decode_image


def detection_policy(name: str | None, seed: int | None = None):
    """A box-aware albumentations pipeline (``bbox_params`` in YOLO format; boxes less than 30 %
    visible after a transform are dropped, the rest clipped to the image), or None for ``none``.

    ``conveyor``: flips both ways (a belt seen from above has no up), small shifts/scales/rotations,
    brightness/contrast, sensor noise. ``light``: horizontal flip only."""
    import albumentations as A
    import cv2

    from components.augment.policies import seed_policy

    if name in (None, "none"):
        return None
    if name == "conveyor":
        transforms = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
                      A.Affine(scale=(0.85, 1.15), translate_percent=(-0.08, 0.08), rotate=(-10, 10),
                               border_mode=cv2.BORDER_REFLECT_101, p=0.7),
                      A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
                      A.GaussNoise(std_range=(0.01, 0.04), p=0.3)]
    elif name == "light":
        transforms = [A.HorizontalFlip(p=0.5)]
    else:
        raise ValueError(f"unknown detection augmentation policy {name!r}; known: conveyor, light, none")
    policy = A.Compose(transforms, bbox_params=A.BboxParams(format="yolo", label_fields=["class_labels"],
                                                            min_visibility=0.3, clip=True))
    if seed is not None:
        seed_policy(policy, seed)
    return policy


def augment_detection(policy, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply a box-aware policy to one image and its (n, 5) normalised boxes."""
    b = np.asarray(boxes, np.float32).reshape(-1, 5)
    out = policy(image=image, bboxes=b[:, 1:5], class_labels=b[:, 0].tolist())
    nb = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(out["class_labels"], np.float32).reshape(-1, 1)
    return out["image"], np.concatenate([labels, nb], 1)


_POLICIES: dict[tuple, object] = {}


def _cached_policy(name: str | None, seed: int | None):
    """One policy per (name, seed) per process; seeded with seed + pid, so Ray workers draw
    different streams while a single process with a seed is reproducible (as the image pipeline)."""
    key = (name, seed)
    if key not in _POLICIES:
        _POLICIES[key] = detection_policy(name, seed=None if seed is None else int(seed) + os.getpid() % 10_000)
    return _POLICIES[key]


def detection_batch(batch: dict, *, image_size: int, in_chans: int = 3, policy: str | None = None,
                    seed: int | None = None, max_boxes: int = MAX_BOXES) -> dict:
    """Ray Data ``map_batches`` function: PNG ``image`` + JSON ``boxes`` -> float32 ``image``
    (N, C, image_size, image_size) in [0, 1], ``targets`` (N, max_boxes, 5) padded with class -1,
    and ``orig_size`` (N, 2) as (height, width). Boxes are normalised, so the resize keeps them."""
    import cv2

    pol = _cached_policy(policy, seed)
    images, targets, sizes = [], [], []
    for raw, text in zip(batch["image"], batch["boxes"]):
        img = decode_image(raw, in_chans)
        sizes.append(img.shape[:2])
        b = boxes_from_json(text)
        if pol is not None:
            img, b = augment_detection(pol, img, b)
        if img.ndim == 2:
            img = img[:, :, None]
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
        if img.ndim == 2:
            img = img[:, :, None]
        images.append(np.transpose(img, (2, 0, 1)).astype(np.float32) / 255.0)
        targets.append(pad_boxes(b, max_boxes))
    return {"image": np.stack(images), "targets": np.stack(targets), "orig_size": np.asarray(sizes, np.int64)}
