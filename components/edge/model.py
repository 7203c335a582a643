"""The edge model on the device: image bytes -> calibrated class probabilities, with ONNX Runtime.

Preprocessing is the validation transform of training (``AugmentOperator(policy=None,
output="tensor")``) without OpenCV: decode with the same guards (Pillow), an area resize to twice
the input size when the image is larger, an area resize to the input size, then
``(x - 127.5) / 63.75``. The area resize is OpenCV's ``INTER_AREA`` arithmetic in numpy; the two
agree to one grey level (tests/test_edge.py measures it).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from components.data.images import ImageDecodeError, decode_image
from components.edge.bundle import EdgeBundle
from components.http.requests import check_image_header, decode_error


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of an area resize along one axis: each output pixel averages the input
    pixels its footprint covers, partly covered ones by the fraction covered (OpenCV's INTER_AREA)."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale  # each output pixel's footprint [lo, lo + scale)
    j = np.arange(n_in)[None, :]
    w = np.clip(np.minimum(lo + scale, j + 1) - np.maximum(lo, j), 0.0, None)
    return w / scale


def _area_resize(img: np.ndarray, size: int) -> np.ndarray:
    """A uint8 HxWxC image resized to size x size like ``cv2.resize(..., INTER_AREA)``.

    Shrinking averages source areas, computed here as two small matrix products (Pillow's BOX filter
    weighs pixels by their centres, not by the area covered, and differs by up to ~20 grey levels on
    fine texture). Enlarging, rare for camera images, interpolates bilinearly with Pillow.
    """
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if h < size or w < size:
        from PIL import Image

        pil = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        out = np.asarray(pil.resize((size, size), resample=Image.Resampling.BILINEAR), dtype=np.uint8)
        return out[:, :, None] if out.ndim == 2 else out
    rows, cols = _area_weights(h, size), _area_weights(w, size)
    x = img.astype(np.float64)
    out = np.stack([rows @ x[:, :, c] @ cols.T for c in range(x.shape[2])], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess_array(img: np.ndarray, image_size: int) -> np.ndarray:
    """A decoded uint8 HxWxC image -> the float32 CHW input the model was trained on."""
    s2 = 2 * image_size
    if img.shape[0] > s2 or img.shape[1] > s2:
        img = _area_resize(img, s2)
    img = _area_resize(img, image_size)
    return (img.astype(np.float32).transpose(2, 0, 1) - 127.5) / 63.75


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class OnnxLogits:
    """An ONNX classifier in ONNX Runtime on the CPU, float32 NCHW in, logits out. Thread-safe: one
    session serves every request (the device runtime and the Serve ingress both use it; no torch)."""

    def __init__(self, onnx_path: str | Path, threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]


class EdgeModel:
    """The bundle's ONNX model in ONNX Runtime (thread-safe: one session serves every request)."""

    def __init__(self, bundle: EdgeBundle, onnx_path: str | Path, threads: int = 1):
        self.bundle = bundle
        self.logits = OnnxLogits(onnx_path, threads)
        self.class_names = list(bundle.class_names)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> float32 CHW; raises ImageDecodeError naming the problem."""
        b = self.bundle
        check_image_header(data, b.max_image_pixels, b.min_image_side)
        return preprocess_array(decode_image(data, b.in_chans, b.max_image_pixels), b.image_size)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of a float32 NCHW batch."""
        return softmax(self.logits(batch), self.bundle.temperature)

    def predict(self, data: bytes, observe=None) -> dict:
        """One image: label, calibrated probabilities, top confidence; or ``{"error", "reason"}`` for bad
        input (the reason maps to the same status code as the Serve app's). ``observe(x)`` is called
        with the model input (the drift watch)."""
        start = time.perf_counter()
        try:
            x = self.preprocess(data)
        except ImageDecodeError as exc:
            return decode_error(exc)
        if observe is not None:
            observe(x)
        probs = self.probabilities(x[None])[0]
        index = int(np.argmax(probs))
        return {"label": self.class_names[index], "label_index": index, "confidence": float(probs[index]),
                "probabilities": {n: float(p) for n, p in zip(self.class_names, probs)},
                "model_version": self.bundle.model_version, "model_name": self.bundle.model_name,
                "compute_ms": (time.perf_counter() - start) * 1000.0}
