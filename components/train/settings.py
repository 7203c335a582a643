"""The classifier training loop's settings: one dict, every key required.

:func:`loop_config` builds it from params.yaml's typed sections (the train stage's path); benchmarks
and tests that train with other settings write every key too. :func:`check_loop_config` (called by
:func:`components.train.fit`) names the keys a hand-built dict lacks, so no setting silently falls
back to a value the loop would otherwise assume.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from components import ResopsError
from components.config import ModelConfig, TrainConfig

# What train_loop_per_worker reads; fit adds the data (files or row count), online_policy, run_name.
LOOP_KEYS = ("model_name", "model_kwargs", "num_classes", "class_names", "in_chans", "image_size", "epochs",
             "batch_size", "lr", "weight_decay", "label_smoothing", "shuffle_buffer", "class_weights",
             "threads_per_worker", "seed", "wandb", "freeze_backbone_epochs", "backbone_lr_scale", "pretrained",
             "precision", "data_cache", "schedule", "warmup", "budget_minutes", "ema_decay", "mix", "max_pixels")


def check_loop_config(cfg: Mapping) -> None:
    missing = [k for k in LOOP_KEYS if k not in cfg]
    if missing:
        raise ResopsError(f"the training config lacks {', '.join(missing)}: every key of "
                          "components.train.settings.LOOP_KEYS is required (loop_config builds them from params)")


def loop_config(train: TrainConfig, model: ModelConfig, *, class_names: Sequence[str], in_chans: int, seed: int,
                class_weights: Sequence[float] | None, wandb: Mapping, max_pixels: int,
                pretrained: str | None = None) -> dict:
    """The loop's settings from the ``train`` and ``model`` sections and what the data says (classes,
    channels, class weights). ``pretrained``: a resolved weights file, or None to start from scratch."""
    kwargs = dict(model.kwargs) | ({"head": model.head} if model.head != "softmax" else {})
    return {
        "model_name": model.name, "model_kwargs": kwargs, "num_classes": len(class_names),
        "class_names": list(class_names), "in_chans": int(in_chans), "image_size": model.image_size,
        "epochs": train.epochs, "batch_size": train.batch_size, "lr": train.lr, "weight_decay": train.weight_decay,
        "label_smoothing": train.label_smoothing, "shuffle_buffer": train.shuffle_buffer,
        "class_weights": list(class_weights) if class_weights else None,
        "threads_per_worker": train.threads_per_worker, "seed": int(seed), "wandb": dict(wandb),
        "freeze_backbone_epochs": train.freeze_backbone_epochs, "backbone_lr_scale": train.backbone_lr_scale,
        "pretrained": pretrained, "precision": train.precision, "data_cache": train.data_cache,
        "schedule": train.schedule, "warmup": train.warmup, "budget_minutes": train.budget_minutes,
        "ema_decay": train.ema_decay, "mix": train.mix.model_dump(), "max_pixels": int(max_pixels),
    }


# The loop's options that a plain run leaves off (no fine-tuning, budget, EMA, mixing, warm-up, class
# weights, model options): for benchmarks and tests that train outside params.yaml, spelled out once.
RECIPE_OFF = {"model_kwargs": {}, "class_weights": None, "freeze_backbone_epochs": 0, "backbone_lr_scale": 1.0,
              "pretrained": None, "budget_minutes": None, "ema_decay": None,
              "mix": {"mixup": 0.0, "cutmix": 0.0, "prob": 1.0}, "warmup": 0.0}
