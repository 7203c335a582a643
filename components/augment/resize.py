"""The validation transform of training on a decoded image: area resize (to twice the input size
first when the image is larger, as the augment path does before augmenting), then
``(x - 127.5) / 63.75``. One function, so the training loader, the Serve tiers and the ingress edge
model compute the same input from the same pixels."""
from __future__ import annotations

import cv2
import numpy as np


def area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HxWxC image at size x size (``cv2.INTER_AREA``); unchanged when it already is."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return out if out.ndim == 3 else out[:, :, None]


def shrink_to(img: np.ndarray, size: int) -> np.ndarray:
    """An image larger than size x size shrunk to it; smaller ones unchanged."""
    if img.shape[0] <= size and img.shape[1] <= size:
        return img
    return area_resize(img, size)


def normalise(img: np.ndarray) -> np.ndarray:
    """uint8 HxWxC -> float32 CHW, about zero mean and unit standard deviation."""
    return (img.astype(np.float32).transpose(2, 0, 1) - 127.5) / 63.75


def validation_tensor(img: np.ndarray, image_size: int) -> np.ndarray:
    """A decoded uint8 HxWxC image -> the float32 CHW input the model was validated on."""
    return normalise(area_resize(shrink_to(img, 2 * image_size), image_size))
