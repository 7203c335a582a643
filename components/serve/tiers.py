"""The Serve tiers: each runs one model on image bytes and answers calibrated probabilities (or boxes).

* :class:`Tier` -- one model, batched across requests (``@serve.batch``): a resops model file run by torch,
  or its int8 ONNX export run by ONNX Runtime; classifier or detector (``resnet18_yolo``);
* :class:`EdgeClassifier` / :class:`CloudClassifier` -- the two deployments of it;
* :class:`IngressEdge` -- the int8 ONNX edge model inside the ingress replica (no deployment of its own).

Every tier decodes and preprocesses each image exactly like training validation does
(``components.augment.resize.validation_tensor``) and never raises for bad input: it answers
``{"error": msg, "reason": ...}`` and the router maps the reason to an HTTP status.
"""
# No `from __future__ import annotations`: Serve ships deployment classes to replicas with cloudpickle,
# and string annotations could not be resolved there.

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ray import serve

from components.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from components.feedback.drift import input_histograms
from components.http.requests import UNDECODABLE, UNSUPPORTED, check_image_header, decode_error
from components.registry import file_sha256


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
                 threads: int = 1, max_image_pixels: int = DEFAULT_MAX_PIXELS, min_image_side: int = 8,
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


class Tier:
    """One model tier: image bytes in, calibrated softmax probabilities out, batched across requests.

    ``model_path`` is a resops model file (dense, sparse ``.npz`` or channel-pruned ``.pt``): it gives
    the weights and the metadata (classes, input size). With ``onnx_path`` the forward pass runs that
    ONNX file (the int8 edge model) in ONNX Runtime instead; the metadata still comes from
    ``model_path``. ``predict`` never raises for bad input; it answers ``{"error": msg, "reason":
    "undecodable" | "too_large" | "too_small"}`` so the router can map the reason to a status.
    """

    tier = "tier"

    def __init__(self, model_path: str, *, onnx_path: str | None = None, model_version: str = "unknown",
                 temperature: float = 1.0, max_image_pixels: int = DEFAULT_MAX_PIXELS, min_image_side: int = 8,
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
class EdgeClassifier(Tier):
    """The edge tier: the small (pruned, quantized) model next to the camera; answers confident inputs."""

    tier = "edge"


@serve.deployment(max_constructor_retry_count=2)
class CloudClassifier(Tier):
    """The cloud tier: the full model, dynamic batching; answers what the edge escalates."""

    tier = "cloud"
