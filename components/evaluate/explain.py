"""Where the model looked: Grad-CAM heat maps (Captum's ``LayerGradCam``) for the ResNet18 family.

Grad-CAM (Selvaraju et al. 2017) weights the feature maps of the last convolutional stage by the
gradient of the target class score, sums them, keeps the positive part and upsamples it to the input.
Captum computes it; this module picks the layer, turns the result into heat maps in [0, 1] at the
input's size, draws them over the image, and lays out the evaluate stage's grid.

Every classifier of the model zoo (resnet18, se_resnet18, resnet18_simam, resnet18_k2) and the
channel-pruned edge model are torchvision ResNets: the layer is the output of a residual stage,
``layer4`` (Grad-CAM's usual choice) unless the input is so small that its map would have fewer than
4 cells a side (:func:`cam_layer`). The int8 ONNX edge model has no gradients: its explanation is the
torch edge model's, the file it was quantized from.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

NORM_MEAN, NORM_STD = 127.5, 63.75  # components.augment.resize.normalise


MIN_CAM_SIDE = 4  # a heat map of fewer cells per side shows little (ResNet18's layer4 at 64 px is 2 x 2)


def cam_layer(model: nn.Module, input_size: int | None = None) -> tuple[str, nn.Module]:
    """``(name, layer)`` whose activations Grad-CAM weighs: the deepest residual stage (``layer4``, then
    ``layer3``, ``layer2``: 1/32, 1/16, 1/8 of the input side) whose map is at least ``MIN_CAM_SIDE``
    cells on a side for an ``input_size`` input (None: ``layer4``, Grad-CAM's usual choice). At 224 px
    that is layer4 (7 x 7); at the default 64 px, layer3 (4 x 4)."""
    m = getattr(model, "module", model)  # through a DDP wrapper
    stages = [(name, getattr(m, name, None), stride) for name, stride in (("layer4", 32), ("layer3", 16),
                                                                          ("layer2", 8))]
    if not all(isinstance(layer, nn.Module) for _, layer, _ in stages):
        raise ValueError(f"Grad-CAM needs a ResNet-family classifier (layer2..layer4); got {type(m).__name__}")
    for name, layer, stride in stages:
        if input_size is None or input_size // stride >= MIN_CAM_SIDE:
            return name, layer
    return stages[-1][0], stages[-1][1]


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | int | None = None,
            layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps and class probabilities of a float input batch ``x`` (N, C, H, W, normalised as in training).

    ``target``: the class to explain per image (an int or a length-N tensor); None: the predicted class.
    ``layer``: the layer's name (``layer2``..``layer4``); None: :func:`cam_layer`'s choice for this input size.
    Returns ``(cams, probs)``: cams (N, H, W) float32 in [0, 1] (each map divided by its maximum; all
    zero when no location raises the class score), probs (N, K) the model's softmax.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        x = x.detach().float()
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=1)
        if target is None:
            target = probs.argmax(1)
        elif isinstance(target, int):
            target = torch.full((len(x),), target, dtype=torch.long)
        module = (getattr(getattr(model, "module", model), layer) if layer
                  else cam_layer(model, min(x.shape[-2:]))[1])
        with torch.enable_grad():
            attr = LayerGradCam(model, module).attribute(x, target=target, relu_attributions=True)
        cams = LayerAttribution.interpolate(attr.detach().float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    finally:
        model.train(was_training)
    cams = cams[:, 0].clamp_min(0).numpy()
    peak = cams.reshape(len(cams), -1).max(1)
    cams = np.where(peak[:, None, None] > 0, cams / np.maximum(peak, 1e-12)[:, None, None], 0.0)
    return cams.astype(np.float32), probs.numpy()


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A normalised CHW model input back to the uint8 HxWxC image the model saw."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip(a.transpose(1, 2, 0) * NORM_STD + NORM_MEAN, 0, 255).round().astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, colormap: str = "jet") -> np.ndarray:
    """The heat map ``cam`` (h, w in [0, 1]) drawn over ``image`` (uint8 HxW or HxWxC): uint8 HxWx3.
    The map is resized to the image (bilinear), so it can be drawn over the picture as it was sent."""
    import cv2
    from matplotlib import colormaps

    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    h, w = img.shape[:2]
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape != (h, w):
        cam = cv2.resize(cam, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = colormaps[colormap](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1.0 - alpha) * img.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def collect_examples(model: nn.Module, batches, num_classes: int, per_cell: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """From ``{"image", "label"}`` batches, the first ``per_cell`` correctly and the first ``per_cell``
    wrongly classified inputs of every true class (stops reading once every cell is full).
    Returns (inputs (M, C, H, W), true labels (M,), kind (M,): 1 right, 0 wrong)."""
    kept: dict[tuple[int, int], list[torch.Tensor]] = {(c, r): [] for c in range(num_classes) for r in (0, 1)}
    model.eval()
    for b in batches:
        x, y = b["image"].float(), b["label"].long()
        with torch.no_grad():
            pred = model(x).argmax(1)
        for xi, yi, pi in zip(x, y.tolist(), pred.tolist()):
            cell = kept.get((yi, int(yi == pi)))
            if cell is not None and len(cell) < per_cell:
                cell.append(xi)
        if all(len(v) == per_cell for v in kept.values()):
            break
    xs, ys, kinds = [], [], []
    for (c, r), items in sorted(kept.items()):
        xs += items
        ys += [c] * len(items)
        kinds += [r] * len(items)
    if not xs:
        raise ValueError("no examples to explain: the split is empty")
    return torch.stack(xs), np.array(ys), np.array(kinds)


def gradcam_grid(model: nn.Module, batches, class_names: list[str], path: str | Path, *, per_cell: int = 4,
                 title: str = "") -> dict:
    """One row per true class: up to ``per_cell`` correctly classified images, then up to ``per_cell``
    wrong ones, each with the Grad-CAM map of its predicted class over the input the model saw.

    ``batches``: ``{"image", "label"}`` torch batches of normalised inputs (the evaluate stage's test
    split). Writes a PNG at ``path``; returns per class how many right and wrong examples it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    x, y, kind = collect_examples(model, batches, k, per_cell)
    cams, probs = gradcam(model, x)
    pred = probs.argmax(1)
    cols = 2 * per_cell
    fig, axes = plt.subplots(k, cols, figsize=(1.6 * cols, 1.8 * k + 0.6), squeeze=False)
    shown = {}
    for c in range(k):
        right = [i for i in range(len(y)) if y[i] == c and kind[i] == 1]
        wrong = [i for i in range(len(y)) if y[i] == c and kind[i] == 0]
        shown[class_names[c]] = {"right": len(right), "wrong": len(wrong)}
        cells = right + [None] * (per_cell - len(right)) + wrong + [None] * (per_cell - len(wrong))
        for j, i in enumerate(cells):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(class_names[c], fontsize=8)
            if i is None:
                ax.set_frame_on(False)
                continue
            ax.imshow(overlay(to_uint8(x[i]), cams[i]))
            p = int(pred[i])
            ok = kind[i] == 1
            ax.set_title(f"{'ok' if ok else 'as ' + class_names[p][:14]} {probs[i, p]:.2f}", fontsize=7,
                         color="darkgreen" if ok else "firebrick")
    layer = cam_layer(model, min(x.shape[-2:]))[0]
    fig.suptitle((title + "\n" if title else "") + f"Grad-CAM ({layer}) of the predicted class (rows: true class; "
                 f"left {per_cell}: correct, right {per_cell}: wrong)", fontsize=9)
    from components.evaluate.report import save_figure

    save_figure(fig, path)
    return shown
