"""The per-worker training loop run by Ray Train (and the single-epoch helpers prune re-uses)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from components.evaluate.metrics import summary_from_confusion
from components.models.checkpoint import save_model, unwrap
from components.models.registry import create_model
from components.models.transfer import backbone_parameters, head_parameters, load_pretrained

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def model_meta(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("model_name", "num_classes", "in_chans", "image_size", "class_names")} | {
        "model_kwargs": cfg.get("model_kwargs", {})}


def autocast(device: torch.device):
    """bfloat16/float16 autocast on GPU; a no-op on CPU (CPU autocast slows ResNet18 down here)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_one_epoch(model: nn.Module, batches, optimizer, loss_fn, device: torch.device, scaler=None,
                    max_steps: int | None = None, frozen: list[nn.Parameter] | None = None,
                    loss_takes_inputs: bool = False) -> dict:
    """One pass over ``batches`` (dicts with float ``image`` NCHW and int ``label``).

    ``loss_takes_inputs``: call ``loss_fn(logits, y, inputs=x)`` (a distillation loss runs its
    teacher on the batch) instead of ``loss_fn(logits, y)``.

    ``frozen`` parameters get no update: their gradients are dropped before the optimizer step
    (AdamW skips a parameter without a gradient). Dropping rather than ``requires_grad=False``
    keeps DDP's gradient buckets identical on every epoch.
    """
    model.train()
    seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = model(x)
            loss = loss_fn(logits, y, inputs=x) if loss_takes_inputs else loss_fn(logits, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for param in frozen or ():
            param.grad = None
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        n = len(y)
        seen += n
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == y).sum())
    dt = time.perf_counter() - t0
    return {"samples": seen, "loss_sum": loss_sum, "correct": correct, "seconds": dt}


@torch.no_grad()
def confusion(model: nn.Module, batches, num_classes: int, device: torch.device) -> tuple[np.ndarray, float, int]:
    """Confusion matrix (rows = true), summed loss and count over ``batches``."""
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum, n = 0.0, 0
    for batch in batches:
        x = batch["image"].to(device).contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device)
        with autocast(device):
            logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        n += len(y)
        idx = (y.cpu() * num_classes + logits.argmax(1).cpu())
        cm += torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return cm.numpy(), loss_sum, n


def _all_reduce(values: list[float] | np.ndarray, device: torch.device) -> np.ndarray:
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.cpu().numpy()


class _WandbSink:
    """Per-epoch metrics to wandb from rank 0; offline unless the user configured a key."""

    def __init__(self, cfg: dict):
        self.run = None
        wb = cfg.get("wandb") or {}
        if wb.get("mode", "offline") == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(wb.get("dir", "wandb")).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=wb.get("project", "resops"), mode=wb.get("mode", "offline"),
                              dir=wb.get("dir"), id=cfg["run_name"], resume="allow", name=cfg["run_name"],
                              config={k: v for k, v in cfg.items() if k not in ("wandb", "class_weights")},
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def progress(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver once.

    Ray Train V2 patches ``print`` into its own logger, which reaches the console several
    times over; writing to the file descriptor keeps one readable line per epoch.
    """
    os.write(1, (line + "\n").encode())


def restore_checkpoint(checkpoint, model: nn.Module) -> dict:
    """Load a Ray Train checkpoint's weights into ``model``; return its training state
    (optimizer, epoch, history, and what else the loop saved)."""
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)["state_dict"])
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def report_epoch(record: dict, model: nn.Module, cfg: dict, rank: int, epoch: int, state) -> None:
    """``ray.train.report`` one epoch's metrics; rank 0 attaches the checkpoint ``epoch_NNNN``: the
    model file and ``state()`` (the training state, built only on rank 0)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_model(Path(tmp) / MODEL_FILE, model, model_meta(cfg))
            torch.save(state(), Path(tmp) / STATE_FILE)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(record, checkpoint=None)


def train_loop_per_worker(cfg: dict) -> None:
    """Ray Train worker entry point: DDP ResNet training with a checkpoint every epoch.

    On (re)start the loop resumes from ``ray.train.get_checkpoint()``: the model, optimizer,
    scheduler and the metric history of the epochs already done.
    """
    import ray.train
    import ray.train.torch

    torch.set_num_threads(int(cfg["threads_per_worker"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(int(cfg["seed"]) + rank)

    model = create_model(cfg["model_name"], cfg["num_classes"], cfg["in_chans"], **cfg.get("model_kwargs", {}))
    checkpoint = ray.train.get_checkpoint()
    if cfg.get("pretrained") and not checkpoint:  # a resumed run has its own weights
        report = load_pretrained(model, cfg["pretrained"], in_chans=cfg["in_chans"])
        if rank == 0:
            progress("[train] " + report.summary().replace("\n", "\n[train] "))
    model = model.to(memory_format=torch.channels_last)
    epochs = int(cfg["epochs"])
    # Fine-tuning: the backbone may learn at a fraction of the head's rate, or not at all for the
    # first `freeze_backbone_epochs` epochs (linear probing before full fine-tuning).
    backbone, head = backbone_parameters(model), head_parameters(model)
    lr, scale = float(cfg["lr"]), float(cfg.get("backbone_lr_scale", 1.0))
    freeze_epochs = int(cfg.get("freeze_backbone_epochs", 0))
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": lr * scale}, {"params": head, "lr": lr}],
                                  lr=lr, weight_decay=float(cfg["weight_decay"]))
    warmup = min(1, epochs - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # 1 warm-up epoch, then cosine to 0 over the rest
        optimizer, lambda e: (e + 1) / (warmup + 1) if e < warmup else
        0.5 * (1 + math.cos(math.pi * (e - warmup + 1) / (epochs - warmup + 1))))
    start_epoch, history = 0, []
    if checkpoint:
        state = restore_checkpoint(checkpoint, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]) + 1, json.loads(state["history"])
        if rank == 0:
            progress(f"[train] resuming from the checkpoint of epoch {start_epoch} of {epochs}")
    model = ray.train.torch.prepare_model(model)
    weights = cfg.get("class_weights")
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
                                  label_smoothing=float(cfg["label_smoothing"]))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    sink = _WandbSink(cfg) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    dtypes = {"image": torch.float32, "label": torch.int64}
    k = cfg["num_classes"]
    for epoch in range(start_epoch, epochs):
        batches = train_shard.iter_torch_batches(batch_size=int(cfg["batch_size"]), dtypes=dtypes,
                                                 local_shuffle_buffer_size=int(cfg.get("shuffle_buffer", 0)) or None,
                                                 drop_last=False, prefetch_batches=2)
        tr = train_one_epoch(model, batches, optimizer, loss_fn, device, scaler,
                             frozen=backbone if epoch < freeze_epochs else None)
        lr = optimizer.param_groups[-1]["lr"]  # the head's
        scheduler.step()
        cm, vloss, vn = confusion(model, val_shard.iter_torch_batches(batch_size=128, dtypes=dtypes), k, device)
        tot = _all_reduce([tr["samples"], tr["loss_sum"], tr["correct"], vloss, vn, *cm.ravel()], device)
        samples = max(1.0, tot[0])
        val = summary_from_confusion(tot[5:].reshape(k, k))
        record = {
            "epoch": epoch + 1, "start_epoch": start_epoch, "lr": lr,
            "train_loss": tot[1] / samples, "train_accuracy": tot[2] / samples,
            "val_loss": tot[3] / max(1.0, tot[4]), "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
            "images_per_second": tot[0] / max(tr["seconds"], 1e-9) if world == 1 else
            float(_all_reduce([tr["samples"] / max(tr["seconds"], 1e-9)], device)[0]),
        }
        record = {key: (float(v) if isinstance(v, (np.floating, float)) else v) for key, v in record.items()}
        history.append(record)
        if rank == 0:
            progress(f"[train] epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.3f}  "
                  f"acc {record['train_accuracy']:.3f}  val_loss {record['val_loss']:.3f}  "
                  f"val_acc {record['val_accuracy']:.3f}  val_bal_acc {record['val_balanced_accuracy']:.3f}  "
                  f"val_f1 {record['val_macro_f1']:.3f}  {record['images_per_second']:.1f} img/s  lr {lr:.2e}")
            sink.log(record, step=epoch + 1)
        report_epoch(record, model, cfg, rank, epoch, lambda: {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
            "history": json.dumps(history)})
    if sink is not None:
        sink.finish()
