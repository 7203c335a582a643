"""Cloud-edge collaborative inference on Ray Serve.

Deployments, composed with DeploymentHandles:

* ``Router`` -- the FastAPI ingress (OpenAPI at ``/docs``). With ``serve.edge.placement`` ingress
  (the default for an int8 ONNX edge classifier) it also runs the edge model itself
  (:class:`IngressEdge`, ONNX Runtime in a thread of the replica), so an edge answer crosses the
  proxy and one replica, and the image is decoded once: an escalation sends the cloud the decoded,
  preprocessed input;
* ``EdgeClassifier`` -- with placement replica (a torch edge model, a detector, or by choice): the
  edge model in its own deployment, several small replicas on ``edge`` nodes, batched;
* ``CloudClassifier`` -- the promoted full model with dynamic batching (``@serve.batch``), placed on
  ``cloud`` nodes.

Per request (``?mode=`` or the JSON field ``mode``) or by default: ``edge`` (edge only), ``cloud``
(cloud only) or ``cascade`` (edge first; the request escalates to the cloud when the edge's
calibrated confidence is below the threshold).

Every tier decodes and preprocesses each image exactly like training validation does
(``components.augment.resize.validation_tensor``), and reports temperature-calibrated
probabilities (the temperatures come from the validation split, see
``components.evaluate.calibration``).

HTTP API::

    POST /predict   an image: multipart field ``file``, or the raw bytes as the body (image/*,
                    application/octet-stream, or no content type) -> PredictResponse
                    a batch: application/json {"images": [base64, ...], "mode": ..., "threshold": ...}
                    -> BatchPredictResponse
    POST /detect    (an app of detector models) the same inputs -> boxes, classes and scores in the
                    image's pixels: DetectResponse / BatchDetectResponse; ``score_threshold``,
                    ``iou_threshold``; cascade escalates when the edge found a box scored below
                    ``threshold``
    GET  /healthz   both tiers answer -> HealthResponse (never needs a token: probes use it)
    GET  /models    the tiers, their files and versions, calibration, the cascade threshold

Errors are JSON ``{"error": "<what is wrong>"}`` and never take the server down:

    400  empty body, bad Content-Length, malformed multipart or JSON body, bad base64
    401  a token is configured and the request has no valid ``Authorization: Bearer <token>``
    413  body above ``max_body_bytes`` (Content-Length first, then the bytes received), more than
         ``max_batch_images`` images, or an image header declaring more than ``max_image_pixels``
         pixels (decompression bomb; refused before decoding)
    415  an unsupported content type, or bytes that are not a decodable image
    422  no ``file`` field, an image smaller than ``min_image_side``, a bad ``mode`` or ``threshold``
"""
# No `from __future__ import annotations` here: Serve ships the Router class to its replica by value
# (cloudpickle), with only the globals its code uses, so string annotations such as "Request" could
# not be resolved there and FastAPI would take `request` for a query parameter.

import asyncio
import copy
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle

from components.data.images import ImageDecodeError
from components.feedback.drift import DriftMonitor, input_histograms, load_reference
from components.registry import file_sha256
from components.http.requests import (PREDICT_BODY, PREDICT_PARAMS, STATUS_OF_REASON, UNDECODABLE, UNSUPPORTED, BadRequest,
                                   RequestReader, answer, check_image_header, decode_error, error,
                                   install_error_handlers, parse_mode, parse_threshold, refused)
from components.http.schema import (DETECT_ERRORS, EXPLAIN_ERRORS, MODES, PREDICT_ERRORS, SIGNAL_ERRORS,
                                     BatchDetectResponse, BatchPredictResponse, DetectResponse, ErrorResponse,
                                     ExplainResponse, HealthResponse, ModelsResponse, PredictResponse,
                                     SignalPredictResponse)

logger = logging.getLogger("ray.serve")

def read_model_info(model_path: str) -> dict:
    """Load a model file in this process to validate it; return its metadata.

    Raises ``CheckpointError`` naming the file and the problem (missing, malformed, weights that do
    not fit, class names that do not match the head), so a bad model fails at build time, not on
    the first request.
    """
    from components.models.checkpoint import CheckpointError, load_model

    _, meta = load_model(model_path)
    names = list(meta["class_names"])
    if len(names) != int(meta["num_classes"]):
        raise CheckpointError(f"model file {model_path}: {len(names)} class_names {names} "
                              f"but num_classes is {meta['num_classes']}")
    from components.models.registry import model_task

    return {"model_name": str(meta["model_name"]), "class_names": [str(n) for n in names],
            "num_classes": int(meta["num_classes"]), "image_size": int(meta["image_size"]),
            "in_chans": int(meta["in_chans"]), "task": model_task(str(meta["model_name"]))}


def check_files(sha256: dict | None, *paths: str | None) -> None:
    """Each model file has the sha256 recorded when the app was built (``CheckpointError`` if not):
    another node's copy, or a file replaced after the build, would make the reported version lie."""
    for path in filter(None, paths):
        expected = (sha256 or {}).get(Path(path).name)
        if expected and Path(path).exists() and (found := file_sha256(path)) != expected:
            from components.models.checkpoint import CheckpointError  # imports torch: only on this path

            raise CheckpointError(f"model file {path} on this node has sha256 {found}, "
                                  f"not {expected} as when the app was built")


def prediction(probs: np.ndarray, class_names: list[str], model_version: str, model_name: str, batch_size: int,
               start: float) -> dict:
    """A tier's answer for one image: its calibrated probabilities, the top class and its confidence."""
    index = int(np.argmax(probs))
    return {"label": class_names[index], "label_index": index, "confidence": float(probs[index]),
            "probabilities": {name: float(p) for name, p in zip(class_names, probs)},
            "model_version": model_version, "model_name": model_name, "batch_size": batch_size,
            "compute_ms": (time.perf_counter() - start) * 1000.0}


class IngressEdge:
    """The int8 ONNX edge model inside the ingress replica (``serve.edge.placement: ingress``).

    An edge answer then crosses the proxy and this one replica: the image is decoded here once, the
    edge model (ONNX Runtime, sub-millisecond, thread-safe) runs in a thread of the replica, and only
    an escalation calls the cloud deployment, with the decoded input, so the cloud does not decode
    again. Preprocessing is the tiers' (the validation transform of training). No torch here.
    """

    tier = "edge"

    def __init__(self, onnx_path: str, *, meta: dict, model_version: str, temperature: float = 1.0,
                 threads: int = 1, max_image_pixels: int = 50_000_000, min_image_side: int = 8,
                 sha256: dict | None = None, cloud_input: dict | None = None):
        from components.edge.model import OnnxLogits

        check_files(sha256, onnx_path)
        self.logits = OnnxLogits(onnx_path, threads=threads)
        self.class_names = [str(n) for n in meta["class_names"]]
        self.image_size, self.in_chans = int(meta["image_size"]), int(meta["in_chans"])
        self.model_version, self.model_name = model_version, str(meta["model_name"])
        self.set_temperature(temperature)
        self.max_image_pixels, self.min_image_side = max_image_pixels, min_image_side
        # The cloud tier's input is made from the pixels decoded here when its channels match (else it gets
        # the bytes).
        cloud = dict(cloud_input or {})
        self.cloud_size = int(cloud["image_size"]) if cloud.get("in_chans") == self.in_chans else None
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="edge")

    def set_temperature(self, temperature: float) -> None:
        if not float(temperature) > 0:
            raise ValueError(f"edge: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _run(self, data: bytes, with_edge: bool) -> tuple[dict | None, tuple | None]:
        """(edge answer | None | {"error", "reason"}, the decoded image and its edge input, or None)."""
        from components.augment.resize import validation_tensor
        from components.data.images import decode_image
        from components.edge.model import softmax

        start = time.perf_counter()
        try:
            check_image_header(data, self.max_image_pixels, self.min_image_side)
            img = decode_image(data, self.in_chans, self.max_image_pixels)
        except ImageDecodeError as exc:
            return decode_error(exc), None
        if not with_edge:
            return None, (img, None)
        x = validation_tensor(img, self.image_size)
        probs = softmax(self.logits(x[None]), self.temperature)[0]
        return prediction(probs, self.class_names, self.model_version, self.model_name, 1, start), (img, x)

    async def predict(self, data: bytes, with_edge: bool = True) -> tuple[dict | None, tuple | None]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run, data, with_edge)

    def cloud_input(self, data: bytes, decoded: tuple) -> object:
        """What an escalation sends the cloud: its float32 CHW input made from the pixels decoded here (the
        edge input itself when the sizes match), or the bytes when the cloud wants other channels."""
        from components.augment.resize import validation_tensor

        if self.cloud_size is None:
            return data
        img, x = decoded
        return x if x is not None and self.cloud_size == self.image_size else validation_tensor(img, self.cloud_size)

    def check_health(self) -> None:
        self.logits(np.zeros((1, self.in_chans, self.image_size, self.image_size), dtype=np.float32))


class _Tier:
    """One model tier: image bytes in, calibrated softmax probabilities out, batched across requests.

    ``model_path`` is a resops model file (dense, sparse ``.npz`` or channel-pruned ``.pt``): it gives
    the weights and the metadata (classes, input size). With ``onnx_path`` the forward pass runs that
    ONNX file (the int8 edge model) in ONNX Runtime instead; the metadata still comes from
    ``model_path``. ``predict`` never raises for bad input; it answers ``{"error": msg, "reason":
    "undecodable" | "too_large" | "too_small"}`` so the router can map the reason to a status.
    """

    tier = "tier"

    def __init__(self, model_path: str, *, onnx_path: str | None = None, model_version: str = "unknown",
                 temperature: float = 1.0, max_image_pixels: int = 50_000_000, min_image_side: int = 8,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, threads: int = 2,
                 sha256: dict | None = None):
        import torch  # imported here: the router process never needs torch

        from components.augment.operator import AugmentOperator
        from components.models.checkpoint import load_model

        check_files(sha256, model_path, onnx_path)
        from components.models.registry import model_task

        self._torch = torch
        torch.set_num_threads(threads)
        model, meta = load_model(model_path)
        self.meta = meta
        self.task = model_task(str(meta["model_name"]))
        if onnx_path and self.task == "detect":
            raise ValueError(f"{self.tier}: detectors are served by torch; an ONNX edge model is for classifiers")
        self.onnx = None
        if onnx_path:
            from components.prune.quantize import OnnxClassifier

            self.onnx = OnnxClassifier(onnx_path, threads=threads)
            self.model = None
        else:
            self.model = model.eval().to(memory_format=torch.channels_last)
        # the drift watch's embeddings: the input of a torch classifier's head, kept by a forward hook
        self._tap = None
        if self.model is not None and self.task == "classify":
            from components.feedback.reference import EmbeddingTap

            self._tap = EmbeddingTap(self.model)
        self.backend = "onnxruntime" if self.onnx is not None else "torch"
        self.files = [Path(p).name for p in filter(None, (model_path, onnx_path))]
        self.model_version = model_version
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise ValueError(f"{self.tier}: temperature must be > 0, got {temperature}")
        self.class_names = [str(n) for n in meta["class_names"]]
        self.max_image_pixels, self.min_image_side = max_image_pixels, min_image_side
        # The validation transform of training: decode, resize, normalise; no augmentation.
        self.preprocess_op = AugmentOperator(policy=None, output="tensor", image_size=int(meta["image_size"]),
                                             in_chans=int(meta["in_chans"]), max_pixels=max_image_pixels)
        self._infer.set_max_batch_size(max_batch_size)
        self._infer.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # One thread runs the forward passes so the event loop keeps accepting and decoding requests
        # while a batch computes (torch and ONNX Runtime release the GIL).
        self._forward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward",
                                                initializer=torch.set_num_threads, initargs=(threads,))
        # Decoding runs off the event loop too, at most `threads` images at once: bounded memory
        # even when many large images arrive together.
        self._decode_pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="decode")
        self.batch_stats = {"batches": 0, "images": 0, "max_batch_size": 0}

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> float32 CHW array; raises ImageDecodeError naming the problem."""
        check_image_header(data, self.max_image_pixels, self.min_image_side)
        out = self.preprocess_op({"image": np.array([data], dtype=object), "label": np.array([0])})
        return out["image"][0]

    def preprocess_detection(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded image bytes -> (float32 CHW array as the detector was trained on, original (h, w))."""
        from components.augment.detection import detection_batch

        check_image_header(data, self.max_image_pixels, self.min_image_side)
        out = detection_batch({"image": np.array([data], dtype=object), "boxes": np.array(["[]"], dtype=object)},
                              image_size=int(self.meta["image_size"]), in_chans=int(self.meta["in_chans"]))
        return out["image"][0], tuple(int(v) for v in out["orig_size"][0])

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities of a float32 NCHW batch and, from a torch classifier, its
        penultimate-layer embeddings (else None); for a detector, its decoded predictions (N, P, 5 + C):
        xyxy in input pixels, objectness, class probabilities."""
        from components.evaluate.calibration import softmax

        if self.task == "detect":
            from components.models.detector import decode

            torch = self._torch
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                outs = self.model(x)
                return decode([o.float() for o in outs], self.model.anchors, tuple(x.shape[-2:])).numpy(), None
        embeddings = None
        if self.onnx is not None:
            logits = self.onnx.logits(batch, batch_size=len(batch))
        else:
            torch = self._torch
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                logits = self.model(x).float().numpy()
            embeddings = self._tap.last if self._tap is not None else None
        return softmax(logits, self.temperature).astype(np.float32), embeddings

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _infer(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
        loop = asyncio.get_running_loop()
        probs, embeddings = await loop.run_in_executor(self._forward_pool, self.forward, np.stack(images))
        st = self.batch_stats
        st["batches"], st["images"] = st["batches"] + 1, st["images"] + len(images)
        st["max_batch_size"] = max(st["max_batch_size"], len(images))
        return [(p, None if embeddings is None else embeddings[i], len(images)) for i, p in enumerate(probs)]

    async def _decode(self, preprocess, data: bytes) -> tuple[object, dict | None]:
        """``(preprocess(data), None)`` computed off the event loop, or ``(None, {"error", "reason"})``
        naming why the bytes are not a usable image."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decode_pool, preprocess, data), None
        except ImageDecodeError as exc:
            return None, decode_error(exc)

    async def predict(self, data: bytes, histogram: bool = False, embed: bool = False) -> dict:
        """One image's answer; with ``histogram`` / ``embed`` also the drift statistics of it (the
        histogram of its model input; the penultimate-layer embedding), which the router takes out."""
        start = time.perf_counter()
        image, error = await self._decode(self.preprocess, data)
        if error:
            return error
        out = await self._answer(image, start, embed)
        if histogram:
            out["input_histogram"] = input_histograms(image)[0].tolist()
        return out

    async def predict_array(self, image: np.ndarray, embed: bool = False) -> dict:
        """An input the ingress already decoded and preprocessed (float32 CHW at this tier's size and
        channels) -> as :meth:`predict`: the image is decoded once per request, not once per tier."""
        start = time.perf_counter()
        expected = (int(self.meta["in_chans"]), int(self.meta["image_size"]), int(self.meta["image_size"]))
        if tuple(image.shape) != expected:
            raise ValueError(f"{self.tier}: input of shape {tuple(image.shape)}, expected {expected}")
        return await self._answer(np.asarray(image, dtype=np.float32), start, embed)

    async def _answer(self, image: np.ndarray, start: float, embed: bool) -> dict:
        probs, embedding, batch_size = await self._infer(image)
        out = prediction(probs, self.class_names, self.model_version, str(self.meta["model_name"]), batch_size, start)
        if embed and embedding is not None:
            out["embedding"] = embedding.tolist()
        return out

    async def detect(self, data: bytes, score_threshold: float, iou_threshold: float, max_detections: int) -> dict:
        """Boxes on one image in its own pixels, or ``{"error", "reason"}`` like :meth:`predict`."""
        from components.models.detector import postprocess, scale_boxes

        start = time.perf_counter()
        if self.task != "detect":
            return {"error": f"the {self.tier} model {self.meta['model_name']} is not a detector", "reason": UNDECODABLE}
        decoded_input, error = await self._decode(self.preprocess_detection, data)
        if error:
            return error
        image, orig = decoded_input
        decoded, _, batch_size = await self._infer(image)
        torch = self._torch
        size = tuple(image.shape[-2:])
        det = postprocess(torch.from_numpy(decoded)[None], score_threshold=score_threshold, iou_threshold=iou_threshold,
                          max_detections=max_detections, image_hw=size)[0]
        boxes = scale_boxes(det["boxes"], size, orig).tolist()
        return {"detections": [{"box": [round(v, 2) for v in b], "label": self.class_names[int(c)],
                                "label_index": int(c), "score": float(sc)}
                               for b, c, sc in zip(boxes, det["labels"].tolist(), det["scores"].tolist())],
                "image_size": list(orig), "model_version": self.model_version,
                "model_name": str(self.meta["model_name"]), "batch_size": batch_size,
                "compute_ms": (time.perf_counter() - start) * 1000.0}

    def _explain(self, data: bytes, max_side: int) -> dict:
        """Grad-CAM of one image (runs on the forward thread: Captum's hooks on the model must not
        see another request's forward pass)."""
        from components.augment.resize import validation_tensor
        from components.data.images import decode_image
        from components.evaluate.calibration import softmax
        from components.evaluate.explain import cam_layer, gradcam, overlay, png_bytes

        image = decode_image(data, int(self.meta["in_chans"]), self.max_image_pixels)  # once: input and overlay
        x = validation_tensor(image, int(self.meta["image_size"]))
        cams, raw = gradcam(self.model, self._torch.from_numpy(x[None]))
        # log-softmax is the logits up to a constant: the tier's temperature applies to it as to the logits
        probs = softmax(np.log(np.maximum(raw, 1e-30)), self.temperature)[0]
        h, w = image.shape[:2]
        if max(h, w) > max_side:  # drawn over the image as sent, at most max_side pixels on its long side
            import cv2

            scale = max_side / max(h, w)
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        label = int(np.argmax(probs))
        return {"label": self.class_names[label], "label_index": label,
                "probabilities": {n: float(v) for n, v in zip(self.class_names, probs)},
                "explained_class": self.class_names[int(np.argmax(raw[0]))],
                "method": "grad-cam", "layer": cam_layer(self.model, int(self.meta["image_size"]))[0],
                "heatmap_png": png_bytes(overlay(image, cams[0])), "heatmap_size": list(image.shape[:2]),
                "model_version": self.model_version, "model_name": str(self.meta["model_name"])}

    async def explain(self, data: bytes, max_side: int = 512) -> dict:
        """Label, calibrated probabilities and a PNG of the Grad-CAM heat map of the predicted class
        over the image; ``{"error", "reason"}`` for bad input, like :meth:`predict`."""
        start = time.perf_counter()
        if self.model is None or self.task != "classify":
            return {"error": f"the {self.tier} tier ({self.backend}, {self.task}) cannot explain: Grad-CAM needs "
                             "a torch classifier", "reason": UNSUPPORTED}
        try:
            check_image_header(data, self.max_image_pixels, self.min_image_side)
            out = await asyncio.get_running_loop().run_in_executor(self._forward_pool, self._explain, data, max_side)
        except ImageDecodeError as exc:
            return decode_error(exc)
        out["compute_ms"] = (time.perf_counter() - start) * 1000.0
        return out

    def reconfigure(self, config: dict) -> None:
        """Serve ``user_config`` (``{"temperature": T}``): a changed value in the Serve config takes effect
        on the running replicas, without restarting them."""
        temperature = float((config or {}).get("temperature", self.temperature))
        if not temperature > 0:
            raise ValueError(f"{self.tier}: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def check_health(self) -> None:
        """Serve's periodic health check: the model still runs a forward pass (else Serve replaces the replica)."""
        size, chans = int(self.meta["image_size"]), int(self.meta["in_chans"])
        self.forward(np.zeros((1, chans, size, size), dtype=np.float32))

    def stats(self) -> dict:
        """Batches run by this replica: how well requests are being batched."""
        return dict(self.batch_stats)

    def info(self) -> dict:
        return {"tier": self.tier, "model_name": str(self.meta["model_name"]), "model_version": self.model_version,
                "backend": self.backend, "files": self.files, "temperature": self.temperature,
                "class_names": self.class_names, "num_classes": int(self.meta["num_classes"]),
                "image_size": int(self.meta["image_size"]), "in_chans": int(self.meta["in_chans"]),
                "compression": self.meta.get("pruning") or ({"method": "structured"} if "structured" in self.meta
                                                            else None)}


@serve.deployment(max_constructor_retry_count=2)
class EdgeClassifier(_Tier):
    """The edge tier: the small (pruned, quantized) model next to the camera; answers confident inputs."""

    tier = "edge"


@serve.deployment(max_constructor_retry_count=2)
class CloudClassifier(_Tier):
    """The cloud tier: the full model, dynamic batching; answers what the edge escalates."""

    tier = "cloud"


# /docs and /redoc load Swagger UI and ReDoc from the package (fastapi-offline), not a CDN: they render offline.
api = FastAPIOffline(title="resops", version="2",
              description="ResNet18-family visual inspection with cloud-edge collaborative inference: the edge "
                          "model answers confident inputs, the rest escalate to the full model in the cloud.")
install_error_handlers(api)


class RouterMetrics:
    """Application metrics (``ray.serve.metrics``), exported on every node's Ray metrics endpoint
    (Prometheus text, ``ray_`` prefixed; the node's ``MetricsExportPort``) next to Serve's own."""

    CONFIDENCE_BOUNDARIES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("resops_requests", description="images answered, by answering tier and mode",
                                        tag_keys=("tier", "mode"))
        self.escalations = metrics.Counter("resops_escalations",
                                           description="cascade images the edge escalated to the cloud")
        self.edge_confidence = metrics.Histogram("resops_edge_confidence",
                                                 description="the edge model's calibrated top probability",
                                                 boundaries=self.CONFIDENCE_BOUNDARIES)
        self.errors = metrics.Counter("resops_errors", description="refused requests and images, by reason",
                                      tag_keys=("reason",))
        self.latency = metrics.Histogram("resops_tier_latency_ms", description="time of a tier call as the router "
                                         "sees it (total: the whole image)", boundaries=self.LATENCY_BOUNDARIES_MS,
                                         tag_keys=("tier",))
        self.drift_score = metrics.Gauge("resops_drift_score", tag_keys=("statistic",),
                                         description="input drift over the last window of requests, in units of "
                                                     "the in-distribution 95th percentile (serve.drift)")
        self.drifted = metrics.Gauge("resops_drift_declared", description="1 while input drift is declared")

    def answered(self, result: dict) -> None:
        self.requests.inc(tags={"tier": result["tier"], "mode": result["mode"]})
        if result["escalated"]:
            self.escalations.inc()
        if result["edge_confidence"] is not None:
            self.edge_confidence.observe(result["edge_confidence"])
        for tier, ms in result["latency_ms"].items():
            self.latency.observe(ms, tags={"tier": tier})

    def refused(self, reason: str) -> None:
        self.errors.inc(tags={"reason": reason})

    def drift(self, score: dict) -> None:
        """The drift watch's latest score (serve.drift): per statistic, and whether drift is declared."""
        for name in ("intensity", "embedding"):
            if score[name] is not None:
                self.drift_score.set(score[name]["score"], tags={"statistic": name})
        self.drifted.set(float(score["drifted"]))


@serve.deployment
@serve.ingress(api)
class Router:
    """HTTP ingress: checks requests, routes them to the edge and/or cloud tier, shapes the answers."""

    def __init__(self, edge: DeploymentHandle | dict, cloud: DeploymentHandle, info: dict, *, default_mode: str = "cascade",
                 threshold: float = 0.5, max_body_bytes: int = 10_000_000, max_batch_images: int = 64,
                 auth_token: str | None = None, auth_token_env: str | None = None, signal: dict | None = None,
                 detection: dict | None = None, health_timeout_s: float = 2.0, feedback: dict | None = None,
                 drift: dict | None = None):
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {default_mode!r}")
        # `edge` is the edge deployment's handle, or (placement: ingress) the settings of the edge model
        # this replica runs itself.
        self.local_edge = IngressEdge(**edge) if isinstance(edge, dict) else None
        self.edge = None if self.local_edge else edge
        self.cloud = cloud
        self.info = dict(info)
        self.task = self.info["cloud"].get("task", "classify")
        det = dict(detection or {})
        self.score_threshold = float(det.get("score_threshold", 0.25))
        self.iou_threshold = float(det.get("iou_threshold", 0.45))
        self.max_detections = int(det.get("max_detections", 100))
        self.default_mode = default_mode
        self.threshold = float(threshold)
        self.health_timeout_s = float(health_timeout_s)
        self.metrics = RouterMetrics()
        self.reader = RequestReader(max_body_bytes=max_body_bytes, max_batch_images=max_batch_images,
                                    auth_token=auth_token, auth_token_env=auth_token_env)
        from components.serve.signal import check_settings

        self.signal = check_settings(signal) if signal else None
        from components.feedback import FeedbackRecorder, FeedbackSettings

        settings = FeedbackSettings.from_dict(feedback)
        # serve.feedback: escalated, unsure and sampled requests kept for the next data version (never
        # blocking or failing a request; components.feedback)
        self.feedback = FeedbackRecorder(settings, source="serve") if settings.enabled else None
        self.drift, self._embed_tasks = None, set()
        if drift and self.task == "classify":
            # serve.drift: rolling statistics of what this replica receives against the training inputs'
            self.drift = DriftMonitor(drift["reference"], drift["threshold"], check_every=drift["check_every"],
                                      name="serve")
            self.embed_rate = float(drift["embed_rate"]) if self.drift.has_embeddings else 0.0
            self._rng = random.Random()

    # ------------------------------------------------------------------ routing
    async def classify(self, data: bytes, mode: str, threshold: float) -> dict:
        """One image through the tiers ``mode`` names; escalate iff the edge confidence < threshold."""
        start = time.perf_counter()
        latency, batch_sizes, versions = {}, {}, {}
        edge_conf, result, decoded, edge_result, cloud_result = None, None, None, None, None
        t = time.perf_counter()
        if self.local_edge is not None:  # decoded here once; the edge model runs in this replica
            result, decoded = await self.local_edge.predict(data, with_edge=mode != "cloud")
        elif mode in ("edge", "cascade"):
            result = await self.edge.predict.remote(data, histogram=self.drift is not None)
        if result is not None and "error" in result:
            self.metrics.refused(result["reason"])
            return result
        if mode in ("edge", "cascade"):
            latency["edge"] = (time.perf_counter() - t) * 1000.0
            edge_result, edge_conf, tier = result, result["confidence"], "edge"
            batch_sizes["edge"], versions["edge"] = result["batch_size"], result["model_version"]
        escalate = mode == "cloud" or (mode == "cascade" and edge_conf < threshold)
        # drift: the input's histogram from whoever decoded it; the cloud embedding of a random sample
        embed = self.drift is not None and self.embed_rate > 0 and self._rng.random() < self.embed_rate
        cloud_input = None
        if decoded is not None and (escalate or embed):
            cloud_input = self.local_edge.cloud_input(data, decoded)
        if self.drift is not None:
            self._observe_input(result, decoded, cloud_input)
        if escalate:
            t = time.perf_counter()
            result = await self._cloud_call(data if cloud_input is None else cloud_input, embed=embed,
                                            histogram=self.drift is not None and decoded is None and edge_result is None)
            latency["cloud"] = (time.perf_counter() - t) * 1000.0
            if "error" in result:
                self.metrics.refused(result["reason"])
                return result
            tier, cloud_result = "cloud", result
            batch_sizes["cloud"], versions["cloud"] = result["batch_size"], result["model_version"]
        elif embed:  # not escalated: the cloud embeds it in the background, for the drift watch only
            task = asyncio.create_task(self._embed_only(data if cloud_input is None else cloud_input))
            self._embed_tasks.add(task)
            task.add_done_callback(self._embed_tasks.discard)
        latency["total"] = (time.perf_counter() - start) * 1000.0
        answer = {"label": result["label"], "label_index": result["label_index"],
                  "probabilities": result["probabilities"], "tier": tier, "mode": mode,
                  "escalated": mode == "cascade" and escalate, "edge_confidence": edge_conf,
                  "threshold": threshold if mode == "cascade" else None, "model_name": result["model_name"],
                  "model_versions": versions, "batch_size": batch_sizes, "latency_ms": latency}
        self.metrics.answered(answer)
        if self.feedback is not None:
            self.feedback.offer(data, answer, threshold=threshold, edge=edge_result, cloud=cloud_result)
        return answer

    # ------------------------------------------------------------------ drift
    def _observe_input(self, result: dict | None, decoded: tuple | None, cloud_input) -> None:
        """The histogram of this request's model input: computed here when this replica decoded it,
        else as the edge tier returned it (the cloud's, for a cloud-mode request: :meth:`_cloud_call`)."""
        if decoded is not None:
            img, x = decoded
            if x is None:
                x = cloud_input if isinstance(cloud_input, np.ndarray) else None
            if x is None:
                from components.augment.resize import validation_tensor

                x = validation_tensor(img, int(self.drift.ref.get("image_size", self.local_edge.image_size)))
            self._drift_observe(histogram=input_histograms(x, self.drift.ref["bins"])[0])
        elif result is not None and result.get("input_histogram") is not None:
            self._drift_observe(histogram=result.pop("input_histogram"))

    def _drift_observe(self, **stats) -> None:
        before = self.drift.last
        self.drift.observe(**stats)
        if self.drift.last is not before:  # rescored: the metrics follow
            self.metrics.drift(self.drift.last)

    async def _cloud_call(self, cloud_input, *, embed: bool = False, histogram: bool = False) -> dict:
        """The cloud tier on the ingress-decoded input (an array) or the bytes; the drift statistics it
        returns on request (``embed``: its embedding; ``histogram``: of the input it decoded) are taken
        out of the answer and observed."""
        if isinstance(cloud_input, np.ndarray):
            result = await self.cloud.predict_array.remote(cloud_input, embed=embed)
        else:
            result = await self.cloud.predict.remote(cloud_input, histogram=histogram, embed=embed)
        h, e = result.pop("input_histogram", None), result.pop("embedding", None)
        if self.drift is not None and (h is not None or e is not None):
            self._drift_observe(histogram=h, embedding=e)
        return result

    async def _embed_only(self, cloud_input) -> None:
        try:
            await self._cloud_call(cloud_input, embed=True)
        except Exception as exc:  # the drift watch never fails a request; a lost sample is only a smaller window
            logger.debug("drift: a sampled cloud embedding failed (%s: %s)", type(exc).__name__, exc)

    @api.post("/predict", response_model=PredictResponse | BatchPredictResponse,
              openapi_extra={"requestBody": PREDICT_BODY, "parameters": PREDICT_PARAMS},
              responses={code: {"model": ErrorResponse, "description": why} for code, why in PREDICT_ERRORS.items()})
    async def predict(self, request: Request):
        """Classify one image (multipart field `file`, or the raw bytes) or a JSON batch of base64 images."""
        start = time.perf_counter()
        try:
            self.reader.authorize(request)
            if self.task == "detect":
                raise BadRequest(404, "this app serves a detector: POST /detect")
            images, ctype, doc = await self.reader.images(request)
            query = request.query_params
            mode = parse_mode(doc.get("mode", query.get("mode")), self.default_mode)
            threshold = parse_threshold(doc.get("threshold", query.get("threshold")), self.threshold)
        except BadRequest as exc:
            return self._refused(exc)
        # The images of a batch go through the tiers concurrently, so the tiers batch them together.
        results = await asyncio.gather(*(self.classify(data, mode, threshold) for data in images))
        return answer(results, ctype, start, PredictResponse, BatchPredictResponse)

    async def detect_one(self, data: bytes, mode: str, threshold: float, score_threshold: float,
                         iou_threshold: float) -> dict:
        """One image through the detector tiers; cascade escalates when the edge found an uncertain box."""
        start = time.perf_counter()
        latency, versions = {}, {}
        escalate = mode == "cloud"
        if mode in ("edge", "cascade"):
            t = time.perf_counter()
            result = await self.edge.detect.remote(data, score_threshold, iou_threshold, self.max_detections)
            latency["edge"] = (time.perf_counter() - t) * 1000.0
            if "error" in result:
                return result
            tier, versions["edge"] = "edge", result["model_version"]
            escalate = mode == "cascade" and any(d["score"] < threshold for d in result["detections"])
        if escalate:
            t = time.perf_counter()
            result = await self.cloud.detect.remote(data, score_threshold, iou_threshold, self.max_detections)
            latency["cloud"] = (time.perf_counter() - t) * 1000.0
            if "error" in result:
                return result
            tier, versions["cloud"] = "cloud", result["model_version"]
        latency["total"] = (time.perf_counter() - start) * 1000.0
        return {"detections": result["detections"], "image_size": result["image_size"], "tier": tier, "mode": mode,
                "escalated": mode == "cascade" and escalate, "score_threshold": score_threshold,
                "iou_threshold": iou_threshold, "model_name": result["model_name"], "model_versions": versions,
                "latency_ms": latency}

    @api.post("/detect", response_model=DetectResponse | BatchDetectResponse,
              openapi_extra={"requestBody": PREDICT_BODY},
              responses={code: {"model": ErrorResponse, "description": why} for code, why in DETECT_ERRORS.items()})
    async def detect(self, request: Request):
        """Detect objects on one image (multipart field `file`, or the raw bytes) or a JSON batch of base64
        images; `score_threshold`, `iou_threshold` (NMS) and `mode` as query parameters or JSON fields."""
        start = time.perf_counter()
        fields = ("mode", "threshold", "score_threshold", "iou_threshold")
        try:
            self.reader.authorize(request)
            if self.task != "detect":
                raise BadRequest(404, "this app serves a classifier: POST /predict")
            images, ctype, doc = await self.reader.images(request, fields)
            q = {**request.query_params, **doc}
            mode = parse_mode(q.get("mode"), self.default_mode)
            threshold = parse_threshold(q.get("threshold"), self.threshold)
            score = parse_threshold(q.get("score_threshold"), self.score_threshold, "score_threshold")
            iou = parse_threshold(q.get("iou_threshold"), self.iou_threshold, "iou_threshold")
        except BadRequest as exc:
            return self._refused(exc)
        results = await asyncio.gather(*(self.detect_one(data, mode, threshold, score, iou) for data in images))
        return answer(results, ctype, start, DetectResponse, BatchDetectResponse)

    @api.post("/explain", response_model=ExplainResponse, openapi_extra={"requestBody": PREDICT_BODY},
              responses={200: {"content": {"image/png": {}}, "description": "with `Accept: image/png`: the heat map"},
                         **{code: {"model": ErrorResponse, "description": why} for code, why in EXPLAIN_ERRORS.items()}})
    async def explain(self, request: Request):
        """Explain one image (multipart field `file`, the raw bytes, or a JSON {"images": [one base64]}): the
        cloud model's answer and a Grad-CAM heat map of the predicted class over the image (base64 PNG in
        JSON; with `Accept: image/png` the PNG itself, the label in the `X-Label` header)."""
        start = time.perf_counter()
        try:
            self.reader.authorize(request)
            if self.task == "detect":
                raise BadRequest(404, "this app serves a detector: POST /detect")
            images, ctype, _ = await self.reader.images(request, ())
            if len(images) != 1:
                raise BadRequest(422, f"/explain takes one image, got {len(images)}")
        except BadRequest as exc:
            return self._refused(exc)
        t = time.perf_counter()
        result = await self.cloud.explain.remote(images[0])
        if "error" in result:
            self.metrics.refused(result["reason"])
            where = "images[0]: " if ctype == "application/json" else ""  # as /predict names a JSON image
            return error(STATUS_OF_REASON[result["reason"]], where + result["error"])
        latency = {"cloud": (time.perf_counter() - t) * 1000.0, "total": (time.perf_counter() - start) * 1000.0}
        accept = request.headers.get("accept", "")
        if "image/png" in accept and "application/json" not in accept:
            from fastapi.responses import Response

            return Response(content=result["heatmap_png"], media_type="image/png",
                            headers={"X-Label": result["label"], "X-Model-Version": result["model_version"],
                                     "X-Explained-Class": result["explained_class"]})
        import base64

        return ExplainResponse(**{k: v for k, v in result.items() if k != "compute_ms"} | {
            "heatmap_png": base64.b64encode(result["heatmap_png"]).decode("ascii"), "latency_ms": latency})

    @api.post("/predict_signal", response_model=SignalPredictResponse,
              responses={code: {"model": ErrorResponse, "description": why} for code, why in SIGNAL_ERRORS.items()})
    async def predict_signal(self, request: Request):
        """Classify a signal (EEG): JSON {"signal": [...]}, text with one number per line, or a 1-D .npy.
        It is cut into the training windows, each window becomes a scalogram, the answer averages them."""
        from components.serve.signal import SIGNAL_CONTENT_TYPES, SignalError, parse_signal, signal_images

        start = time.perf_counter()
        try:
            self.reader.authorize(request)
            if self.signal is None:
                raise BadRequest(404, "this app serves images (POST /predict): it was not built from an EEG dataset")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in SIGNAL_CONTENT_TYPES:
                raise BadRequest(415, f"unsupported content type {ctype!r}: send application/json "
                                       '{"signal": [...]}, text/plain (one number per line) or application/x-npy')
            body = await self.reader.body(request)
            if not body:
                raise BadRequest(400, "empty request body: send a signal")
            x, doc = parse_signal(body, ctype, self.signal["max_samples"])
            query = request.query_params
            mode = parse_mode(doc.get("mode", query.get("mode")), self.default_mode)
            threshold = parse_threshold(doc.get("threshold", query.get("threshold")), self.threshold)
            fs = doc.get("fs", query.get("fs"))
            if isinstance(fs, str):
                try:
                    fs = float(fs)
                except ValueError:
                    raise BadRequest(422, f"fs must be a number of Hz, got {fs!r}") from None
            images = await asyncio.get_running_loop().run_in_executor(None, signal_images, x, self.signal, fs)
        except (BadRequest, SignalError) as exc:
            return self._refused(exc)
        results = await asyncio.gather(*(self.classify(data, mode, threshold) for data in images))
        for i, result in enumerate(results):
            if "error" in result:
                return error(STATUS_OF_REASON[result["reason"]], f"window {i}: " + result["error"])
        names = list(results[0]["probabilities"])
        mean = {n: float(np.mean([r["probabilities"][n] for r in results])) for n in names}
        best = max(range(len(names)), key=lambda k: mean[names[k]])
        return SignalPredictResponse(label=names[best], label_index=best, probabilities=mean, num_windows=len(results),
                                     window_seconds=self.signal["window"] / self.signal["fs"],
                                     windows=[PredictResponse(**r) for r in results],
                                     latency_ms=(time.perf_counter() - start) * 1000.0)

    def _refused(self, exc) -> object:
        self.metrics.refused(f"http_{exc.status}")
        return refused(exc)

    def reconfigure(self, config: dict) -> None:
        """Serve ``user_config`` (``{"threshold": t, "default_mode": m}``): a changed value in the Serve
        config takes effect on the running router, without restarting it."""
        config = dict(config or {})
        mode = config.get("default_mode", self.default_mode)
        if mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {mode!r}")
        threshold = float(config.get("threshold", self.threshold))
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if "edge_temperature" in config and self.local_edge is not None:
            self.local_edge.set_temperature(config["edge_temperature"])
        self.default_mode, self.threshold = mode, threshold

    @api.get("/healthz", response_model=HealthResponse,
             responses={503: {"model": ErrorResponse, "description": "a tier does not answer"}})
    async def healthz(self):
        """OK when both tiers answer now (asked on every call: a probe sees a tier that died)."""
        if self.local_edge is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.local_edge.pool, self.local_edge.check_health)
            except Exception as exc:
                return error(503, f"the edge model in the ingress failed a forward pass ({type(exc).__name__}: {exc})")
        for tier, handle in (("edge", self.edge), ("cloud", self.cloud)):
            if handle is None:
                continue
            try:
                await asyncio.wait_for(handle.info.remote(), timeout=self.health_timeout_s)
            except Exception as exc:  # any failure means "not serving"
                return error(503, f"the {tier} tier did not answer within {self.health_timeout_s:g} s "
                                  f"({type(exc).__name__})")
        return HealthResponse(default_mode=self.default_mode,
                              model_versions={t: self.info[t]["model_version"] for t in ("edge", "cloud")})

    @api.get("/drift", responses={401: {"model": ErrorResponse}})
    async def drift_score(self, request: Request):
        """Does what this replica receives still look like the training inputs? Rolling scores against
        the drift reference (1 = the in-distribution 95th percentile) and whether drift is declared."""
        try:
            self.reader.authorize(request)
        except BadRequest as exc:
            return self._refused(exc)
        return self.drift.check() if self.drift is not None else {"enabled": False}

    @api.get("/feedback", responses={401: {"model": ErrorResponse}})
    async def feedback_stats(self, request: Request):
        """What this replica's feedback recorder kept, dropped and evicted (serve.feedback)."""
        try:
            self.reader.authorize(request)
        except BadRequest as exc:
            return self._refused(exc)
        return self.feedback.stats() if self.feedback is not None else {"enabled": False}

    @api.get("/models", response_model=ModelsResponse, responses={401: {"model": ErrorResponse}})
    async def models(self, request: Request):
        """The two tiers (model, version, files, backend, temperature) and the cascade settings."""
        try:
            self.reader.authorize(request)
        except BadRequest as exc:
            return self._refused(exc)
        info = dict(self.info)
        live = {"cloud": (await self.cloud.info.remote())["temperature"]}
        live["edge"] = (self.local_edge.temperature if self.local_edge is not None
                        else (await self.edge.info.remote())["temperature"])
        for tier, temperature in live.items():  # temperatures may have been reconfigured
            info[tier] = {**info[tier], "temperature": temperature}
        return ModelsResponse(default_mode=self.default_mode, threshold=self.threshold, **info)


def _tier_options(options: dict | None, max_batch_size: int) -> dict:
    """Deployment options of a tier: replicas or autoscaling, placement; in-flight room for a full batch."""
    options = dict(options or {})
    actor = {"num_cpus": float(options.pop("num_cpus", 1.0))}
    if options.get("resources"):
        actor["resources"] = dict(options.pop("resources"))
    options.pop("resources", None)
    out = {"ray_actor_options": actor, "max_ongoing_requests": int(options.pop("max_ongoing_requests", 0))
           or 2 * max_batch_size}
    if out["max_ongoing_requests"] < max_batch_size:
        raise ValueError(f"max_ongoing_requests ({out['max_ongoing_requests']}) must be >= max_batch_size "
                         f"({max_batch_size}), or batches never fill")
    if options.get("autoscaling_config"):
        out["autoscaling_config"] = dict(options.pop("autoscaling_config"))
        options.pop("num_replicas", None)
    else:
        options.pop("autoscaling_config", None)
        out["num_replicas"] = int(options.pop("num_replicas", 1))
    if options:
        raise ValueError(f"unknown deployment options {sorted(options)}")
    return out


def resolve_path(path: str | None, base_dir: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute():
        p = Path(base_dir or os.environ.get("RESOPS_HOME") or ".") / p
    # Absolute: replicas do not share the caller's working directory. On a multi-node cluster the
    # path must reach the same file on every tier's node (shared volume or baked into the image);
    # replicas check the sha256 taken here.
    return str(p.resolve())


def build_app(*args, **kwargs):
    """The Serve application: ``Router.bind(EdgeClassifier.bind(...), CloudClassifier.bind(...), ...)``
    (with ``serve.edge.placement`` ingress, ``Router.bind(<edge settings>, CloudClassifier.bind(...))``).
    Arguments as :func:`plan_app`'s."""
    return plan_app(*args, **kwargs)[0]


def plan_app(cloud_model: str, edge_model: str | None = None, *, edge_onnx: str | None = None,
              model_version: str = "unknown", edge_version: str | None = None, cloud_version: str | None = None,
              temperatures: dict | None = None, threshold: float = 0.5, default_mode: str = "cascade",
              max_body_bytes: int = 10_000_000, max_image_pixels: int = 50_000_000, min_image_side: int = 8,
              max_batch_images: int = 64, edge: dict | None = None, cloud: dict | None = None,
              router: dict | None = None, auth_token: str | None = None, auth_token_env: str | None = None,
              calibration: dict | None = None, base_dir: str | None = None, files_sha256: dict | None = None,
              signal: dict | None = None, detection: dict | None = None, model_card: dict | None = None,
              feedback: dict | None = None, drift: dict | None = None):
    """``(application, deployments)``: the Serve application and each deployment's options as a Serve
    config lists them (``name``, replicas or autoscaling, ``max_ongoing_requests``, ``ray_actor_options``,
    ``user_config``), the ones the application's deployments are given.

    ``cloud_model`` is the full model; ``edge_model`` the edge model (default: the full model, so a
    model without a compressed twin still serves every mode), ``edge_onnx`` its int8 ONNX export.
    ``edge`` / ``cloud`` hold each tier's settings: ``max_batch_size``, ``batch_wait_timeout_s``,
    ``threads``; for the edge ``placement`` (``auto``: ``ingress`` when the edge is an int8 ONNX classifier,
    else ``replica``; ``ingress`` runs the edge model inside the Router replicas, which then take the
    edge's replicas, CPUs and resources); and the deployment options ``num_replicas`` or ``autoscaling_config``, ``num_cpus``,
    ``resources`` (Ray custom resources, e.g. ``{"edge": 0.01}``), ``max_ongoing_requests``.
    Model files are loaded here once to validate them: a missing or malformed file raises
    ``CheckpointError`` now, naming the file, instead of failing replicas after deployment.
    Relative paths are taken from ``base_dir`` (else ``$RESOPS_HOME``, else the working directory).
    ``signal`` (fs, window, overlap, cwt: the prepare stage's settings of an EEG dataset) adds
    ``POST /predict_signal``, which turns a posted signal into those scalograms.
    Detector model files (``resnet18_yolo``) make a detection app: ``POST /detect`` answers boxes,
    ``detection`` holds its defaults (``score_threshold``, ``iou_threshold``, ``max_detections``).
    ``files_sha256`` (file name -> sha256, as the Serve config records them) pins the model files:
    a file that differs raises ``CheckpointError``, so a config never serves other weights than the
    ones it was written for. ``feedback`` is ``serve.feedback``; ``drift`` (``reference``: the calibrate
    stage's drift reference file, ``threshold``, ``embed_rate``, ``check_every``) adds the drift watch of
    ``GET /drift``.
    """
    cloud_model = resolve_path(cloud_model, base_dir)
    edge_model = resolve_path(edge_model, base_dir) or cloud_model
    edge_onnx = resolve_path(edge_onnx, base_dir)
    temperatures = dict(temperatures or {})
    if default_mode not in MODES:
        raise ValueError(f"default_mode must be one of {', '.join(MODES)}, got {default_mode!r}")
    info, handles = {}, {}
    edge = dict(edge or {})
    placement = edge.pop("placement", "auto")
    if placement not in ("auto", "ingress", "replica"):
        raise ValueError(f"serve.edge.placement must be auto, ingress or replica, got {placement!r}")
    ingress_options, specs = None, []
    for tier, cls, model_path, onnx_path, version, settings in (
            ("edge", EdgeClassifier, edge_model, edge_onnx, edge_version, edge),
            ("cloud", CloudClassifier, cloud_model, None, cloud_version, cloud)):
        settings = dict(settings or {})
        batch = int(settings.pop("max_batch_size", 8))
        wait = float(settings.pop("batch_wait_timeout_s", 0.01))
        threads = int(settings.pop("threads", 1))
        meta = read_model_info(model_path)
        if onnx_path and not Path(onnx_path).exists():
            from components.models.checkpoint import CheckpointError

            raise CheckpointError(f"ONNX model file {onnx_path} does not exist")
        files = [p for p in (model_path, onnx_path) if p]
        sha = {Path(p).name: file_sha256(p) for p in files}
        for name, found in sha.items():
            expected = (files_sha256 or {}).get(name)
            if expected and expected != found:
                from components.models.checkpoint import CheckpointError

                raise CheckpointError(f"model file {name} has sha256 {found}, not {expected} as recorded in the "
                                      "Serve config: the file was replaced after the config was written")
        version = version or model_version
        temperature = float(temperatures.get(tier, 1.0))
        info[tier] = {**meta, "tier": tier, "model_version": version, "files": sha,
                      "backend": "onnxruntime" if onnx_path else "torch", "temperature": temperature,
                      "placement": "replica"}
        if tier == "edge" and placement != "replica" and onnx_path and meta["task"] == "classify":
            # The edge model runs in the ingress: one replica (after the proxy) answers confident images.
            info[tier]["placement"] = "ingress"
            ingress_options = _tier_options(settings, 1)
            handles[tier] = {"onnx_path": onnx_path, "meta": meta, "model_version": version,
                             "temperature": temperature, "threads": threads, "max_image_pixels": max_image_pixels,
                             "min_image_side": min_image_side, "sha256": sha}
            continue
        if tier == "edge" and placement == "ingress":
            raise ValueError("serve.edge.placement: ingress needs the int8 ONNX edge model of a classifier "
                             "(serve.edge.backend auto or onnx, prune.quantize.enabled: true)")
        # user_config: the temperature can be changed in the Serve config without restarting replicas.
        options = {**_tier_options(settings, batch), "user_config": {"temperature": temperature}}
        specs.append({"name": cls.name, **options})
        handles[tier] = cls.options(**options).bind(
            model_path, onnx_path=onnx_path, model_version=version, temperature=temperature,
            max_image_pixels=max_image_pixels, min_image_side=min_image_side, max_batch_size=batch,
            batch_wait_timeout_s=wait, threads=threads, sha256=sha)
    if info["edge"]["task"] != info["cloud"]["task"]:
        raise ValueError(f"the edge model is a {info['edge']['task']} model and the cloud model a "
                         f"{info['cloud']['task']} model: one app serves one task")
    if info["edge"]["class_names"] != info["cloud"]["class_names"]:
        raise ValueError(f"the edge model's classes {info['edge']['class_names']} differ from the cloud model's "
                         f"{info['cloud']['class_names']}: a cascade cannot mix them")
    info["calibration"] = calibration
    info["model_card"] = model_card  # the calibrate stage's card of this version: GET /models answers it
    router = dict(router or {})
    router_options = {
        # The router only parses requests and awaits the tiers: many in flight, little CPU.
        "max_ongoing_requests": int(router.pop("max_ongoing_requests", 256)),
        "ray_actor_options": {"num_cpus": float(router.pop("num_cpus", 0.1)),
                              **({"resources": dict(router.pop("resources"))} if router.get("resources") else {})},
    }
    router.pop("resources", None)
    if router:
        raise ValueError(f"unknown router options {sorted(router)}")
    # user_config: threshold and default mode can be changed in the Serve config without a restart.
    router_options["user_config"] = {"threshold": float(threshold), "default_mode": default_mode}
    if ingress_options is not None:
        # The ingress does the edge tier's work: it takes the edge's replicas (or autoscaling) and
        # placement (resources), and its CPUs on top of the router's.
        handles["edge"]["cloud_input"] = {k: info["cloud"][k] for k in ("image_size", "in_chans")}
        actor = router_options["ray_actor_options"]
        edge_actor = ingress_options["ray_actor_options"]
        actor["num_cpus"] = actor["num_cpus"] + edge_actor["num_cpus"]
        if edge_actor.get("resources") or actor.get("resources"):
            actor["resources"] = {**edge_actor.get("resources", {}), **actor.get("resources", {})}
        for key in ("num_replicas", "autoscaling_config"):
            if key in ingress_options:
                router_options[key] = ingress_options[key]
        router_options["user_config"]["edge_temperature"] = info["edge"]["temperature"]
    specs.append({"name": "Router", **router_options})
    app = Router.options(**router_options).bind(
        handles["edge"], handles["cloud"], info, default_mode=default_mode, threshold=threshold,
        max_body_bytes=max_body_bytes, max_batch_images=max_batch_images, auth_token=auth_token,
        auth_token_env=auth_token_env, signal=signal, detection=detection, feedback=_feedback(feedback, base_dir),
        drift=_drift(drift, base_dir))
    return app, copy.deepcopy(specs)


def _feedback(feedback: dict | None, base_dir: str | None) -> dict | None:
    """``serve.feedback`` checked now (not in a replica), its local location taken from ``base_dir``."""
    if not feedback:
        return None
    from components.feedback import FeedbackSettings
    from components.storage import is_uri

    settings = dict(feedback)
    FeedbackSettings.from_dict(settings)
    if settings.get("enabled") and not is_uri(settings["location"]):
        settings["location"] = resolve_path(settings["location"], base_dir)
    return settings


def _drift(drift: dict | None, base_dir: str | None) -> dict | None:
    """``drift`` (components.serve.config.drift_args) with its reference read now: a missing file fails
    the deployment here, not in a replica."""
    if not drift:
        return None
    unknown = set(drift) - {"reference", "threshold", "embed_rate", "check_every"}
    if unknown:
        raise ValueError(f"unknown drift options {sorted(unknown)}")
    path = resolve_path(drift["reference"], base_dir)
    if not Path(path).exists():
        raise FileNotFoundError(f"drift reference {path} does not exist: run the calibrate stage (`dvc repro`) "
                                "or set serve.drift.enabled: false")
    return {**drift, "reference": load_reference(path)}


def app_builder(args: dict):
    """Application builder for a Serve config (``import_path: components.serve.app:app_builder``), the
    RayService ``serveConfigV2`` and ``serve run``; ``args`` are ``build_app``'s keyword arguments."""
    return app_plan(args)[0]


def app_plan(args: dict):
    """:func:`plan_app` of a Serve config's ``args``."""
    args = dict(args)
    return plan_app(args.pop("cloud_model"), args.pop("edge_model", None), **args)
