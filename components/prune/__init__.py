"""Pruning and compression: global magnitude pruning, structured (channel) pruning, int8 ONNX
quantization and knowledge distillation.

The model files themselves (sparse ``.npz``, structured ``.pt``) are written and read by
:mod:`components.models.checkpoint`. The structured, quantization and
distillation names are imported lazily (PEP 562 ``__getattr__``): magnitude pruning alone should not pay
for torch-pruning and ONNX Runtime.
"""
from importlib import import_module

from components.prune.unstructured import (apply_global_magnitude, apply_layerwise_magnitude,
                                           magnitude_step, make_permanent, prunable_parameters,
                                           sparsity_report, sparsity_schedule)

_LAZY = {
    # structured pruning
    "StructuredPruningError": "structured", "StructuredReport": "structured", "structured_prune": "structured",
    "count_macs_params": "structured",
    # int8 through ONNX Runtime
    "OnnxClassifier": "quantize", "QuantizationReport": "quantize", "export_onnx": "quantize",
    "quantize_onnx": "quantize",
    # knowledge distillation
    "DistillationLoss": "distill", "finetune_epoch": "distill", "recalibrate_batchnorm": "distill",
}

__all__ = ["apply_global_magnitude", "apply_layerwise_magnitude", "magnitude_step", "sparsity_schedule", "make_permanent", "prunable_parameters",
           "sparsity_report", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f"components.prune.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
