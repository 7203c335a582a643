"""The HTTP schema of the serving app: pydantic models for every response, shown in OpenAPI (/docs)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

MODES = ("edge", "cloud", "cascade")


class PredictResponse(BaseModel):
    """One classification: which tier answered, why, and the calibrated probability of every class."""

    label: str = Field(description="name of the most probable class")
    label_index: int = Field(description="index of the most probable class in the model's output")
    probabilities: dict[str, float] = Field(
        description="temperature-calibrated softmax probability per class name, from the tier that answered")
    tier: Literal["edge", "cloud"] = Field(description="the tier whose model gave this answer")
    mode: Literal["edge", "cloud", "cascade"] = Field(description="the routing mode of this request")
    escalated: bool = Field(description="cascade: the edge was not confident enough and the cloud answered")
    edge_confidence: float | None = Field(
        description="the edge model's calibrated top probability (null in cloud mode)")
    threshold: float | None = Field(description="cascade: escalate when edge_confidence is below this")
    model_name: str = Field(description="architecture of the model that answered, e.g. resnet18")
    model_versions: dict[str, str] = Field(description="registry version of each tier consulted")
    batch_size: dict[str, int] = Field(
        description="per tier consulted: how many requests shared the forward pass this one was part of")
    latency_ms: dict[str, float] = Field(
        description="per tier consulted: time of the call as the router saw it; total: router time, in ms")
    degraded: bool = Field(False, description="edge runtime (`resops edge`): the input should have gone to the "
                                              "cloud, which was unreachable or too slow; the edge answered it and "
                                              "queued the input to resend")
    degraded_reason: str | None = Field(None, description="why the cloud did not answer (degraded answers only)")


class BatchPredictResponse(BaseModel):
    """A JSON batch: one answer per image, in the order sent."""

    predictions: list[PredictResponse]
    latency_ms: float = Field(description="server-side time for the whole batch, in ms")


class SignalPredictResponse(BaseModel):
    """A signal: its windows classified as scalograms, and the answer averaged over them."""

    label: str = Field(description="most probable class of the mean probabilities over the windows")
    label_index: int
    probabilities: dict[str, float] = Field(description="mean over the windows of each class's probability")
    num_windows: int = Field(description="windows the signal was cut into, as the prepare stage cut recordings")
    window_seconds: float = Field(description="length of one window in seconds")
    windows: list[PredictResponse] = Field(description="the answer for each window, in time order")
    latency_ms: float = Field(description="server-side time, scalograms included, in ms")


class Detection(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the image as sent")
    label: str
    label_index: int
    score: float = Field(description="objectness x class probability")


class DetectResponse(BaseModel):
    """One image's detections, highest score first, and which tier found them."""

    detections: list[Detection]
    image_size: list[int] = Field(description="height, width of the image as sent")
    tier: Literal["edge", "cloud"] = Field(description="the tier whose detector gave these boxes")
    mode: Literal["edge", "cloud", "cascade"]
    escalated: bool = Field(description="cascade: the edge found an uncertain box (score_threshold <= score < "
                                        "threshold) and the cloud detector answered")
    score_threshold: float
    iou_threshold: float
    model_name: str
    model_versions: dict[str, str]
    latency_ms: dict[str, float]


class BatchDetectResponse(BaseModel):
    predictions: list[DetectResponse]
    latency_ms: float


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    default_mode: str
    model_versions: dict[str, str]


class CloudLink(BaseModel):
    """The edge runtime's view of the cloud app it escalates to."""

    url: str | None = Field(description="the cloud app's base URL (null: standalone, nothing escalates)")
    available: bool | None = Field(description="false after a failed call until a resend succeeds; null before "
                                               "the first call")
    last_error: str | None = None
    timeout_s: float


class OutboxStats(BaseModel):
    """Escalated inputs the cloud did not answer, kept on disk and resent oldest first."""

    pending: int = Field(description="inputs waiting to be resent")
    pending_bytes: int
    max_items: int
    max_bytes: int
    queued: int = Field(description="inputs queued since the runtime started")
    resent: int = Field(description="queued inputs the cloud has answered since the runtime started")
    dropped: int = Field(description="oldest inputs dropped because the outbox was full")
    refused: int = Field(description="queued inputs the cloud refused for good (413/415/422)")
    recent: list[dict] | None = Field(None, description="the latest resent inputs: the edge's and the cloud's label")


class EdgeHealthResponse(HealthResponse):
    """The edge runtime answers whenever its own model is loaded, with or without the cloud."""

    cloud: CloudLink
    outbox: OutboxStats | None = Field(description="null when no cloud URL is configured")


class TierInfo(BaseModel):
    """One tier: its model, files and how its probabilities are calibrated."""

    tier: str
    model_name: str
    model_version: str
    backend: str = Field(description="torch, or onnxruntime for the int8 edge model")
    files: dict[str, str] = Field(description="file name -> sha256 of the model files this tier runs")
    temperature: float = Field(description="temperature scaling fitted on the validation split (1 = none)")
    class_names: list[str]
    num_classes: int
    image_size: int = Field(description="images are resized to image_size x image_size before inference")
    in_chans: int = Field(description="1: images are converted to grayscale; 3: to RGB")
    task: Literal["classify", "detect"] = Field("classify", description="classify: POST /predict; detect: POST /detect")
    placement: Literal["replica", "ingress"] = Field(
        "replica", description="replica: the tier's own deployment; ingress: the edge model runs in the HTTP ingress "
                               "replica (one hop for an edge answer)")


class ModelsResponse(BaseModel):
    """What the app serves: both tiers, the default mode and the cascade's calibrated threshold."""

    default_mode: str
    threshold: float
    edge: TierInfo
    cloud: TierInfo
    calibration: dict | None = Field(
        default=None, description="validation-split calibration: temperatures, ECE before/after, threshold choice")
    model_card: dict | None = Field(
        default=None, description="the model card of the served version (models/serve/model_card.json, also as "
                                  "MODEL_CARD.md): data and licence, intended use, test metrics with 95% intervals, "
                                  "calibration, edge compression, cascade, known limitations")


class ExplainResponse(BaseModel):
    """Where the cloud model looked: its answer and a Grad-CAM heat map over the image."""

    label: str = Field(description="name of the most probable class (cloud tier)")
    label_index: int
    probabilities: dict[str, float] = Field(description="temperature-calibrated softmax probability per class")
    explained_class: str = Field(description="the class whose Grad-CAM map is drawn: the predicted one")
    method: Literal["grad-cam"] = "grad-cam"
    layer: str = Field(description="the layer whose activations Grad-CAM weighs (the last residual stage)")
    heatmap_png: str = Field(description="base64 PNG: the heat map (jet colours, red = most evidence) over the "
                                         "image as sent, at most 512 pixels on its long side; with `Accept: "
                                         "image/png` the PNG is the whole answer")
    heatmap_size: list[int] = Field(description="height, width of the PNG")
    model_name: str
    model_version: str
    latency_ms: dict[str, float] = Field(description="cloud: the tier call; total: router time, in ms")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one message naming what is wrong with the request."""

    error: str


# Documented error answers of POST /predict (status code -> when).
PREDICT_ERRORS: dict[int, str] = {
    400: "empty body, empty uploaded file, bad Content-Length, malformed multipart or JSON body, bad base64",
    401: "a token is configured and the request has no valid 'Authorization: Bearer <token>' header",
    413: "body larger than max_body_bytes, more images than max_batch_images, or an image with more pixels "
         "than max_image_pixels (decompression bomb)",
    415: "an unsupported content type, or bytes that are not a decodable image (unknown format, corrupt, truncated)",
    422: "multipart/form-data without a 'file' field, an image smaller than min_image_side, a bad mode or threshold",
}

# Documented error answers of POST /detect (the same checks as /predict; 404 on a classifier app).
DETECT_ERRORS: dict[int, str] = {**PREDICT_ERRORS, 404: "this app serves a classifier (POST /predict)",
                                 422: PREDICT_ERRORS[422] + ", a bad score_threshold or iou_threshold"}

# Documented error answers of POST /explain (one image; the checks of /predict).
EXPLAIN_ERRORS: dict[int, str] = {**PREDICT_ERRORS, 404: "this app serves a detector (POST /detect)",
                                  422: PREDICT_ERRORS[422] + ", a JSON batch of more than one image"}

# Documented error answers of POST /predict_signal.
SIGNAL_ERRORS: dict[int, str] = {
    400: "empty body, malformed JSON",
    401: "a token is configured and the request has no valid 'Authorization: Bearer <token>' header",
    404: "this app serves images only (it was not built from an EEG dataset)",
    413: "body larger than max_body_bytes, or more samples than the signal limit",
    415: "an unsupported content type, or bytes that are not a .npy array",
    422: "non-numeric, empty, NaN/inf or too short a signal, a sampling rate other than the model's, a bad mode",
}
