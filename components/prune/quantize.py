"""Post-training static int8 quantization of the edge model, through ONNX and ONNX Runtime.

Why ONNX Runtime and not PyTorch's own quantization (eager ``torch.ao.quantization`` or FX /
PT2E): the edge device runs ONNX Runtime, so the model that is quantized is the model that is
deployed, and its accuracy is measured in the runtime that serves it. ORT's static quantizer
writes the QDQ format (``QuantizeLinear``/``DequantizeLinear`` around each Conv/Gemm/Add) with
per-channel int8 weights; the CPU execution provider fuses these into integer kernels on x86
(AVX2, AVX-512/VNNI) and on ARM (NEON, dot-product) from the same file, whereas PyTorch's
eager/FX int8 kernels (fbgemm/x86 or qnnpack) are chosen per backend at conversion time, need
``QuantStub``/fusion edits to the model (the residual ``+`` of torchvision's BasicBlock must
become ``FloatFunctional``), and a TorchScript int8 model is not what the device runs.

Pipeline: :func:`export_onnx` (float32 ONNX, dynamic batch axis, input ``image`` NCHW float32,
output ``logits``) -> :func:`quantize_onnx` (``quant_pre_process`` shape inference and graph
optimisation, then ``quantize_static`` calibrated on training images) -> :class:`OnnxClassifier`
(an ``InferenceSession`` with configurable threads, returning probabilities).

Export: ``torch.onnx.export(dynamo=True)`` is torch 2.14's default and recommended exporter
(``torch.export`` + onnxscript, all offline); the TorchScript exporter (``dynamo=False``) still
works and is ~10x faster to export but is deprecated, so it is an option, not the default.
Both are checked against PyTorch by the tests. Opset 18 (not the exporter's newer default) so
older ORT builds on devices (>= 1.14) can load the file.

Quantization defaults follow ORT's CPU guidance: QDQ format, per-channel symmetric int8 weights,
uint8 activations (U8S8), MinMax calibration. On x86 CPUs *without* VNNI (AVX2 only), U8S8
products can saturate: pass ``reduce_range=True`` (7-bit weights) there. ARM and VNNI CPUs
need nothing; ARM may prefer ``activation_type="int8"`` (S8S8).
"""
from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from components.models.checkpoint import unwrap

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
_QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}


def _hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def export_onnx(model: nn.Module, path: str | Path, image_size: int | tuple[int, int], in_chans: int, *,
                opset: int = DEFAULT_OPSET, dynamo: bool = True) -> Path:
    """Write ``model`` (float32, eval mode, CPU) as one ``.onnx`` file with a dynamic batch axis.

    Input ``image`` of shape ``(batch, in_chans, H, W)`` float32, output ``logits``
    ``(batch, num_classes)``. ``dynamo=False`` selects the (deprecated, faster) TorchScript
    exporter. Weights are stored inside the file (no external data). The model is exported from a
    float32 CPU copy, so ``model`` itself (device, dtype, train/eval mode) is left unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = _hw(image_size)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        params = next(net.parameters(), None)
        if params is not None and (params.device.type != "cpu" or params.dtype != torch.float32):
            net = copy.deepcopy(net).to("cpu", torch.float32).eval()
        example = torch.zeros(2, in_chans, h, w)  # batch 2: torch.export specialises sizes 0 and 1
        if dynamo:
            torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        else:
            torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    finally:
        unwrap(model).train(was_training)
    onnx.checker.check_model(str(path))
    return path


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds float32 NCHW batches (numpy arrays or tensors) to ORT's calibrator; counts the images."""

    def __init__(self, batches: Iterable, input_name: str = INPUT_NAME, input_shape: tuple | None = None,
                 max_images: int | None = None) -> None:
        self._batches = iter(batches)
        self._pending: dict | None = None
        self.input_name = input_name
        self.input_shape = input_shape  # (batch, C, H, W) with batch symbolic/None
        self.max_images = max_images
        self.images = 0

    def peek(self) -> dict | None:
        """The first batch, validated now (before any ORT work) and still handed out by ``get_next``."""
        if self._pending is None:
            self._pending = self._read()
        return self._pending

    def get_next(self) -> dict | None:
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        return self._read()

    def _read(self) -> dict | None:
        if self.max_images is not None and self.images >= self.max_images:
            return None
        batch = next(self._batches, None)
        if batch is None:
            return None
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        elif isinstance(batch, dict):  # a training batch {"image": ..., "label": ...}
            batch = np.asarray(batch["image"].detach().cpu().numpy() if isinstance(batch["image"], torch.Tensor)
                               else batch["image"])
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4:
            raise ValueError(f"calibration batches must be NCHW arrays, got shape {batch.shape}")
        if self.input_shape is not None:
            if any(isinstance(d, int) and d != s for d, s in zip(self.input_shape[1:], batch.shape[1:])):
                raise ValueError(f"calibration batch of shape {batch.shape} does not fit the model input "
                                 f"{list(self.input_shape)}")
        if self.max_images is not None:
            batch = batch[:self.max_images - self.images]
        self.images += len(batch)
        return {self.input_name: batch}


@dataclass
class QuantizationReport:
    float_path: str
    int8_path: str
    float_bytes: int
    int8_bytes: int
    calibration_images: int
    per_channel: bool
    quant_format: str
    activation_type: str
    weight_type: str
    reduce_range: bool
    calibrate_method: str

    @property
    def compression(self) -> float:
        return self.float_bytes / self.int8_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"compression": self.compression}


def _model_input(path: Path) -> tuple[str, tuple]:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one image input, found {[i.name for i in inputs]}")
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim)
    return inputs[0].name, dims


def quantize_onnx(float_path: str | Path, int8_path: str | Path, calibration_batches: Iterable, *,
                  per_channel: bool = True, quant_format: str = "qdq", activation_type: str = "uint8",
                  weight_type: str = "int8", reduce_range: bool = False, calibrate_method: str = "minmax",
                  max_images: int | None = None, preprocess: bool = True) -> QuantizationReport:
    """Static int8 quantization of ``float_path`` into ``int8_path``, calibrated on real images.

    ``calibration_batches``: an iterable of float32 NCHW arrays (or tensors, or training batch
    dicts with ``"image"``), preprocessed exactly as the model sees them at inference, typically a
    few hundred training images; ``max_images`` stops early. ``quant_format`` ``"qdq"`` (ORT's
    recommended format) or ``"qoperator"``; ``activation_type``/``weight_type`` ``"uint8"`` or
    ``"int8"``; ``calibrate_method`` ``"minmax"``, ``"entropy"`` or ``"percentile"``.
    ``preprocess`` runs ORT's ``quant_pre_process`` (shape inference, BN folding) first.
    """
    float_path, int8_path = Path(float_path), Path(int8_path)
    for name, value, table in (("quant_format", quant_format, _FORMATS), ("activation_type", activation_type,
                               _QUANT_TYPES), ("weight_type", weight_type, _QUANT_TYPES),
                               ("calibrate_method", calibrate_method, _CALIBRATION)):
        if value not in table:
            raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    if not float_path.exists():
        raise FileNotFoundError(f"float ONNX model {float_path} does not exist")
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    input_name, input_shape = _model_input(float_path)
    reader = ArrayCalibrationReader(calibration_batches, input_name, input_shape, max_images)
    if reader.peek() is None:
        raise ValueError("quantize_onnx: the calibration batches are empty; calibrate on training images")
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as tmp:
        source = float_path
        if preprocess:
            source = Path(tmp) / "preprocessed.onnx"
            quant_pre_process(str(float_path), str(source))
        quantize_static(str(source), str(int8_path), reader, quant_format=_FORMATS[quant_format],
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=_QUANT_TYPES[activation_type], weight_type=_QUANT_TYPES[weight_type],
                        calibrate_method=_CALIBRATION[calibrate_method])
    return QuantizationReport(
        float_path=str(float_path), int8_path=str(int8_path), float_bytes=os.path.getsize(float_path),
        int8_bytes=os.path.getsize(int8_path), calibration_images=reader.images, per_channel=per_channel,
        quant_format=quant_format, activation_type=activation_type, weight_type=weight_type,
        reduce_range=reduce_range, calibrate_method=calibrate_method)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """Run an ``.onnx`` classifier (float or int8) with ONNX Runtime on the CPU.

    ``threads``: intra-op threads (0 lets ORT use every core); ``inter_op_threads`` only matters
    for parallel graphs (this one is sequential). ``predict_proba(images)`` takes float32 NCHW
    arrays (or tensors) and returns softmax probabilities, batched by ``batch_size``.
    """

    def __init__(self, path: str | Path, threads: int = 1, inter_op_threads: int = 1,
                 providers: list[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = int(inter_op_threads)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                            providers=providers or ["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name, self.input_shape = first.name, tuple(first.shape)
        self.output_name = self.session.get_outputs()[0].name

    def logits(self, images, batch_size: int = 64) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        outs = [self.session.run([self.output_name], {self.input_name: images[i:i + batch_size]})[0]
                for i in range(0, len(images), batch_size)]
        return np.concatenate(outs) if outs else np.empty((0, 0), dtype=np.float32)

    def predict_proba(self, images, batch_size: int = 64) -> np.ndarray:
        logits = self.logits(images, batch_size)
        return softmax(logits) if len(logits) else logits

    def predict(self, images, batch_size: int = 64) -> np.ndarray:
        return self.predict_proba(images, batch_size).argmax(axis=1)

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path)
