"""Plain PyTorch ELPV baseline: the single-file script an ML engineer would write *without* resops.

It is the baseline arm of benchmarks/accuracy.py and deliberately imports nothing from
``components`` or ``pipelines``. Recipe: torchvision ResNet18 from scratch (1-channel conv1,
4-class head), labels round(3 * probability), the same stratified 75/25 train/test split as resops
(seed 42), training on the whole 75% (no validation split), AdamW with a cosine schedule over a
wall-clock budget, label smoothing, flip/rotation/brightness/contrast augmentation, evaluation on
the test split at the end (no TTA).

    python benchmarks/plain_baseline.py --minutes 12 --seed 42 [--image-size 128] [--precision fp32] [--out r.json]

or ``from benchmarks.plain_baseline import run; run(minutes=12)``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import elpv_dataset
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, matthews_corrcoef,
                             recall_score)
from sklearn.model_selection import train_test_split
from torchvision.models import resnet18
from torchvision.transforms import v2

CLASS_NAMES = ["functional", "possibly_defective", "likely_defective", "defective"]
DATA_DIR = Path(elpv_dataset.__file__).parent / "data"


def read_labels() -> tuple[list[str], np.ndarray]:
    """labels.csv rows in file order: (relative image paths, 4-class labels round(3 * probability))."""
    df = pd.read_csv(DATA_DIR / "labels.csv", sep=r"\s+", header=None, names=["path", "probability", "cell_type"])
    return df["path"].tolist(), np.rint(df["probability"].to_numpy() * 3).astype(int)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stratified 75/25 train/test split (seed 42, stratified on the 4-class label)."""
    return train_test_split(np.arange(len(labels)), test_size=0.25, random_state=42, stratify=labels)


def load_images(paths: list[str], image_size: int) -> torch.Tensor:
    """Every image decoded once, grayscale, resized with antialiasing: uint8 [N, 1, S, S]."""
    images = []
    for rel in paths:
        img = torch.from_numpy(np.array(Image.open(DATA_DIR / rel).convert("L"))).unsqueeze(0)
        images.append(v2.functional.resize(img, [image_size, image_size], antialias=True))
    return torch.stack(images)


def make_model() -> nn.Module:
    model = resnet18(weights=None, num_classes=len(CLASS_NAMES))
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model.to(memory_format=torch.channels_last)


def run(minutes: float, seed: int = 42, image_size: int = 128, precision: str = "fp32", threads: int = 2,
        batch_size: int = 32) -> dict:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    paths, labels_np = read_labels()
    train_idx, test_idx = split_indices(labels_np)
    images, labels = load_images(paths, image_size), torch.from_numpy(labels_np)
    x_train, y_train = images[train_idx], labels[train_idx]
    mean, std = (x_train.float() / 255).mean().item(), (x_train.float() / 255).std().item()

    def to_input(batch_uint8: torch.Tensor) -> torch.Tensor:
        x = (batch_uint8.float() / 255 - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(10),
                          v2.ColorJitter(brightness=0.1, contrast=0.1)])
    model = make_model()
    lr0 = 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr0, weight_decay=0.05)
    budget = minutes * 60.0

    # Train until the wall-clock budget is spent; the lr follows a cosine over elapsed / budget.
    model.train()
    seen, steps, elapsed = 0, 0, 0.0
    start = time.perf_counter()
    while elapsed < budget:
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            lr = 0.5 * lr0 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = to_input(torch.stack([augment(img) for img in x_train[batch]]))
            with autocast():
                loss = F.cross_entropy(model(x), y_train[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen, steps = seen + len(batch), steps + 1
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break

    # Evaluate on the test split (not counted in the training time).
    model.eval()
    preds = []
    with torch.no_grad(), autocast():
        for i in range(0, len(test_idx), 128):
            preds.append(model(to_input(images[test_idx[i:i + 128]])).argmax(1))
    y_pred, y_true = torch.cat(preds).numpy(), labels[test_idx].numpy()
    recall = recall_score(y_true, y_pred, labels=range(len(CLASS_NAMES)), average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
        "binary_accuracy": float(np.mean((y_pred >= 2) == (y_true >= 2))),
        "per_class_recall": {name: float(r) for name, r in zip(CLASS_NAMES, recall)},
        "epochs": seen / len(x_train),
        "steps": steps,
        "images_per_s": seen / elapsed,
        "train_minutes": elapsed / 60,
        "precision": precision,
        "seed": seed, "image_size": image_size, "threads": threads, "batch_size": batch_size, "budget_minutes": minutes,
        "num_train": len(train_idx), "num_test": len(test_idx),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--seed", type=int, default=42, help="training seed (the split seed is always 42)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the result dict as JSON here")
    args = parser.parse_args()
    r = run(args.minutes, args.seed, args.image_size, args.precision, args.threads, args.batch_size)
    print(f"plain baseline: acc {r['accuracy']:.4f}  bal_acc {r['balanced_accuracy']:.4f}  macro_f1 {r['macro_f1']:.4f}  "
          f"mcc {r['mcc']:.4f}  bin_acc {r['binary_accuracy']:.4f}  epochs {r['epochs']:.2f}  "
          f"{r['images_per_s']:.1f} img/s  {r['train_minutes']:.2f} min  {r['precision']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
