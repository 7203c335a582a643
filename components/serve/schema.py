"""The HTTP schema of the serving app: pydantic models for every response, shown in OpenAPI (/docs)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PredictResponse(BaseModel):
    """One classification: the winning class and the softmax probability of every class."""

    label: str = Field(description="name of the most probable class")
    label_index: int = Field(description="index of the most probable class in the model's output")
    probabilities: dict[str, float] = Field(description="softmax probability per class name; sums to 1")
    model_version: str = Field(description="version label of the model that answered (registry version)")
    model_name: str = Field(description="architecture of the model that answered, e.g. resnet18")
    latency_ms: float = Field(description="server-side time from receiving the body to the answer, in ms")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model_version: str
    model_name: str


class ModelInfo(BaseModel):
    """What the served model expects and answers."""

    model_name: str
    model_version: str
    class_names: list[str]
    num_classes: int
    image_size: int = Field(description="images are resized to image_size x image_size before inference")
    in_chans: int = Field(description="1: images are converted to grayscale; 3: to RGB")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one message naming what is wrong with the request."""

    error: str


# Documented error answers of POST /predict (status code -> when).
PREDICT_ERRORS: dict[int, str] = {
    400: "empty body, empty uploaded file, bad Content-Length or malformed multipart body",
    413: "body larger than max_body_bytes, or an image with more pixels than max_image_pixels "
         "(decompression bomb)",
    415: "the bytes are not a decodable image (unknown format, corrupt or truncated)",
    422: "multipart/form-data request without a 'file' field",
}
