"""The classification pipeline's params sections (params.yaml), one model each.

Field comments are short; params.yaml carries the full explanation of every key.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from components.config.base import (CascadeTarget, ClassWeight, EdgeMethod, Head, Mode, Precision, Schedule, Section,
                                    SelectBy, Tta, WandbMode)

Frac = Annotated[float, Field(ge=0, le=1)]
NonNeg = Annotated[float, Field(ge=0)]
Pos = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]


# ------------------------------------------------------------------------------ runtime
class RayConfig(Section):
    address: str | None
    num_cpus: Count | None
    include_dashboard: bool
    resources: dict[str, float]
    worker_niceness: int = Field(ge=0, le=19)
    data_progress_bars: Literal["auto"] | bool
    env: dict[str, str]


class ClusterConfig(Section):
    address: str | None
    submit: list[str]
    artifacts: str | None
    workdir: str | None
    entrypoint_num_cpus: NonNeg
    submit_timeout_s: Pos
    excludes: list[str]
    env_vars: dict[str, str]


class WandbConfig(Section):
    mode: WandbMode
    project: str
    dir: str


# ------------------------------------------------------------------------------ data
class FolderSource(Section):
    path: str | None


class SyntheticSource(Section):
    num_images: Count
    image_size: int = Field(ge=8)
    num_classes: int = Field(ge=2)
    imbalance: Frac


class CwtConfig(Section):
    wavelet: str
    freqs: tuple[float, float]
    num_scales: Count
    out_size: tuple[int, int]
    log: bool


class EegSynthetic(Section):
    n_per_set: Count


class EegConfig(Section):
    path: str | None
    channel: str | int | None
    fs: Pos
    length: Count
    window: Count
    overlap: NonNegInt
    reassemble_per_class: NonNegInt
    parts: Count
    synthetic: EegSynthetic
    cwt: CwtConfig


class DataConfig(Section):
    dataset: str
    task: str
    in_chans: Literal[1, 3]
    test_size: float = Field(gt=0, lt=1)
    val_size: float = Field(ge=0, lt=1)
    skip_corrupt: bool
    extra: list[str]
    rows_per_shard: Count
    max_image_pixels: Count
    folder: FolderSource
    synthetic: SyntheticSource
    eeg: EegConfig


class AugmentConfig(Section):
    policy: str  # a registered policy (components.augment.policies): checked where it is built
    offline_copies: NonNegInt
    online: bool
    cpus_per_task: Pos


class SmoteConfig(Section):
    size: int = Field(ge=8)
    k_neighbors: Count


class RebalanceConfig(Section):
    strategy: str  # e.g. random_over, random_under+gan: parsed by components.rebalance.parse_strategy
    target_ratio: float | dict[str, float]
    class_weight: ClassWeight
    smote: SmoteConfig
    gan_size: int | None


class GanQuality(Section):
    samples_per_class: Count
    image_size: int = Field(ge=8)
    epochs: Count
    max_fd: float | None
    max_fd_ratio: float | None
    min_class_accuracy: float | None
    min_relative_class_accuracy: float | None


class GanConfig(Section):
    """``gan``: what :func:`components.rebalance.gan.train_gan` trains with."""

    image_size: int = Field(ge=8)
    precision: Precision
    epochs: Count
    batch_size: Count
    lr: Pos
    lr_d: Pos | None  # None: lr
    betas: tuple[float, float]
    loss: Literal["hinge", "bce"]
    z_dim: Count
    base_channels: Count
    d_steps: Count
    num_workers: Count
    cpus_per_worker: Pos
    threads_per_worker: Count
    max_failures: NonNegInt
    keep_checkpoints: Count
    storage_path: str
    quality: GanQuality

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v


# ------------------------------------------------------------------------------ model and training
class ModelConfig(Section):
    name: str  # a registered architecture (components.models): checked where it is built
    head: Head
    image_size: int = Field(ge=8)
    kwargs: dict
    pretrained: str | None


class MixConfig(Section):
    mixup: NonNeg
    cutmix: NonNeg
    prob: Frac


class TrainConfig(Section):
    epochs: Count
    batch_size: Count
    lr: Pos
    weight_decay: NonNeg
    label_smoothing: float = Field(ge=0, lt=1)
    freeze_backbone_epochs: NonNegInt
    backbone_lr_scale: NonNeg
    precision: Precision
    data_cache: Literal["memory", "stream"]
    schedule: Schedule
    warmup: float = Field(ge=0, lt=1)
    budget_minutes: Pos | None
    ema_decay: Annotated[float, Field(gt=0, lt=1)] | None
    mix: MixConfig
    select_by: SelectBy
    decision_bias: Literal["none", "balanced_accuracy", "macro_f1"]
    shuffle_buffer: NonNegInt  # 0: no local shuffle
    num_workers: Count
    cpus_per_worker: Pos
    threads_per_worker: Count
    use_gpu: bool
    max_failures: NonNegInt
    keep_checkpoints: Count
    storage_path: str


# ------------------------------------------------------------------------------ compression, evaluation
class StructuredPrune(Section):
    target: Literal["macs", "params"]
    ratio: float = Field(ge=0, lt=1)
    importance: str
    global_pruning: bool


class DistillConfig(Section):
    enabled: bool
    temperature: Pos
    alpha: Frac


class QuantizeConfig(Section):
    enabled: bool
    calibration_images: Count
    per_channel: bool
    reduce_range: bool


class PruneConfig(Section):
    method: EdgeMethod
    sparsity: float = Field(ge=0, lt=1)
    scope: Literal["global", "layer"]
    steps: Count
    include_fc: bool
    structured: StructuredPrune
    distill: DistillConfig
    finetune_epochs: NonNegInt
    finetune_lr: Pos
    finetune_max_steps: Count | None
    quantize: QuantizeConfig


class EvaluateConfig(Section):
    batch_size: Count
    tta: Tta
    gradcam_per_cell: NonNegInt


class Gates(Section):
    min_accuracy: float | None
    min_balanced_accuracy: float | None
    min_macro_f1: float | None
    min_gain_over_majority: float | None
    compare_metric: str
    max_regression: float | None


class PromoteConfig(Section):
    gates: Gates


# ------------------------------------------------------------------------------ serving
class TierConfig(Section):
    num_replicas: Count
    autoscaling: dict | None
    max_batch_size: Count
    batch_wait_timeout_s: NonNeg
    threads: Count
    num_cpus: NonNeg
    resources: dict[str, float]


class EdgeTierConfig(TierConfig):
    backend: Literal["auto", "onnx", "torch"]
    placement: Literal["auto", "ingress", "replica"]


class RouterConfig(Section):
    num_cpus: NonNeg
    max_ongoing_requests: Count


class FeedbackConfig(Section):
    enabled: bool
    location: str
    rate: Frac
    max_bytes: Count
    queue_size: Count
    seed: int | None


class DriftConfig(Section):
    enabled: bool
    threshold: Pos
    window: int = Field(ge=2)
    components: Count
    embed_rate: Frac
    check_every: Count


class CascadeConfig(Section):
    threshold: Frac | None
    target: CascadeTarget
    value: NonNeg
    confidence_level: Annotated[float, Field(gt=0, lt=1)] | None
    temperature_scaling: bool
    ece_bins: Count


class ServeConfig(Section):
    host: str
    port: int = Field(ge=1, le=65535)
    default_mode: Mode
    max_body_bytes: Count
    max_image_pixels: Count
    min_image_side: Count
    max_batch_images: Count
    auth_token_env: str | None
    edge: EdgeTierConfig
    cloud: TierConfig
    router: RouterConfig
    feedback: FeedbackConfig
    drift: DriftConfig
    cascade: CascadeConfig


# ------------------------------------------------------------------------------ the file
class ClassifyConfig(Section):
    """params.yaml of the classification pipeline, section by section."""

    seed: int
    ray: RayConfig
    cluster: ClusterConfig
    data: DataConfig
    augment: AugmentConfig
    rebalance: RebalanceConfig
    gan: GanConfig
    model: ModelConfig
    train: TrainConfig
    wandb: WandbConfig
    prune: PruneConfig
    evaluate: EvaluateConfig
    promote: PromoteConfig
    serve: ServeConfig
