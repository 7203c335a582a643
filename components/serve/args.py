"""The Serve application's arguments, typed: what ``app_builder`` takes (Ray Serve validates a Serve
config's ``args`` into :class:`AppArgs` before calling it, as for any typed application builder).

Unknown keys fail (``extra="forbid"``), so a misspelt option in a Serve config or in params.yaml's
``serve`` section is an error at build time, not a silently ignored setting. The defaults here are
the library's only ones; ``components.serve.config.serve_args`` fills every field from params.yaml.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from components.data.images import DEFAULT_MAX_PIXELS
from components.http.requests import DEFAULT_MAX_BODY_BYTES
from components.http.schema import MODES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Deployment(_Strict):
    """Ray Serve deployment options of one deployment: replicas or autoscaling, CPUs, placement."""

    num_replicas: int = Field(1, ge=1)
    autoscaling_config: dict | None = None  # Serve's: replaces num_replicas
    num_cpus: float = Field(1.0, ge=0)
    resources: dict[str, float] | None = None  # Ray custom resources, e.g. {"edge": 0.01}
    max_ongoing_requests: int | None = Field(None, ge=1)  # None: twice the tier's max_batch_size


class TierSettings(Deployment):
    """One model tier: its batching and threads, and its deployment options."""

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> TierSettings:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        return self


class EdgeSettings(TierSettings):
    """The edge tier; ``placement``: ``ingress`` runs the int8 ONNX edge model inside the Router replicas
    (which then take these replicas, CPUs and resources), ``replica`` in its own deployment, ``auto``
    ingress for an ONNX classifier, else replica."""

    placement: Literal["auto", "ingress", "replica"] = "auto"


class RouterSettings(_Strict):
    """The HTTP ingress: it parses requests and awaits the tiers: many in flight, little CPU."""

    max_ongoing_requests: int = Field(256, ge=1)
    num_cpus: float = Field(0.1, ge=0)
    resources: dict[str, float] | None = None


class DetectionSettings(_Strict):
    """A detection app's defaults for ``POST /detect`` (a request may override the two thresholds)."""

    score_threshold: float = Field(0.25, ge=0, le=1)
    iou_threshold: float = Field(0.45, ge=0, le=1)
    max_detections: int = Field(100, ge=1)


class DriftArgs(_Strict):
    """``serve.drift``: the calibrate stage's reference file and the watch's settings."""

    reference: str
    threshold: float = Field(gt=0)
    embed_rate: float = Field(ge=0, le=1)
    check_every: int = Field(ge=1)


class AppArgs(_Strict):
    """Everything the Serve application is built from (a Serve config's ``args``).

    ``cloud_model`` is the full model; ``edge_model`` the edge model (default: the full model, so a
    model without a compressed twin still serves every mode), ``edge_onnx`` its int8 ONNX export.
    Relative paths are taken from ``base_dir`` (else ``$RESOPS_HOME``, else the working directory).
    ``signal`` (fs, window, overlap, cwt: the prepare stage's settings of an EEG dataset) adds
    ``POST /predict_signal``. ``files_sha256`` (file name -> sha256) pins the model files.
    ``feedback`` is ``serve.feedback``; ``drift`` adds the drift watch of ``GET /drift``.
    """

    cloud_model: str
    edge_model: str | None = None
    edge_onnx: str | None = None
    model_version: str = "unknown"
    edge_version: str | None = None
    cloud_version: str | None = None
    temperatures: dict[str, float] = Field(default_factory=dict)
    threshold: float = Field(0.5, ge=0, le=1)
    default_mode: str = "cascade"
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    min_image_side: int = Field(8, ge=1)
    max_batch_images: int = Field(64, ge=1)
    edge: EdgeSettings = Field(default_factory=EdgeSettings)
    cloud: TierSettings = Field(default_factory=TierSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    auth_token: str | None = None
    auth_token_env: str | None = None
    calibration: dict | None = None
    base_dir: str | None = None
    files_sha256: dict[str, str] | None = None
    signal: dict | None = None
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    model_card: dict | None = None
    feedback: dict | None = None
    drift: DriftArgs | None = None

    @field_validator("default_mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"default_mode must be one of {', '.join(MODES)}, got {mode!r}")
        return mode

    @field_validator("edge", "cloud", "router", "detection", mode="before")
    @classmethod
    def _none_is_default(cls, value):
        return {} if value is None else value
