"""Detector training on Ray Train: the datasets, the per-worker loop and the mAP evaluation it
reports every epoch. :func:`components.train.trainer.fit` picks this loop for detection models
(``model_task(name) == "detect"``), so checkpoints, resume, storage paths and run names are the
classifier's.

Each epoch: one pass of YOLOv3 loss (:class:`components.models.detector.YoloLoss`) with AdamW
(linear warm-up over the first ``warmup_steps`` steps, cosine decay over epochs), then mAP@0.5 and
mAP@0.5:0.95 on the validation shard (torchmetrics' ``MeanAveragePrecision``, pycocotools backend;
synchronised across workers by torchmetrics), a checkpoint (model, optimizer, step, history) and
``ray.train.report``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from components.models.checkpoint import unwrap
from components.models.detector import YoloLoss, decode, postprocess
from components.models.registry import create_model
from components.evaluate.detection_metrics import compute_quietly, map_summary, new_map_metric, target_dicts, targets_list
from components.train.precision import autocast, grad_scaler
from components.train.worker import (BoardPoster, WandbSink, Worker, progress, report_epoch, restore_checkpoint,
                                     start_worker)

DETECTION_COLUMNS = ["image", "boxes", "split"]


def detection_dataset(shards_dir: str | Path, split: str | None, *, policy: str | None, image_size: int,
                      in_chans: int, seed: int | None, cpus_per_task: float, batch_size: int = 32):
    """A Ray Dataset of float images and padded targets (:func:`components.augment.detection.detection_batch`)."""
    import ray.data

    from components.augment.detection import detection_batch
    from components.data.shards import shard_files

    ds = ray.data.read_parquet(shard_files(shards_dir), columns=DETECTION_COLUMNS, num_cpus=cpus_per_task)
    if split:
        ds = ds.filter(expr=f"split == '{split}'")
    return ds.map_batches(detection_batch, batch_format="numpy", batch_size=batch_size, num_cpus=cpus_per_task,
                          fn_kwargs=dict(image_size=image_size, in_chans=in_chans, policy=policy, seed=seed))


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches, device: torch.device, *, score_threshold: float = 0.001,
                     iou_threshold: float = 0.6, max_detections: int = 100, metric=None,
                     precision: str = "fp32") -> tuple[object, int]:
    """Update a torchmetrics mAP metric with the model's detections on ``batches`` (dicts with
    ``image`` and padded ``targets``); returns (metric, images). Low score threshold: mAP integrates
    over the whole precision-recall curve."""
    metric = metric if metric is not None else new_map_metric()
    model.eval()
    anchors = unwrap(model).anchors
    n = 0
    for batch in batches:
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        hw = tuple(x.shape[-2:])
        with autocast(device, precision):
            outs = model(x)
        dets = postprocess(decode([o.float() for o in outs], anchors, hw), score_threshold=score_threshold,
                           iou_threshold=iou_threshold, max_detections=max_detections, image_hw=hw)
        metric.update([{k: v.cpu() for k, v in d.items()} for d in dets], target_dicts(batch["targets"].cpu(), hw))
        n += len(x)
    return metric, n


def _lr_factor(step: int, epoch: int, epochs: int, warmup_steps: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))  # per epoch, to 0 after the last
    return warm * max(cos, 0.02)


def _train_epoch(model, batches, optimizer, loss_fn, scaler, w: Worker, *, lr: float, epoch: int, epochs: int,
                 warmup: int, step: int, tick) -> dict:
    """One pass of YOLOv3 loss over ``batches`` (gradients clipped to norm 10); ``tick(step)`` after
    every step. Returns the images seen, summed loss and box / obj / cls parts, steps done, seconds."""
    model.train()
    anchors = unwrap(model).anchors
    t0, seen, loss_sum, parts_sum = time.perf_counter(), 0, 0.0, np.zeros(3)
    for batch in batches:
        for g in optimizer.param_groups:
            g["lr"] = lr * _lr_factor(step, epoch, epochs, warmup)
        x = batch["image"].to(w.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast(w.device, w.precision):
            outs = model(x)
        loss, parts = loss_fn([o.float() for o in outs], targets_list(batch["targets"].to(w.device)), anchors,
                              tuple(x.shape[-2:]))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(optimizer) if scaler is not None else optimizer.step()
        if scaler is not None:
            scaler.update()
        step += 1
        tick(step)
        seen += len(x)
        loss_sum += float(loss.detach()) * len(x)
        parts_sum += np.array([parts["box"], parts["obj"], parts["cls"]]) * len(x)
    return {"seen": seen, "loss_sum": loss_sum, "parts_sum": parts_sum, "step": step,
            "seconds": time.perf_counter() - t0}


def _epoch_line(record: dict, epochs: int) -> str:
    return (f"[train] epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.3f} (box "
            f"{record['train_box_loss']:.3f} obj {record['train_obj_loss']:.3f} cls "
            f"{record['train_cls_loss']:.3f})  val mAP@0.5 {record['val_map_50']:.3f}  mAP@0.5:0.95 "
            f"{record['val_map_50_95']:.3f}  {record['images_per_second']:.1f} img/s  lr {record['lr']:.2e}")


def detect_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker entry point for detectors (see the module docstring); resumes from
    ``ray.train.get_checkpoint()`` like the classifier loop."""
    import ray.train
    import ray.train.torch

    w = start_worker(cfg)
    torch.manual_seed(int(cfg["seed"]) + w.rank)
    model = create_model(cfg["model_name"], cfg["num_classes"], cfg["in_chans"], **cfg.get("model_kwargs", {}))
    model = model.to(memory_format=torch.channels_last)
    epochs, lr = int(cfg["epochs"]), float(cfg["lr"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=float(cfg["weight_decay"]))
    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = restore_checkpoint(checkpoint, model)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = int(state["epoch"]) + 1, int(state["step"]), json.loads(state["history"])
        if w.rank == 0:
            progress(f"[train] resuming from the checkpoint of epoch {start_epoch} of {epochs}")
    model = ray.train.torch.prepare_model(model)
    loss_fn = YoloLoss(cfg["num_classes"], **cfg.get("loss", {}))
    scaler = grad_scaler(w.device, w.precision)
    sink = WandbSink(cfg) if w.rank == 0 else None
    dtypes = {"image": torch.float32, "targets": torch.float32, "orig_size": torch.int64}
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    post = BoardPoster(cfg, w.rank)  # the driver's bar (components.progress)
    steps_per_epoch = max(1, int(cfg.get("train_rows", 0)) // w.world // int(cfg["batch_size"]))
    for epoch in range(start_epoch, epochs):
        batches = train_shard.iter_torch_batches(batch_size=int(cfg["batch_size"]), dtypes=dtypes,
                                                 local_shuffle_buffer_size=int(cfg["shuffle_buffer"]) or None,
                                                 prefetch_batches=2)
        tr = _train_epoch(model, batches, optimizer, loss_fn, scaler, w, lr=lr, epoch=epoch, epochs=epochs,
                          warmup=int(cfg["warmup_steps"]), step=step,
                          tick=lambda s: post(lambda: min(1.0, s / (epochs * steps_per_epoch)),
                                              lambda: f"epoch {epoch + 1}/{epochs}"))
        step, seen = tr["step"], tr["seen"]
        metric, _ = evaluate_batches(model, val_shard.iter_torch_batches(batch_size=32, dtypes=dtypes), w.device,
                                     precision=w.precision)
        val = map_summary(compute_quietly(metric))  # torchmetrics gathers every worker's state
        record = {"epoch": epoch + 1, "start_epoch": start_epoch, "lr": optimizer.param_groups[0]["lr"],
                  "train_loss": tr["loss_sum"] / max(seen, 1),
                  **{f"train_{k}_loss": float(v) / max(seen, 1)
                     for k, v in zip(("box", "obj", "cls"), tr["parts_sum"])},
                  "val_map_50": val["map_50"], "val_map_50_95": val["map_50_95"],
                  "images_per_second": seen * w.world / max(tr["seconds"], 1e-9), "precision": w.precision}
        history.append(record)
        if w.rank == 0:
            progress(_epoch_line(record, epochs))
            sink.log(record, step=epoch + 1)
        report_epoch(record, model, cfg, w.rank, epoch, lambda: {
            "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "history": json.dumps(history)})
    if sink is not None:
        sink.finish()


def finetune_detector(model: torch.nn.Module, frame, *, image_size: int, in_chans: int, epochs: int,
                      batch_size: int, lr: float, weight_decay: float = 5e-4, policy: str | None = None,
                      max_steps: int | None = None, seed: int = 0, threads: int = 2) -> list[float]:
    """In-process fine-tuning of a (pruned) detector on the rows of ``frame`` (``image`` bytes and
    ``boxes`` JSON): YOLOv3 loss, AdamW, constant ``lr``. Unstructured pruning's masks stay in place
    (torch.nn.utils.prune re-parametrisation), so pruned weights stay zero. Returns the per-step
    losses; leaves the model in eval mode."""
    from components.augment.detection import detection_batch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = unwrap(model)
    loss_fn = YoloLoss(base.num_classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    losses, step = [], 0
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(frame))
        for i in range(0, len(order), batch_size):
            part = frame.iloc[order[i:i + batch_size]]
            batch = detection_batch({"image": part["image"].to_numpy(), "boxes": part["boxes"].to_numpy()},
                                    image_size=image_size, in_chans=in_chans, policy=policy, seed=seed)
            x = torch.from_numpy(batch["image"]).contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            loss, _ = loss_fn(model(x), targets_list(torch.from_numpy(batch["targets"])), base.anchors,
                              tuple(x.shape[-2:]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if max_steps is not None and step >= max_steps:
                model.eval()
                return losses
    model.eval()
    return losses
