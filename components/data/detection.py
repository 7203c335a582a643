"""Detection data: YOLO-format and COCO JSON readers and writers, a synthetic conveyor-belt scene
generator, padding of boxes to fixed-size batch arrays. Box-aware augmentation lives in
:mod:`components.augment.detection`.

One box convention inside resops: ``(class, cx, cy, w, h)`` normalised to [0, 1] by the image's
width and height (the YOLO label format), as a float32 array (n, 5). Both readers return a
:class:`DetectionSet` whose ``frame`` has one row per image: ``path`` (relative to the dataset root),
``width``, ``height``, ``boxes`` (JSON list of ``[class, cx, cy, w, h]``), ``group`` and ``attrs``.

Formats
-------
* **YOLO** (:func:`read_yolo`): ``images/<...>/<stem>.png|jpg`` with ``labels/<...>/<stem>.txt``
  (one ``class cx cy w h`` line per object, normalised; no file or an empty file = no object) and
  the class names in ``classes.txt`` (one per line) or ``data.yaml`` (``names:`` list or mapping).
* **COCO** (:func:`read_coco`): an instances JSON (``images``, ``annotations`` with ``bbox =
  [x, y, width, height]`` in pixels, ``categories``); categories become classes 0..k-1 in id order.

Malformed labels raise :class:`DetectionFormatError` naming the file, the line and the problem.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.images import encode_png
from components.data.sources import IMAGE_SUFFIXES

MAX_BOXES = 64  # boxes per image carried through Ray Data batches (padded with class -1)
SYNTHETIC_CLASSES = ("coal", "gangue")


class DetectionFormatError(ValueError):
    """A label file or annotation is malformed; the message names the file, line and problem."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        super().__init__(message)
        self.path, self.line = path, line


@dataclass
class DetectionSet:
    frame: pd.DataFrame  # path, width, height, boxes (JSON), group, attrs
    class_names: list[str]
    root: Path | None = None
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    def boxes(self, i: int) -> np.ndarray:
        return boxes_from_json(self.frame["boxes"].iloc[i])


def boxes_from_json(text: str) -> np.ndarray:
    arr = np.asarray(json.loads(text), dtype=np.float32).reshape(-1, 5)
    return arr


def boxes_to_json(boxes: np.ndarray) -> str:
    return json.dumps([[int(b[0]), *(round(float(v), 6) for v in b[1:])] for b in np.asarray(boxes).reshape(-1, 5)])


def check_boxes(boxes: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Validate (n, 5) normalised boxes; raise :class:`DetectionFormatError` naming ``where``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    if not np.isfinite(b).all():
        raise DetectionFormatError(f"{where}: box values must be finite numbers", where)
    cls = b[:, 0]
    if ((cls < 0) | (cls >= num_classes) | (cls != np.round(cls))).any():
        raise DetectionFormatError(f"{where}: class ids must be integers in 0..{num_classes - 1}, got "
                                   f"{sorted(set(cls.tolist()))[:10]}", where)
    if ((b[:, 3:5] <= 0) | (b[:, 3:5] > 1)).any() or ((b[:, 1:3] < 0) | (b[:, 1:3] > 1)).any():
        raise DetectionFormatError(f"{where}: box centres must lie in [0, 1] and sizes in (0, 1] "
                                   f"(normalised cx cy w h)", where)
    return b


# ------------------------------------------------------------------------------ conversions
def yolo_to_xyxy(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, 5) normalised ``class cx cy w h`` -> (n, 4) pixel ``x1 y1 x2 y2``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    cx, cy, w, h = b[:, 1] * width, b[:, 2] * height, b[:, 3] * width, b[:, 4] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def xyxy_to_yolo(labels: np.ndarray, xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    x = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    out = np.stack([np.asarray(labels, dtype=np.float64).reshape(-1), (x[:, 0] + x[:, 2]) / 2 / width,
                    (x[:, 1] + x[:, 3]) / 2 / height, (x[:, 2] - x[:, 0]) / width, (x[:, 3] - x[:, 1]) / height], 1)
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------ YOLO
def _read_class_names(root: Path) -> list[str]:
    txt, yml = root / "classes.txt", root / "data.yaml"
    if txt.exists():
        names = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
    elif yml.exists():
        import yaml

        data = yaml.safe_load(yml.read_text()) or {}
        names = data.get("names")
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
    else:
        raise DetectionFormatError(f"{root}: no classes.txt or data.yaml with the class names", str(root))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DetectionFormatError(f"{root}: the class names list is empty or not a list of names", str(root))
    return list(names)


def parse_yolo_labels(text: str, name: str, num_classes: int) -> np.ndarray:
    """The boxes of one YOLO label file's text; errors name ``name`` and the line."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise DetectionFormatError(f"{name} line {i}: expected 'class cx cy w h' (5 numbers), got {line.strip()!r}",
                                       name, i)
        try:
            row = [float(v) for v in parts]
        except ValueError:
            raise DetectionFormatError(f"{name} line {i}: not numbers: {line.strip()!r}", name, i) from None
        try:
            rows.append(check_boxes(np.asarray([row]), num_classes, f"{name} line {i}")[0])
        except DetectionFormatError as exc:
            raise DetectionFormatError(str(exc), name, i) from None
    return np.asarray(rows, dtype=np.float32).reshape(-1, 5)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size  # (width, height)


def read_yolo(root: str | Path) -> DetectionSet:
    """A YOLO-format folder (see the module docstring) as a :class:`DetectionSet`."""
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{root}: a YOLO dataset needs an images/ folder (and labels/)")
    names = _read_class_names(root)
    rows = []
    for img in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = img.relative_to(images_dir)
        label = (root / "labels" / rel).with_suffix(".txt")
        boxes = (parse_yolo_labels(label.read_text(), str(label.relative_to(root)), len(names))
                 if label.exists() else np.zeros((0, 5), np.float32))
        w, h = _image_size(img)
        rows.append({"path": str(Path("images") / rel), "width": w, "height": h, "boxes": boxes_to_json(boxes),
                     "group": str(Path("images") / rel), "attrs": "{}"})
    if not rows:
        raise FileNotFoundError(f"{images_dir}: no images ({sorted(IMAGE_SUFFIXES)})")
    return DetectionSet(pd.DataFrame(rows), names, root)


def write_yolo(root: str | Path, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], class_names: Sequence[str],
               *, names: Sequence[str] | None = None) -> list[Path]:
    """Write ``images/<name>.png`` + ``labels/<name>.txt`` + ``classes.txt``; returns the image paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
    out = []
    for i, (img, b) in enumerate(zip(images, boxes)):
        stem = names[i] if names else f"{i:06d}"
        path = root / "images" / f"{stem}.png"
        path.write_bytes(encode_png(img))
        lines = [f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}" for r in np.asarray(b).reshape(-1, 5)]
        (root / "labels" / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
        out.append(path)
    return out


# ------------------------------------------------------------------------------------ COCO
def read_coco(annotations: str | Path, images_root: str | Path | None = None) -> DetectionSet:
    """A COCO instances JSON as a :class:`DetectionSet`; image paths are ``file_name`` relative to
    ``images_root`` (default: the JSON's folder). Crowd annotations are skipped."""
    annotations = Path(annotations)
    root = Path(images_root) if images_root is not None else annotations.parent
    name = str(annotations)
    try:
        data = json.loads(annotations.read_text())
    except (OSError, ValueError) as exc:
        raise DetectionFormatError(f"{name}: not a readable COCO JSON: {exc}", name) from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DetectionFormatError(f"{name}: a COCO instances file needs a {key!r} list", name)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    images = {im["id"]: im for im in data["images"]}
    per_image: dict[int, list] = {i: [] for i in images}
    for n, ann in enumerate(data["annotations"]):
        if ann.get("iscrowd"):
            continue
        where = f"{name} annotation {ann.get('id', n)}"
        if ann.get("image_id") not in images:
            raise DetectionFormatError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'", name)
        if ann.get("category_id") not in cat_index:
            raise DetectionFormatError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'", name)
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DetectionFormatError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}", name)
        im = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in bbox)
        W, H = float(im["width"]), float(im["height"])
        per_image[ann["image_id"]].append([cat_index[ann["category_id"]], (x + w / 2) / W, (y + h / 2) / H, w / W, h / H])
    rows = []
    for image_id in sorted(images):
        im = images[image_id]
        boxes = check_boxes(np.asarray(per_image[image_id], np.float32).reshape(-1, 5), len(cats),
                            f"{name} image {im['file_name']}")
        rows.append({"path": str(im["file_name"]), "width": int(im["width"]), "height": int(im["height"]),
                     "boxes": boxes_to_json(boxes), "group": str(im["file_name"]), "attrs": "{}"})
    return DetectionSet(pd.DataFrame(rows), [str(c["name"]) for c in cats], root)


def write_coco(path: str | Path, ds: DetectionSet) -> Path:
    """``ds`` as a COCO instances JSON (category ids 1..k, pixel ``[x, y, w, h]`` boxes)."""
    images, anns = [], []
    for i, row in enumerate(ds.frame.itertuples(index=False), 1):
        images.append({"id": i, "file_name": row.path, "width": int(row.width), "height": int(row.height)})
        for b in boxes_from_json(row.boxes):
            x1, y1, x2, y2 = yolo_to_xyxy(b[None], row.width, row.height)[0]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(b[0]) + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(ds.class_names)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


# ------------------------------------------------------------------------------- synthetic
def _belt(size: int, rng: np.random.Generator) -> np.ndarray:
    """A rubber conveyor belt seen from above: dark grey, lengthwise grooves, grain and dust."""
    import cv2

    base = rng.uniform(70, 100)
    img = np.full((size, size), base, np.float32)
    period = rng.uniform(6, 14)
    img += 6 * np.sin(2 * np.pi * np.arange(size) / period)[None, :]
    img += cv2.GaussianBlur(rng.normal(0, 10, (size, size)).astype(np.float32), (0, 0), 1.5)
    img += rng.normal(0, 3, (size, size))
    rgb = np.stack([img * 0.98, img, img * 1.03], -1)
    return rgb


def _object_mask(size: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular rotated lump: a polygon of 7-11 vertices at jittered radii."""
    import cv2

    k = int(rng.integers(7, 12))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    aspect, rot = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    rad = r * rng.uniform(0.75, 1.1, k)
    x, y = rad * np.cos(ang), rad * aspect * np.sin(ang)
    pts = np.stack([cx + x * np.cos(rot) - y * np.sin(rot), cy + x * np.sin(rot) + y * np.cos(rot)], 1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def synthetic_scene(size: int, rng: np.random.Generator, *, min_objects: int = 2, max_objects: int = 6,
                    min_radius: float = 0.05, max_radius: float = 0.14) -> tuple[np.ndarray, np.ndarray]:
    """One conveyor scene: (uint8 RGB image, boxes (n, 5) normalised). Class 0 ``coal``: near black,
    glossy (a bright specular streak); class 1 ``gangue``: grey-brown rock, matte and grainy.

    Objects may touch but a new one is dropped when it would hide more than 30 % of an earlier one,
    so every labelled box stays visible. Hand-made: not images of real coal."""
    import cv2

    img = _belt(size, rng)
    taken = np.zeros((size, size), bool)
    boxes = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(10):
            r = rng.uniform(min_radius, max_radius) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            mask = _object_mask(size, cx, cy, r, rng)
            if mask.sum() > 20 and (mask & taken).sum() <= 0.3 * mask.sum():
                break
        else:
            continue
        cls = int(rng.integers(0, 2))
        yy, xx = np.nonzero(mask)
        shade = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 2.0)
        if cls == 0:  # coal: dark, smooth, a specular highlight
            val = 22 + 6 * shade
            d = ((xx - cx) * 0.7 + (yy - cy) * 0.7) / r
            hl = np.zeros((size, size), np.float32)
            hl[yy, xx] = np.exp(-((d - rng.uniform(-0.4, 0.2)) ** 2) / 0.02) * rng.uniform(120, 190)
            col = np.stack([val + hl] * 3, -1)
        else:  # gangue: lighter grey-brown, matte, grainy
            g = rng.uniform(120, 165)
            val = g + 18 * shade + rng.normal(0, 8, (size, size))
            col = np.stack([val * 1.04, val, val * 0.9], -1)
        img[mask] = col[mask]
        taken |= mask
        x1, y1, x2, y2 = xx.min(), yy.min(), xx.max() + 1, yy.max() + 1
        boxes.append([cls, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size])
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.float32), (0, 0), 0.6)
    return np.clip(img, 0, 255).astype(np.uint8), np.asarray(boxes, np.float32).reshape(-1, 5)


def synthetic_conveyor(num_images: int, image_size: int = 256, seed: int = 0,
                       **kwargs) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``num_images`` scenes of :func:`synthetic_scene` (deterministic for a ``seed``)."""
    if num_images < 1 or image_size < 32:
        raise ValueError(f"need num_images >= 1 and image_size >= 32, got {num_images}, {image_size}")
    rng = np.random.default_rng(seed)
    scenes = [synthetic_scene(image_size, rng, **kwargs) for _ in range(num_images)]
    return [s[0] for s in scenes], [s[1] for s in scenes]


# ------------------------------------------------------------------------------- batches
def pad_boxes(boxes: np.ndarray, max_boxes: int = MAX_BOXES) -> np.ndarray:
    """(n, 5) -> (max_boxes, 5) with rows of class -1 after the real ones (fixed shape for batches)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 5)[:max_boxes]
    out = np.full((max_boxes, 5), -1.0, np.float32)
    out[:len(b)] = b
    return out


def unpad_boxes(padded: np.ndarray) -> np.ndarray:
    p = np.asarray(padded).reshape(-1, 5)
    return p[p[:, 0] >= 0]


__all__ = ["DetectionFormatError", "DetectionSet", "MAX_BOXES", "SYNTHETIC_CLASSES", "boxes_from_json", "boxes_to_json",
           "check_boxes", "pad_boxes", "parse_yolo_labels", "read_coco", "read_yolo", "synthetic_conveyor",
           "synthetic_scene", "unpad_boxes", "write_coco", "write_yolo", "xyxy_to_yolo", "yolo_to_xyxy"]
