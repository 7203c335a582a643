"""The ResNet18-backbone YOLO detector (components.models.detector) and detection data
(components.data.detection): shapes, loss, decoding and NMS, readers, box-aware augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from components.augment.detection import augment_detection, detection_batch, detection_policy
from components.data.detection import (DetectionFormatError, boxes_from_json, read_coco, read_yolo, synthetic_conveyor,
                                       unpad_boxes, write_coco, write_yolo, yolo_to_xyxy)
from components.data.images import encode_png
from components.models import create_model, list_models, load_model, save_model
from components.models.detector import (ANCHORS_PER_SCALE, DEFAULT_ANCHORS, STRIDES, YoloLoss, anchor_fitness, decode,
                                        detect, fit_anchors, postprocess, recalibrate_batchnorm, scale_boxes)


def _gt_xyxy(t: torch.Tensor, size: int) -> torch.Tensor:
    return torch.as_tensor(yolo_to_xyxy(t.numpy(), size, size), dtype=torch.float32)


# ------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("backbone", ["resnet18", "se_resnet18", "resnet18_simam", "resnet18_k2"])
def test_each_head_has_the_yolo_output_shape_on_every_backbone(backbone):
    model = create_model("resnet18_yolo", num_classes=2, in_chans=3, backbone=backbone).eval()
    with torch.no_grad():
        outs = model(torch.zeros(2, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [(2, ANCHORS_PER_SCALE, 128 // s, 96 // s, 5 + 2) for s in STRIDES]
    assert "resnet18_yolo" in list_models("detect") and "resnet18_yolo" not in list_models()


def test_detector_rejects_bad_anchors_and_backbones():
    with pytest.raises(ValueError, match="9 \\(width, height\\) pairs"):
        create_model("resnet18_yolo", num_classes=2, anchors=[[0.1, 0.1]] * 3)
    with pytest.raises(ValueError, match="backbone must be a classifier"):
        create_model("resnet18_yolo", num_classes=2, backbone="resnet18_yolo")


def test_detector_file_round_trip_keeps_anchors(tmp_path):
    anchors = [[0.02 * (k + 1), 0.03 * (k + 1)] for k in range(9)]
    model = create_model("resnet18_yolo", num_classes=3, in_chans=1, anchors=anchors, width=0.5)
    meta = {"model_name": "resnet18_yolo", "num_classes": 3, "in_chans": 1, "image_size": 64,
            "class_names": ["a", "b", "c"], "model_kwargs": {"anchors": anchors, "width": 0.5}}
    save_model(tmp_path / "det.pt", model, meta)
    loaded, meta2 = load_model(tmp_path / "det.pt")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), loaded(x)):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(loaded.anchors, torch.tensor(anchors))


# ---------------------------------------------------------------------- decoding and NMS
def test_decode_and_nms_return_a_known_box_in_image_coordinates():
    """A raw output with one confident prediction (and a weaker near-duplicate) decodes to the box
    the YOLO equations give, in pixels of the model input; NMS keeps one; scaled to the original."""
    num_classes, size = 2, 128
    anchors = torch.tensor(DEFAULT_ANCHORS)
    outs = [torch.full((1, 3, size // s, size // s, 5 + num_classes), -12.0) for s in STRIDES]
    # Stride 16 (scale 1), anchor 1 of that scale = anchor 4 overall; cell (x=3, y=5).
    p = outs[1][0, 1, 5, 3]
    p[0:4] = 0.0  # sigmoid 0.5: centre 2*0.5-0.5 = +0.5 cell; size (2*0.5)^2 = 1 x anchor
    p[4], p[5 + 1] = 8.0, 8.0  # objectness and class 1
    q = outs[1][0, 1, 5, 4]  # the next cell predicting nearly the same box (0.2 cells right), less confident
    q[0:4], q[4], q[5 + 1] = 0.0, 2.0, 8.0
    q[0] = float(torch.logit(torch.tensor(0.1)))  # centre 2 * 0.1 - 0.5 + 4 = 3.7 cells
    cx, cy = (3 + 0.5) * 16, (5 + 0.5) * 16
    w, h = anchors[4, 0].item() * size, anchors[4, 1].item() * size
    expected = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]])
    dets = postprocess(decode(outs, anchors, (size, size)), score_threshold=0.05, iou_threshold=0.45)
    assert len(dets) == 1 and dets[0]["labels"].tolist() == [1]
    torch.testing.assert_close(dets[0]["boxes"], expected, atol=1e-3, rtol=0)
    assert dets[0]["scores"][0] > 0.99
    # Without NMS both predictions are there: suppression did the work.
    many = postprocess(decode(outs, anchors, (size, size)), score_threshold=0.05, iou_threshold=1.0)
    assert len(many[0]["boxes"]) == 2
    # Back to a 256 x 512 (h x w) original the model saw resized to 128 x 128.
    back = scale_boxes(dets[0]["boxes"], (size, size), (256, 512))
    torch.testing.assert_close(back, expected * torch.tensor([4.0, 2.0, 4.0, 2.0]))


# ------------------------------------------------------------------------- loss, overfit
def _toy_image(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, size, size, generator=g) * 0.2 + 0.4
    t = torch.tensor([[0, 0.3, 0.3, 0.2, 0.25], [1, 0.7, 0.6, 0.3, 0.2], [0, 0.75, 0.2, 0.1, 0.12]])
    for (c, *_), (x1, y1, x2, y2) in zip(t.tolist(), _gt_xyxy(t, size).round().int().tolist()):
        img[0, :, y1:y2, x1:x2] = 0.05 if c == 0 else 0.9
    return img, t


def test_loss_falls_and_overfitting_one_image_reaches_a_high_map():
    torch.manual_seed(0)
    size = 96
    img, t = _toy_image(size)
    model = create_model("resnet18_yolo", num_classes=2, in_chans=3)
    loss_fn = YoloLoss(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    losses = []
    for _ in range(80):
        model.train()
        opt.zero_grad()
        loss, parts = loss_fn(model(img), [t], model.anchors, (size, size))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert parts["positives"] == 3
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5]), losses[::10]
    recalibrate_batchnorm(model, [img])
    dets = detect(model, img, score_threshold=0.05)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(dets, [{"boxes": _gt_xyxy(t, size), "labels": t[:, 0].long()}])
    result = metric.compute()
    assert result["map_50"] >= 0.9, {k: float(v) for k, v in result.items() if v.numel() == 1}


def test_loss_without_objects_only_teaches_background():
    model = create_model("resnet18_yolo", num_classes=2, in_chans=1)
    loss, parts = YoloLoss(2)(model(torch.rand(2, 1, 64, 64)), [torch.zeros(0, 5)] * 2, model.anchors, (64, 64))
    assert parts["positives"] == 0 and parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0
    loss.backward()


def test_kmeans_anchors_fit_the_boxes_better_than_the_coco_default():
    _, boxes = synthetic_conveyor(40, 128, seed=3)
    wh = np.concatenate(boxes)[:, 3:5]
    anchors = fit_anchors(wh, k=9, seed=0)
    assert anchors.shape == (9, 2) and np.all(np.diff(anchors.prod(1)) >= 0)
    assert anchor_fitness(wh, anchors) > anchor_fitness(wh, np.asarray(DEFAULT_ANCHORS)) + 0.05
    create_model("resnet18_yolo", num_classes=2, anchors=anchors.tolist())  # usable as model anchors


# ----------------------------------------------------------------------------- readers
def test_yolo_and_coco_readers_agree_on_the_same_boxes(tmp_path):
    images, boxes = synthetic_conveyor(5, 96, seed=2)
    write_yolo(tmp_path / "yolo", images, boxes, ["coal", "gangue"])
    yolo = read_yolo(tmp_path / "yolo")
    assert yolo.class_names == ["coal", "gangue"] and len(yolo) == 5
    for i in range(5):
        np.testing.assert_allclose(yolo.boxes(i), boxes[i], atol=1e-5)
    coco_file = write_coco(tmp_path / "yolo" / "instances.json", yolo)
    # COCO's pixel [x, y, w, h] is a different encoding of the same boxes.
    ann = json.loads(coco_file.read_text())["annotations"][0]
    x1, y1, x2, y2 = yolo_to_xyxy(boxes[0][:1], 96, 96)[0]
    np.testing.assert_allclose(ann["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
    coco = read_coco(coco_file)
    assert coco.class_names == yolo.class_names
    assert list(coco.frame["path"]) == list(yolo.frame["path"])
    for i in range(5):
        np.testing.assert_allclose(coco.boxes(i), yolo.boxes(i), atol=1e-5)
        assert (tmp_path / "yolo" / coco.frame["path"].iloc[i]).exists()


def test_malformed_labels_name_the_file_and_line(tmp_path):
    images, boxes = synthetic_conveyor(2, 64, seed=1)
    write_yolo(tmp_path, images, boxes, ["coal", "gangue"])
    (tmp_path / "labels" / "000001.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 abc 0.1 0.1\n")
    with pytest.raises(DetectionFormatError, match=r"labels/000001.txt line 2: not numbers"):
        read_yolo(tmp_path)
    (tmp_path / "labels" / "000001.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DetectionFormatError, match=r"000001.txt line 1: class ids must be integers in 0..1"):
        read_yolo(tmp_path)
    (tmp_path / "labels" / "000001.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DetectionFormatError, match="expected 'class cx cy w h'"):
        read_yolo(tmp_path)
    bad = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
           "annotations": [{"id": 5, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2]}],
           "categories": [{"id": 1, "name": "coal"}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DetectionFormatError, match="annotation 5: category_id 9 is not in 'categories'"):
        read_coco(tmp_path / "bad.json")


# ------------------------------------------------------------------------- augmentation
def _blob_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((96, 96, 3), np.uint8)
    x1, y1 = rng.integers(10, 50, 2)
    w, h = rng.integers(12, 30, 2)
    img[y1:y1 + h, x1:x1 + w] = 255
    return img, np.asarray([[0, (x1 + w / 2) / 96, (y1 + h / 2) / 96, w / 96, h / 96]], np.float32)


def test_box_aware_augmentation_moves_boxes_with_the_image():
    """One white rectangle on black: after each random flip/affine the returned box still frames the
    white pixels (the pixels and the coordinates went through the same transform)."""
    rng = np.random.default_rng(0)
    policy = detection_policy("conveyor", seed=0)
    moved = 0
    for _ in range(20):
        img, boxes = _blob_scene(rng)
        out, new = augment_detection(policy, img, boxes)
        assert len(new) == 1 and new[0, 0] == 0
        ys, xs = np.nonzero(out[:, :, 0] > 127)
        seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
        box = yolo_to_xyxy(new, 96, 96)[0]
        inter = np.clip(np.minimum(seen[2:], box[2:]) - np.maximum(seen[:2], box[:2]), 0, None).prod()
        union = np.prod(seen[2:] - seen[:2]) + np.prod(box[2:] - box[:2]) - inter
        assert inter / union > 0.75, (seen, box)  # a rotated rectangle's box is a bit larger than it
        moved += not np.allclose(new, boxes, atol=1e-3)
    assert moved >= 10  # the policy did move most boxes


def test_detection_batch_resizes_pads_and_keeps_normalised_boxes():
    images, boxes = synthetic_conveyor(3, 80, seed=5)
    batch = {"image": np.array([encode_png(i) for i in images], dtype=object),
             "boxes": np.array([json.dumps(b.tolist()) for b in boxes], dtype=object)}
    out = detection_batch(batch, image_size=64, in_chans=3, policy=None)
    assert out["image"].shape == (3, 3, 64, 64) and out["image"].dtype == np.float32
    assert out["targets"].shape[0] == 3 and out["orig_size"].tolist() == [[80, 80]] * 3
    for i in range(3):
        np.testing.assert_allclose(unpad_boxes(out["targets"][i]), boxes[i], atol=1e-5)
    json_boxes = boxes_from_json(json.dumps(boxes[0].tolist()))
    np.testing.assert_allclose(json_boxes, boxes[0])


# --------------------------------------------------------------------------- evaluation
def test_detection_metrics_score_perfect_and_shifted_predictions(tmp_path):
    from components.evaluate.detection import detection_metrics, save_pr_curves

    _, boxes = synthetic_conveyor(6, 64, seed=4)
    gts = [{"boxes": _gt_xyxy(torch.from_numpy(b), 64), "labels": torch.from_numpy(b[:, 0]).long()} for b in boxes]
    perfect = [dict(g, scores=torch.ones(len(g["labels"]))) for g in gts]
    m = detection_metrics(perfect, gts, ["coal", "gangue"])
    assert m["map_50"] == pytest.approx(1.0) and m["map_50_95"] == pytest.approx(1.0)
    assert set(m["ap_50_per_class"]) <= {"coal", "gangue"} and min(m["ap_50_per_class"].values()) == pytest.approx(1.0)
    assert sum(m["num_boxes"].values()) == sum(len(b) for b in boxes)
    # Every box moved by 30 % of its width: IoU below 0.75, still above 0.5 for most.
    shifted = []
    for g in perfect:
        b = g["boxes"].clone()
        dx = 0.3 * (b[:, 2] - b[:, 0])
        b[:, 0] += dx
        b[:, 2] += dx
        shifted.append(dict(g, boxes=b))
    s = detection_metrics(shifted, gts, ["coal", "gangue"])
    assert s["map_50_95"] < 0.6 and s["map_50"] > s["map_50_95"]
    assert save_pr_curves(m, tmp_path / "pr.png").stat().st_size > 0
    curve = m["pr_curve_50"]["coal"]
    assert len(curve["recall"]) == len(curve["precision"]) == 101


def test_predictions_are_drawn_on_test_images(tmp_path):
    import pandas as pd

    from components.evaluate.detection import predict_frame, save_prediction_grid

    images, boxes = synthetic_conveyor(3, 64, seed=6)
    frame = pd.DataFrame({"image": [encode_png(i) for i in images], "boxes": [json.dumps(b.tolist()) for b in boxes]})
    model = create_model("resnet18_yolo", num_classes=2, in_chans=3, width=0.25)
    meta = {"image_size": 64, "in_chans": 3, "class_names": ["coal", "gangue"]}
    preds, gts = predict_frame(model, frame, meta, score_threshold=0.0)
    assert len(preds) == len(gts) == 3 and all(len(g["boxes"]) == len(b) for g, b in zip(gts, boxes))
    path = save_prediction_grid(model, frame, meta, tmp_path / "pred.png", n=3, score_threshold=0.0, columns=2)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (512, 512)


# ------------------------------------------------------------------------------ pruning
def test_detector_prunes_structured_and_unstructured_and_reloads(tmp_path):
    import pandas as pd

    from components.models.checkpoint import save_sparse, save_structured
    from components.prune.structured import count_macs_params, structured_prune
    from components.prune.unstructured import apply_global_magnitude, make_permanent, sparsity_report
    from components.train.detect import finetune_detector

    meta = {"model_name": "resnet18_yolo", "num_classes": 2, "in_chans": 3, "image_size": 64,
            "class_names": ["coal", "gangue"], "model_kwargs": {"width": 0.5}}
    x = torch.rand(1, 3, 64, 64)
    # Structured: half the MACs gone, every head keeps its anchors x (5 + classes) outputs.
    model = create_model("resnet18_yolo", 2, 3, width=0.5)
    macs0, params0 = count_macs_params(model, x)
    report = structured_prune(model, x, ratio=0.5, target="macs", importance="l1")
    macs1, params1 = count_macs_params(model, x)
    assert abs(1 - macs1 / macs0 - 0.5) < 0.03 and params1 < params0 and report.macs_after == macs1
    assert [tuple(o.shape) for o in model.eval()(x)] == [(1, 3, 64 // s, 64 // s, 7) for s in STRIDES]
    save_structured(tmp_path / "s.pt", model, meta)
    loaded, _ = load_model(tmp_path / "s.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x)[1], model(x)[1])
    # Unstructured: 60 % of the convolution weights zeroed, kept zero by fine-tuning, stored sparsely.
    model = create_model("resnet18_yolo", 2, 3, width=0.5)
    apply_global_magnitude(model, 0.6)
    images, boxes = synthetic_conveyor(8, 64, seed=9)
    frame = pd.DataFrame({"image": [encode_png(i) for i in images], "boxes": [json.dumps(b.tolist()) for b in boxes]})
    losses = finetune_detector(model, frame, image_size=64, in_chans=3, epochs=2, batch_size=4, lr=2e-4, max_steps=3,
                               threads=1)
    assert len(losses) == 3 and all(np.isfinite(losses))
    make_permanent(model)
    assert abs(sparsity_report(model)["target_sparsity_measured"] - 0.6) < 0.01
    save_sparse(tmp_path / "u.npz", model, meta)
    save_model(tmp_path / "dense.pt", model, meta)
    assert (tmp_path / "u.npz").stat().st_size < 0.75 * (tmp_path / "dense.pt").stat().st_size
    sparse, _ = load_model(tmp_path / "u.npz")
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(x)[0], model.eval()(x)[0])
