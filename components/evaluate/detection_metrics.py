"""Detection metrics: torchmetrics' mAP on the detector's padded YOLO targets, as plain floats.

Used by the detector's training-time validation (:mod:`components.train.detect`) and by the
evaluate stage (:mod:`components.evaluate.detection`).
"""
from __future__ import annotations

import contextlib
import io

import torch


def targets_list(padded: torch.Tensor) -> list[torch.Tensor]:
    """(B, max_boxes, 5) padded targets -> a list of (n_i, 5) tensors (rows with class >= 0)."""
    return [t[t[:, 0] >= 0] for t in padded]


def target_dicts(padded: torch.Tensor, image_hw: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Padded normalised targets -> torchmetrics' ground-truth dicts (xyxy pixels, labels)."""
    h, w = image_hw
    out = []
    for t in targets_list(padded):
        cx, cy, bw, bh = t[:, 1] * w, t[:, 2] * h, t[:, 3] * w, t[:, 4] * h
        out.append({"boxes": torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).float(),
                    "labels": t[:, 0].long()})
    return out


def new_map_metric(class_metrics: bool = False):
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=class_metrics,
                                backend="pycocotools")


def compute_quietly(metric) -> dict:
    """``metric.compute()`` without pycocotools' summary table on stdout (the numbers are returned)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return metric.compute()


def map_summary(result: dict, class_names: list[str] | None = None) -> dict:
    """Plain floats from a torchmetrics mAP result; with ``class_names`` (a metric made with
    ``class_metrics=True``) also ``ap_per_class``: each class's AP at the metric's IoU thresholds."""
    out = {"map_50": float(result["map_50"]), "map_50_95": float(result["map"]), "map_75": float(result["map_75"]),
           "mar_100": float(result["mar_100"])}
    if class_names is not None:
        values = result["map_per_class"].reshape(-1).tolist()
        ids = result["classes"].reshape(-1).tolist()
        out["ap_per_class"] = {class_names[int(i)]: float(v) for i, v in zip(ids, values)}
    return out
