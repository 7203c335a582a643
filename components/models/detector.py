"""``resnet18_yolo``: a YOLOv3-style detector on a ResNet18 backbone (Xue et al. replaced YOLOv3's
Darknet-53 by ResNet18), its loss, its decoding and non-maximum suppression.

Architecture
------------
* **Backbone**: any classifier of the model zoo that is a torchvision ``ResNet`` (``resnet18``,
  ``se_resnet18``, ``resnet18_simam``, ``resnet18_k2``; option ``backbone``), without its pooling and
  ``fc``. Features of its last three stages: C3 (stride 8, 128 channels), C4 (16, 256), C5 (32, 512).
* **Neck** (YOLOv3's, narrower): C5 -> conv set -> P5; P5 -> 1x1 conv, 2x upsample, concatenated with
  C4 -> conv set -> P4; the same again with C3 -> P3. A conv set is 1x1 / 3x3 / 1x1 convolutions
  (BatchNorm, LeakyReLU 0.1); ``width`` scales the neck's channels.
* **Heads**: per scale, a 3x3 conv and a 1x1 conv to ``A x (5 + num_classes)`` outputs: box
  (tx, ty, tw, th), objectness and class logits for each of the ``A = 3`` anchors of that scale.

Anchors are (width, height) as fractions of the input size, nine of them, small to large: three
per scale, the smallest on stride 8. The default is YOLOv3's COCO anchors divided by its 416-pixel
input; :func:`fit_anchors` fits them to a dataset's boxes with k-means.

Boxes everywhere are ``(x1, y1, x2, y2)`` in pixels of the image given to the model unless a
function says otherwise; targets are YOLO-style ``(class, cx, cy, w, h)`` normalised to [0, 1].
The forward pass returns raw head outputs (a list of three ``(B, A, H, W, 5 + C)`` tensors, stride
8 first); :func:`decode` turns them into boxes and :func:`postprocess` applies score threshold and
``torchvision.ops.batched_nms``. :class:`YoloLoss` is the YOLOv3 loss: complete-IoU box loss
(``torchvision.ops.complete_box_iou_loss``), objectness BCE with YOLOv3's ignore rule (predictions
overlapping a ground-truth box by more than ``ignore_iou`` are neither positives nor negatives),
class BCE on positives.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_convert, box_iou, complete_box_iou_loss

from components.models.registry import create_model, model_task, register_model

# YOLOv3's COCO anchors (pixels at 416 x 416), small to large; stored as fractions of the input.
YOLOV3_ANCHORS_416 = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
DEFAULT_ANCHORS = tuple((w / 416.0, h / 416.0) for w, h in YOLOV3_ANCHORS_416)
STRIDES = (8, 16, 32)
ANCHORS_PER_SCALE = 3
BACKBONE_CHANNELS = (128, 256, 512)  # ResNet18 layer2, layer3, layer4


def _conv(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.1, inplace=True))


def _conv_set(c_in: int, c: int) -> nn.Sequential:
    """YOLOv3's alternating 1x1 / 3x3 convolutions (three of its five), ending at ``c`` channels."""
    return nn.Sequential(_conv(c_in, c, 1), _conv(c, 2 * c, 3), _conv(2 * c, c, 1))


def check_anchors(anchors: Sequence[Sequence[float]] | None) -> torch.Tensor:
    """Nine positive (w, h) fractions of the input, as a (9, 2) float tensor sorted by area."""
    a = torch.as_tensor(DEFAULT_ANCHORS if anchors is None else anchors, dtype=torch.float32)
    if a.shape != (len(STRIDES) * ANCHORS_PER_SCALE, 2) or not torch.all(a > 0) or not torch.all(a <= 4):
        raise ValueError(f"anchors must be 9 (width, height) pairs as positive fractions of the input size, "
                         f"got {a.tolist() if a.numel() < 40 else a.shape}")
    return a[torch.argsort(a[:, 0] * a[:, 1])]


class ResNetYOLO(nn.Module):
    """YOLOv3-style detector on a model-zoo ResNet backbone (see the module docstring)."""

    def __init__(self, num_classes: int, in_chans: int = 3, backbone: str = "resnet18",
                 anchors: Sequence[Sequence[float]] | None = None, width: float = 1.0,
                 backbone_kwargs: dict | None = None):
        super().__init__()
        if model_task(backbone) != "classify":
            raise ValueError(f"backbone must be a classifier of the model zoo, got {backbone!r}")
        net = create_model(backbone, num_classes=1, in_chans=in_chans, **dict(backbone_kwargs or {}))
        if not all(hasattr(net, k) for k in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4")):
            raise ValueError(f"backbone {backbone!r} is not a torchvision ResNet")
        self.num_classes = int(num_classes)
        self.num_outputs = 5 + self.num_classes
        self.register_buffer("anchors", check_anchors(anchors))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        c3, c4, c5 = BACKBONE_CHANNELS
        n5, n4, n3 = (max(8, int(round(c * width))) for c in (256, 128, 64))
        out = ANCHORS_PER_SCALE * self.num_outputs
        self.set5 = _conv_set(c5, n5)
        self.head5 = nn.Sequential(_conv(n5, 2 * n5, 3), nn.Conv2d(2 * n5, out, 1))
        self.reduce5 = _conv(n5, n5 // 2, 1)
        self.set4 = _conv_set(c4 + n5 // 2, n4)
        self.head4 = nn.Sequential(_conv(n4, 2 * n4, 3), nn.Conv2d(2 * n4, out, 1))
        self.reduce4 = _conv(n4, n4 // 2, 1)
        self.set3 = _conv_set(c3 + n4 // 2, n3)
        self.head3 = nn.Sequential(_conv(n3, 2 * n3, 3), nn.Conv2d(2 * n3, out, 1))
        self._init_head_biases()

    def _init_head_biases(self, objects_per_image: float = 8.0) -> None:
        """Objectness bias for a low prior (few objects per image): training starts from 'nothing here'
        instead of 0.5 everywhere, which makes the first steps' objectness loss sane."""
        for head, stride in zip((self.head3, self.head4, self.head5), STRIDES):
            conv = head[-1]
            b = conv.bias.detach().view(ANCHORS_PER_SCALE, self.num_outputs)
            b[:, 4] = float(np.log(objects_per_image / (640 / stride) ** 2))
            b[:, 5:] = float(np.log(0.6 / max(self.num_classes - 0.99, 0.01)))
            conv.bias = nn.Parameter(b.reshape(-1).clone())

    def _split(self, p: torch.Tensor) -> torch.Tensor:
        b, _, h, w = p.shape
        return p.view(b, ANCHORS_PER_SCALE, self.num_outputs, h, w).permute(0, 1, 3, 4, 2).contiguous()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.layer2(self.layer1(self.stem(x)))
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        p5 = self.set5(c5)
        p4 = self.set4(torch.cat([F.interpolate(self.reduce5(p5), size=c4.shape[-2:], mode="nearest"), c4], 1))
        p3 = self.set3(torch.cat([F.interpolate(self.reduce4(p4), size=c3.shape[-2:], mode="nearest"), c3], 1))
        return [self._split(self.head3(p3)), self._split(self.head4(p4)), self._split(self.head5(p5))]

    def head_layers(self) -> list[nn.Conv2d]:
        """The three output convolutions (kept whole by structured pruning)."""
        return [self.head3[-1], self.head4[-1], self.head5[-1]]


@register_model(task="detect")
def resnet18_yolo(num_classes: int, in_chans: int = 3, backbone: str = "resnet18",
                  anchors: Sequence[Sequence[float]] | None = None, width: float = 1.0,
                  backbone_kwargs: dict | None = None) -> nn.Module:
    """YOLOv3-style detector with a ResNet18-family backbone (``backbone``: a model-zoo classifier)."""
    if not 0 < float(width) <= 4:
        raise ValueError(f"width must be in (0, 4], got {width}")
    return ResNetYOLO(num_classes, in_chans, backbone=backbone, anchors=anchors, width=float(width),
                      backbone_kwargs=backbone_kwargs)


def _grid(h: int, w: int, device, dtype) -> torch.Tensor:
    gy, gx = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack([gx, gy], -1)  # (H, W, 2) as (x, y)


def decode_scale(p: torch.Tensor, anchors: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """One scale's raw output (B, A, H, W, 5 + C) -> boxes (B, A, H, W, 4) as xyxy pixels.

    centre = (2 sigmoid(t_xy) - 0.5 + cell) * stride, size = anchor * (2 sigmoid(t_wh))^2: YOLOv3's
    cell-and-anchor scheme with the bounded box terms of its successors (YOLOv4-scaled/v5). YOLOv3's
    ``anchor * exp(t_wh)`` has no bound: one overshooting step makes a box hundreds of times its
    anchor, and clamping it stops the gradient, so the box never comes back; here a box is 0 to 4
    times its anchor and the gradient never vanishes at the bound."""
    h, w = p.shape[2:4]
    img_h, img_w = image_hw
    grid = _grid(h, w, p.device, p.dtype)
    xy = torch.sigmoid(p[..., 0:2]) * 2.0 - 0.5 + grid
    cx, cy = xy[..., 0] * (img_w / w), xy[..., 1] * (img_h / h)
    a = anchors.to(p.dtype).view(1, -1, 1, 1, 2)
    wh = (torch.sigmoid(p[..., 2:4]) * 2.0) ** 2 * a
    bw, bh = wh[..., 0] * img_w, wh[..., 1] * img_h
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def decode(outputs: Sequence[torch.Tensor], anchors: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """All scales -> (B, N, 5 + C): xyxy pixels, objectness probability, class probabilities."""
    parts = []
    for k, p in enumerate(outputs):
        a = anchors[k * ANCHORS_PER_SCALE:(k + 1) * ANCHORS_PER_SCALE]
        boxes = decode_scale(p, a, image_hw)
        probs = torch.sigmoid(p[..., 4:])
        parts.append(torch.cat([boxes, probs], -1).flatten(1, 3))
    return torch.cat(parts, 1)


def postprocess(decoded: torch.Tensor, *, score_threshold: float = 0.25, iou_threshold: float = 0.45,
                max_detections: int = 100, image_hw: tuple[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes`` (n, 4) xyxy pixels, ``scores`` (n,), ``labels`` (n,) int64, after
    score = objectness x best class probability >= ``score_threshold`` and class-wise NMS
    (``torchvision.ops.batched_nms``); at most ``max_detections``, highest score first. With
    ``image_hw`` boxes are clipped to the image."""
    results = []
    for det in decoded:
        cls_prob, labels = det[:, 5:].max(1)
        scores = det[:, 4] * cls_prob
        keep = scores >= score_threshold
        boxes, scores, labels = det[keep, :4], scores[keep], labels[keep]
        if image_hw is not None:
            boxes = torch.stack([boxes[:, 0].clamp(0, image_hw[1]), boxes[:, 1].clamp(0, image_hw[0]),
                                 boxes[:, 2].clamp(0, image_hw[1]), boxes[:, 3].clamp(0, image_hw[0])], 1)
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
        idx = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)[:max_detections]
        results.append({"boxes": boxes[idx].float(), "scores": scores[idx].float(), "labels": labels[idx].long()})
    return results


@torch.no_grad()
def detect(model: nn.Module, images: torch.Tensor, **kwargs) -> list[dict[str, torch.Tensor]]:
    """Eval-mode forward + :func:`decode` + :func:`postprocess` for a float batch (B, C, H, W)."""
    model.eval()
    base = getattr(model, "module", model)
    hw = tuple(images.shape[-2:])
    outputs = model(images.contiguous(memory_format=torch.channels_last))
    return postprocess(decode([o.float() for o in outputs], base.anchors, hw), image_hw=hw, **kwargs)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics as the plain average over ``batches``
    (float image tensors), then return the model in eval mode. Use after few-step training, after
    pruning, or when training batches were tiny: eval then normalises as training did."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


def scale_boxes(boxes: torch.Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> torch.Tensor:
    """xyxy boxes on an image resized from ``to_hw`` to ``from_hw`` back to ``to_hw`` coordinates."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


# ----------------------------------------------------------------------------------- loss
def _wh_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes sharing a centre: (N, 2) x (M, 2) -> (N, M) (YOLOv3's anchor matching)."""
    inter = torch.min(wh1[:, None], wh2[None]).prod(-1)
    return inter / (wh1.prod(-1)[:, None] + wh2.prod(-1)[None] - inter)


class YoloLoss(nn.Module):
    """YOLOv3 loss over the three scales; ``targets`` is a list (one per image) of (n, 5) tensors
    ``(class, cx, cy, w, h)`` normalised to [0, 1].

    Each ground-truth box is assigned to the one anchor (of nine) whose shape matches it best, in
    the cell holding its centre on that anchor's scale. Box term: mean ``1 - CIoU`` over assigned
    predictions; objectness: BCE, target 1 at assigned predictions, 0 elsewhere except predictions
    whose decoded box overlaps a ground truth by more than ``ignore_iou`` (YOLOv3's ignore rule),
    averaged per scale with ``balance`` weights; class: BCE on assigned predictions. Returns
    ``(total, parts)`` with ``total = batch * (box_gain * box + obj_gain * obj + cls_gain * cls)``.
    """

    def __init__(self, num_classes: int, *, box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5,
                 ignore_iou: float = 0.5, balance: Sequence[float] = (4.0, 1.0, 0.4)):
        super().__init__()
        self.num_classes = int(num_classes)
        self.box_gain, self.obj_gain, self.cls_gain = float(box_gain), float(obj_gain), float(cls_gain)
        self.ignore_iou = float(ignore_iou)
        self.balance = tuple(float(b) for b in balance)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], anchors: torch.Tensor,
                image_hw: tuple[int, int]) -> tuple[torch.Tensor, dict[str, float]]:
        device = outputs[0].device
        bsz = outputs[0].shape[0]
        img_h, img_w = image_hw
        scale = torch.tensor([img_w, img_h, img_w, img_h], device=device, dtype=torch.float32)
        gt = [t.to(device=device, dtype=torch.float32).reshape(-1, 5) for t in targets]
        gt_xyxy = [box_convert(t[:, 1:], "cxcywh", "xyxy") * scale for t in gt]
        all_t = torch.cat([torch.cat([torch.full((len(t), 1), float(i), device=device), t], 1) for i, t in enumerate(gt)])
        if len(all_t):
            best = _wh_iou(all_t[:, 4:6], anchors.to(device)).argmax(1)  # (n,) anchor index 0..8
        box_loss = torch.zeros((), device=device)
        cls_loss = torch.zeros((), device=device)
        obj_loss = torch.zeros((), device=device)
        n_pos = 0
        for k, p in enumerate(outputs):
            p = p.float()
            _, na, h, w, _ = p.shape
            a = anchors[k * na:(k + 1) * na].to(device)
            pred_boxes = decode_scale(p, a, image_hw)  # (B, A, H, W, 4) pixels
            obj_target = torch.zeros(p.shape[:4], device=device)
            obj_weight = torch.ones(p.shape[:4], device=device)
            with torch.no_grad():  # YOLOv3's ignore rule
                for i in range(bsz):
                    if len(gt_xyxy[i]):
                        iou = box_iou(pred_boxes[i].reshape(-1, 4), gt_xyxy[i]).max(1).values.view(na, h, w)
                        obj_weight[i][iou > self.ignore_iou] = 0.0
            if len(all_t):
                sel = (best // na) == k
                t = all_t[sel]
                if len(t):
                    b = t[:, 0].long()
                    an = (best[sel] % na).long()
                    gx = (t[:, 2] * w).long().clamp(0, w - 1)
                    gy = (t[:, 3] * h).long().clamp(0, h - 1)
                    ps = p[b, an, gy, gx]
                    pb = pred_boxes[b, an, gy, gx]
                    tb = box_convert(t[:, 2:6], "cxcywh", "xyxy") * scale
                    # Boxes normalised by the image size keep the CIoU terms scale-free.
                    box_loss = box_loss + complete_box_iou_loss(pb / scale, tb / scale, reduction="sum")
                    n_pos += len(t)
                    obj_target[b, an, gy, gx] = 1.0
                    obj_weight[b, an, gy, gx] = 1.0
                    if self.num_classes > 1:
                        onehot = F.one_hot(t[:, 1].long(), self.num_classes).float()
                        cls_loss = cls_loss + F.binary_cross_entropy_with_logits(ps[:, 5:], onehot, reduction="sum")
            bce = F.binary_cross_entropy_with_logits(p[..., 4], obj_target, reduction="none")
            obj_loss = obj_loss + self.balance[k] * (bce * obj_weight).sum() / obj_weight.sum().clamp(min=1.0)
        n = max(n_pos, 1)
        box_loss = box_loss / n
        cls_loss = cls_loss / (n * max(self.num_classes, 1))
        total = bsz * (self.box_gain * box_loss + self.obj_gain * obj_loss + self.cls_gain * cls_loss)
        return total, {"box": float(box_loss.detach()), "obj": float(obj_loss.detach()), "cls": float(cls_loss.detach()),
                       "positives": n_pos}


# -------------------------------------------------------------------------------- anchors
def anchor_fitness(wh: np.ndarray, anchors: np.ndarray) -> float:
    """Mean over boxes of the best shape IoU with any anchor (both as fractions of the image)."""
    iou = _wh_iou(torch.as_tensor(wh, dtype=torch.float32), torch.as_tensor(anchors, dtype=torch.float32))
    return float(iou.max(1).values.mean())


def fit_anchors(wh: np.ndarray, k: int = 9, seed: int = 0) -> np.ndarray:
    """k-means anchors for box sizes ``wh`` (n, 2) given as fractions of the image, sorted by area.

    scikit-learn's KMeans on log(w, h): distances in log space compare shapes by ratio, as the
    IoU distance of YOLOv2's anchor clustering does, so large boxes do not dominate the clusters."""
    from sklearn.cluster import KMeans

    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    wh = wh[(wh > 0).all(1)]
    if len(wh) < k:
        raise ValueError(f"fitting {k} anchors needs at least {k} boxes, got {len(wh)}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(np.log(wh))
    anchors = np.exp(km.cluster_centers_)
    return anchors[np.argsort(anchors.prod(1))]
