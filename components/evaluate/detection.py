"""Detector evaluation: mAP@0.5 and mAP@0.5:0.95 (torchmetrics' ``MeanAveragePrecision``, COCO
rules through pycocotools), AP per class, the precision-recall curve per class at IoU 0.5, and a
picture of predictions drawn on test images.

Images are decoded and resized exactly as in training's validation (``detection_batch`` without
augmentation); detections are compared with the ground truth in the model's input pixels (the
boxes are normalised, so the comparison equals one at the original size up to rounding).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from components.augment.detection import detection_batch
from components.data.detection import boxes_from_json, yolo_to_xyxy
from components.models.detector import detect
from components.evaluate.detection_metrics import compute_quietly, map_summary, target_dicts

COLOURS = [(230, 60, 40), (40, 120, 230), (240, 200, 30), (150, 60, 200), (30, 190, 170), (250, 130, 20)]


def _batches(frame: pd.DataFrame, image_size: int, in_chans: int, batch_size: int):
    for i in range(0, len(frame), batch_size):
        part = frame.iloc[i:i + batch_size]
        out = detection_batch({"image": part["image"].to_numpy(), "boxes": part["boxes"].to_numpy()},
                              image_size=image_size, in_chans=in_chans, policy=None)
        yield {k: torch.from_numpy(v) for k, v in out.items()}


def predict_frame(model: torch.nn.Module, frame: pd.DataFrame, meta: dict, *, batch_size: int = 16,
                  score_threshold: float = 0.001, iou_threshold: float = 0.6,
                  max_detections: int = 100) -> tuple[list[dict], list[dict]]:
    """Detections and ground truths (torchmetrics dicts, input pixels) for every row of ``frame``."""
    model = model.eval().to(memory_format=torch.channels_last)
    preds, gts = [], []
    for batch in _batches(frame, int(meta["image_size"]), int(meta["in_chans"]), batch_size):
        hw = tuple(batch["image"].shape[-2:])
        preds += detect(model, batch["image"], score_threshold=score_threshold, iou_threshold=iou_threshold,
                        max_detections=max_detections)
        gts += target_dicts(batch["targets"], hw)
    return preds, gts


def detection_metrics(preds: list[dict], gts: list[dict], class_names: list[str]) -> dict:
    """mAP@0.5, mAP@0.5:0.95, AP per class at both, and the per-class PR curve at IoU 0.5."""
    from torchmetrics.detection import MeanAveragePrecision

    coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
    coco.update(preds, gts)
    out = map_summary(compute_quietly(coco), class_names)
    out["ap_50_95_per_class"] = out.pop("ap_per_class")
    at50 = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], class_metrics=True,
                                extended_summary=True, backend="pycocotools")
    at50.update(preds, gts)
    r = compute_quietly(at50)
    ids = r["classes"].reshape(-1).tolist()
    out["ap_50_per_class"] = {class_names[int(i)]: float(v) for i, v in zip(ids, r["map_per_class"].reshape(-1).tolist())}
    # precision: (iou thresholds, recall thresholds, classes, area ranges, max detections); area "all", 100 dets.
    precision = r["precision"][0, :, :, 0, -1].numpy()
    recall = np.linspace(0, 1, precision.shape[0])
    out["pr_curve_50"] = {class_names[int(i)]: {"recall": recall.round(2).tolist(),
                                                "precision": np.clip(precision[:, k], 0, 1).round(4).tolist()}
                          for k, i in enumerate(ids)}
    out["num_images"] = len(gts)
    out["num_boxes"] = {class_names[k]: int(sum(int((g["labels"] == k).sum()) for g in gts))
                        for k in range(len(class_names))}
    return out


def save_pr_curves(metrics: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, curve in metrics["pr_curve_50"].items():
        ap = metrics["ap_50_per_class"].get(name, float("nan"))
        ax.plot(curve["recall"], curve["precision"], label=f"{name} (AP@0.5 {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=title or f"precision-recall at IoU 0.5 (mAP@0.5 {metrics['map_50']:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_detections(image: np.ndarray, det: dict, class_names: list[str], gt: np.ndarray | None = None,
                    from_hw: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB copy of ``image`` with ground-truth boxes (thin white) and detections (class colour,
    label and score). ``det`` boxes are in ``from_hw`` pixels (the model input) when given."""
    import cv2

    img = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*image.shape[:2], 1), 3, 2)
    img = np.ascontiguousarray(img.copy())
    h, w = img.shape[:2]
    sy, sx = (h / from_hw[0], w / from_hw[1]) if from_hw else (1.0, 1.0)
    if gt is not None:
        for x1, y1, x2, y2 in yolo_to_xyxy(gt, w, h).round().astype(int):
            cv2.rectangle(img, (x1, y1), (x2, y2), (255, 255, 255), 1)
    for (x1, y1, x2, y2), s, c in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        p1, p2 = (int(x1 * sx), int(y1 * sy)), (int(x2 * sx), int(y2 * sy))
        colour = COLOURS[int(c) % len(COLOURS)]
        cv2.rectangle(img, p1, p2, colour, 2)
        cv2.putText(img, f"{class_names[int(c)]} {s:.2f}", (p1[0], max(10, p1[1] - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, colour, 1, cv2.LINE_AA)
    return img


def save_prediction_grid(model: torch.nn.Module, frame: pd.DataFrame, meta: dict, path: str | Path, *, n: int = 8,
                         score_threshold: float = 0.25, columns: int = 4) -> Path:
    """The first ``n`` rows of ``frame`` with their detections (score >= ``score_threshold``) and
    ground truth drawn, tiled into one PNG for a person to look at."""
    from components.data.images import decode_image, encode_png

    rows = frame.iloc[:n]
    preds, _ = predict_frame(model, rows, meta, score_threshold=score_threshold, iou_threshold=0.45)
    size = int(meta["image_size"])
    tiles = []
    for (_, row), det in zip(rows.iterrows(), preds):
        img = decode_image(row["image"], 3)
        tile = draw_detections(img, det, list(meta["class_names"]), gt=boxes_from_json(row["boxes"]),
                               from_hw=(size, size))
        import cv2

        tiles.append(cv2.resize(tile, (256, 256), interpolation=cv2.INTER_AREA))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[i:i + columns], 1) for i in range(0, len(tiles), columns)], 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(grid))
    return path
