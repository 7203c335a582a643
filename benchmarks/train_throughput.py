"""Training throughput: the resops Ray Train loop (1 and 2 workers, real Ray Data pipeline with
online augmentation) against a plain single-process PyTorch loop, same model, image size and
batch size, in one run. Also measures the data pipeline alone, to show it is not the limit.

    python benchmarks/train_throughput.py [--images 960] [--image-size 64] [--batch-size 32]

Prints a table and writes benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components.augment.operator import AugmentOperator
from components.data.prepare import prepare_dataset
from components.data.shards import read_shards, write_shards
from components.data.sources import get_source
from components.models import create_model
from components.train import fit, image_dataset

ROOT = Path(__file__).resolve().parent


def elpv_train_subset(n: int, work: Path, seed: int = 42) -> Path:
    """The first ``n`` images of ELPV's training split as shards (the real data, real decoding)."""
    prepared = work / "prepared"
    get_source("elpv").ingest(work / "raw")
    prepare_dataset(work / "raw", prepared, "elpv", "4class", seed=seed)
    train = read_shards(prepared / "shards", split="train").sample(n=n, random_state=seed)
    write_shards(train, work / "subset", rows_per_shard=256)
    return work / "subset"


def plain_loop(shards: Path, image_size: int, batch_size: int, threads: int, steps: int, augment: bool) -> float:
    """A plain PyTorch loop in this process: images decoded up front (augmentation in the loop if asked)."""
    torch.set_num_threads(threads)
    df = read_shards(shards)
    op = AugmentOperator("industrial" if augment else None, "tensor", image_size, seed=0)
    raw = {"image": df["image"].to_numpy(), "label": df["label"].to_numpy()}
    pre = None if augment else op(raw)
    model = create_model("resnet18", 4, 1).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    n = len(df)
    done, t0 = 0, None
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            t0, done = time.perf_counter(), 0
        idx = np.random.default_rng(step).choice(n, batch_size, replace=False)
        if augment:
            b = op({"image": raw["image"][idx], "label": raw["label"][idx]})
        else:
            b = {"image": pre["image"][idx], "label": pre["label"][idx]}
        x = torch.from_numpy(b["image"]).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(b["label"])
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        done += batch_size
    return done / (time.perf_counter() - t0)


def data_pipeline_only(shards: Path, image_size: int, batch_size: int) -> float:
    ds = image_dataset(shards, None, policy="industrial", image_size=image_size, in_chans=1, seed=0,
                       cpus_per_task=0.5, batch_size=batch_size)
    ds.materialize()  # warm the read path once; the timed pass streams again
    t0, n = time.perf_counter(), 0
    for b in ds.iter_torch_batches(batch_size=batch_size):
        n += len(b["label"])
    return n / (time.perf_counter() - t0)


def ray_train(shards: Path, work: Path, image_size: int, batch_size: int, workers: int, epochs: int) -> dict:
    threads = max(1, 2 // workers)
    cfg = dict(model_name="resnet18", num_classes=4, class_names=["0", "1", "2", "3"], in_chans=1,
               image_size=image_size, epochs=epochs, batch_size=batch_size, lr=1e-3, weight_decay=0.05,
               label_smoothing=0.1, shuffle_buffer=0, class_weights=None, threads_per_worker=threads, seed=0,
               wandb={"mode": "disabled"}, run_name=f"bench-{workers}w-{time.time_ns()}")
    t0 = time.perf_counter()
    res = fit(cfg, shards, shards, work / "ckpt", work / f"model-{workers}.pt", num_workers=workers,
              cpus_per_worker=1.0 / workers, data_cpus=0.5, max_failures=0, online_policy="industrial")
    wall = time.perf_counter() - t0
    steady = res.history[-1]["images_per_second"]  # the last epoch: no start-up in it
    return {"images_per_second": steady, "wall_seconds": wall, "threads_per_worker": threads,
            "cpus_per_worker": 1.0 / workers, "per_epoch": [h["images_per_second"] for h in res.history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--plain-steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "results" / "train_throughput.json"))
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

    import ray
    import ray.data

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = elpv_train_subset(args.images, work)
        rows = {}
        rows["plain PyTorch, decoded in memory, 2 threads"] = plain_loop(
            shards, args.image_size, args.batch_size, 2, args.plain_steps, augment=False)
        rows["plain PyTorch, augmenting in the loop, 2 threads"] = plain_loop(
            shards, args.image_size, args.batch_size, 2, args.plain_steps, augment=True)
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        data_only = data_pipeline_only(shards, args.image_size, args.batch_size)
        r1 = ray_train(shards, work, args.image_size, args.batch_size, 1, args.epochs)
        r2 = ray_train(shards, work, args.image_size, args.batch_size, 2, args.epochs)
        ray.shutdown()

    base = rows["plain PyTorch, decoded in memory, 2 threads"]
    table = [(name, v, v / base) for name, v in rows.items()]
    table += [("Ray Data pipeline alone (decode + augment, no model)", data_only, data_only / base),
              ("resops Ray Train, 1 worker x 2 threads", r1["images_per_second"], r1["images_per_second"] / base),
              ("resops Ray Train, 2 workers x 1 thread (DDP, gloo)", r2["images_per_second"], r2["images_per_second"] / base)]
    print(f"\nResNet18, {args.image_size}x{args.image_size} grayscale, batch {args.batch_size}, {args.images} ELPV "
          f"training images, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'configuration':60s} {'img/s':>8s} {'vs plain':>9s}")
    for name, v, ratio in table:
        print(f"{name:60s} {v:8.1f} {ratio:8.2f}x")
    result = {
        "benchmark": "train_throughput", "image_size": args.image_size, "batch_size": args.batch_size,
        "images": args.images, "epochs": args.epochs, "cpus": os.cpu_count(), "torch": torch.__version__,
        "ray": ray.__version__, "machine": platform.machine(),
        "results": {name: {"images_per_second": v, "ratio_to_plain": ratio} for name, v, ratio in table},
        "ray_train_1_worker": r1, "ray_train_2_workers": r2,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
