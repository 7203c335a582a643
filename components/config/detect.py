"""The detection pipeline's params sections (pipelines/detect/params.yaml, ``pipeline: detect``).

The knobs it shares with the classification pipeline carry the same names (``augment.policy``,
``prune.structured.ratio``, ``serve.cascade.threshold``); the runtime sections are the same models.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from components.config.base import Mode, Precision, Section
from components.config.sections import Count, Frac, NonNeg, NonNegInt, Pos, RayConfig, WandbConfig


class SceneSource(Section):
    num_images: Count
    scene_size: int = Field(ge=32)
    min_objects: Count
    max_objects: Count


class DetectData(Section):
    dataset: Literal["synthetic_conveyor", "yolo", "coco"]
    path: str | None
    synthetic: SceneSource
    in_chans: Literal[1, 3]
    test_size: float = Field(gt=0, lt=1)
    val_size: float = Field(ge=0, lt=1)
    skip_corrupt: bool
    rows_per_shard: Count


class DetectAugment(Section):
    policy: str  # a box-aware policy (components.augment.detection): checked where it is built
    cpus_per_task: Pos


class DetectModel(Section):
    name: Literal["resnet18_yolo"]
    backbone: str
    width: Pos
    anchors: Literal["kmeans", "default"] | list[tuple[float, float]]
    image_size: int = Field(ge=32)


class DetectTrain(Section):
    epochs: Count
    batch_size: Count
    lr: Pos
    weight_decay: NonNeg
    warmup_steps: NonNegInt
    shuffle_buffer: NonNegInt  # 0: no local shuffle
    num_workers: Count
    cpus_per_worker: Pos
    threads_per_worker: Count
    precision: Precision
    use_gpu: bool
    max_failures: NonNegInt
    keep_checkpoints: Count
    storage_path: str


class DetectStructured(Section):
    target: Literal["macs", "params"]
    ratio: float = Field(ge=0, lt=1)
    importance: str


class DetectPrune(Section):
    method: Literal["unstructured", "structured", "none"]
    sparsity: float = Field(ge=0, lt=1)
    structured: DetectStructured
    finetune_epochs: NonNegInt
    finetune_lr: Pos


class DetectEvaluate(Section):
    score_threshold: Frac
    iou_threshold: Frac
    latency_runs: Count


class DetectPromote(Section):
    min_map_50: Annotated[float, Field(ge=0, le=1)] | None


class DetectCascade(Section):
    threshold: Frac


class DetectTier(Section):
    num_replicas: Count
    max_batch_size: Count
    threads: Count
    num_cpus: NonNeg


class DetectServe(Section):
    host: str
    port: int = Field(ge=1, le=65535)
    default_mode: Mode
    cascade: DetectCascade
    score_threshold: Frac
    iou_threshold: Frac
    max_detections: Count
    edge: DetectTier
    cloud: DetectTier


class DetectConfig(Section):
    """pipelines/detect/params.yaml, section by section."""

    pipeline: Literal["detect"]
    seed: int
    data: DetectData
    augment: DetectAugment
    model: DetectModel
    train: DetectTrain
    wandb: WandbConfig
    prune: DetectPrune
    evaluate: DetectEvaluate
    promote: DetectPromote
    serve: DetectServe
    ray: RayConfig
