"""The edge bundle: the int8 ONNX edge model and everything needed to use it without torch.

A directory holding the ONNX file and ``edge.json`` (validated by :class:`EdgeBundle`): class
names, input size and channels, the temperature fitted on the validation split, the cascade
threshold, the model version and the request limits of the cloud app. Copy the directory to the
device; ``resops edge --bundle DIR`` serves it. The ONNX file's sha256 is recorded and checked
on load, so a bundle never runs other weights than the ones it was calibrated with.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from components.data.images import DEFAULT_MAX_PIXELS
from components.http.requests import DEFAULT_MAX_BODY_BYTES

MANIFEST = "edge.json"


class EdgeBundle(BaseModel):
    """``edge.json``: what the edge runtime needs besides the ONNX file."""

    format: int = Field(1, description="bundle format version")
    onnx: str = Field(description="the ONNX file, relative to the bundle directory")
    sha256: str = Field(description="sha256 of the ONNX file")
    model_name: str
    model_version: str = Field(description="registry version of the promoted model")
    class_names: list[str] = Field(min_length=2)
    image_size: int = Field(gt=0)
    in_chans: int
    temperature: float = Field(gt=0, description="temperature scaling fitted on the validation split")
    threshold: float = Field(ge=0, le=1, description="cascade: escalate when the calibrated confidence is below")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    min_image_side: int = Field(8, ge=1)
    max_batch_images: int = Field(64, ge=1)
    drift_reference: str | None = Field(None, description="the drift reference (serve.drift), relative to the "
                                                          "bundle directory; None: no drift watch")
    drift_threshold: float | None = Field(None, gt=0, description="serve.drift.threshold")
    drift_check_every: int = Field(20, ge=1, description="serve.drift.check_every")

    @model_validator(mode="after")
    def _drift_threshold_with_reference(self) -> "EdgeBundle":
        if self.drift_reference and self.drift_threshold is None:
            raise ValueError("drift_reference needs drift_threshold (serve.drift.threshold)")
        return self

    @field_validator("in_chans")
    @classmethod
    def _chans(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {v}")
        return v


class BundleError(ValueError):
    """A bundle that cannot be served; the message names the file and the problem."""


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_bundle(directory: str | Path, onnx_path: str | Path, *, drift_reference: str | Path | None = None,
                 **fields) -> Path:
    """Copy ``onnx_path`` (and ``drift_reference``, if any) into ``directory`` and write ``edge.json``
    (``fields``: :class:`EdgeBundle`'s)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / Path(onnx_path).name
    shutil.copy2(onnx_path, target)
    if drift_reference is not None:
        shutil.copy2(drift_reference, directory / Path(drift_reference).name)
        fields["drift_reference"] = Path(drift_reference).name
    bundle = EdgeBundle(onnx=target.name, sha256=file_sha256(target), **fields)
    (directory / MANIFEST).write_text(json.dumps(bundle.model_dump(), indent=2) + "\n")
    return directory / MANIFEST


def load_bundle(path: str | Path) -> tuple[EdgeBundle, Path]:
    """``(manifest, ONNX file path)`` of a bundle directory (or its ``edge.json``), checked."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.exists():
        raise BundleError(f"edge bundle {manifest} does not exist: run `dvc repro` (the calibrate stage writes "
                          f"models/serve/edge/), then copy that directory to the device")
    try:
        bundle = EdgeBundle.model_validate_json(manifest.read_text())
    except ValidationError as exc:
        raise BundleError(f"edge bundle {manifest} is not valid: {exc}") from None
    onnx = manifest.parent / bundle.onnx
    if not onnx.exists():
        raise BundleError(f"edge bundle {manifest} names {bundle.onnx}, which is not in {manifest.parent}")
    if (found := file_sha256(onnx)) != bundle.sha256:
        raise BundleError(f"{onnx} has sha256 {found}, not {bundle.sha256} as {manifest} records: "
                          "the file was replaced after the bundle was written")
    return bundle, onnx
