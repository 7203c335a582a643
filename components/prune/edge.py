"""The edge model: the trained model compressed by one of the registered methods, then fine-tuned.

``prune.method`` names a builder in :data:`EDGE_METHODS` (as the model zoo names architectures):

* ``structured`` -- torch-pruning channel pruning (fewer MACs: really faster), saved as a structured ``.pt``;
* ``unstructured`` -- magnitude pruning in ``steps`` (smaller sparse ``.npz``, not faster);
* ``none`` -- the trained model as it is.

A builder takes the model to compress (a copy of the trained one), its metadata, the ``prune`` settings
and a ``finetune(model, label)`` callable (the caller's data and loss: the prune stage distils from the
full model), writes the edge model file into ``out_dir`` and returns it with what it measured. The prune
stage and ``benchmarks/prune.py`` call :func:`build_edge_model`; :func:`quantize_edge_model` adds the
int8 ONNX export.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

Finetune = Callable[[object, str], list]


@dataclass
class EdgeBuild:
    """An edge model file and what the builder measured (``report``: params, sparsity or MACs)."""

    file: Path
    report: dict = field(default_factory=dict)
    finetune: list = field(default_factory=list)
    summary: str = ""


EDGE_METHODS: dict[str, Callable[..., EdgeBuild]] = {}


def edge_method(name: str):
    def register(fn):
        EDGE_METHODS[name] = fn
        return fn
    return register


def build_edge_model(method: str, model, meta: dict, settings: dict, finetune: Finetune, out_dir: Path,
                     source_file: Path, seed: int) -> EdgeBuild:
    """The edge model of ``method`` (a key of :data:`EDGE_METHODS`) in ``out_dir``."""
    if method not in EDGE_METHODS:
        raise ValueError(f"prune.method must be one of {', '.join(sorted(EDGE_METHODS))}, got {method!r}")
    return EDGE_METHODS[method](model=model, meta=meta, settings=settings, finetune=finetune, out_dir=Path(out_dir),
                                source_file=Path(source_file), seed=seed)


@edge_method("unstructured")
def unstructured_edge(*, model, meta: dict, settings: dict, finetune: Finetune, out_dir: Path, **_) -> EdgeBuild:
    import torch

    from components.models.checkpoint import save_sparse
    from components.prune.unstructured import magnitude_step, make_permanent, sparsity_report, sparsity_schedule

    include_fc, scope = settings["include_fc"], settings["scope"]
    before = sparsity_report(model, include_fc)
    reached, history = 0.0, []
    for target in sparsity_schedule(settings["sparsity"], settings["steps"]):
        magnitude_step(model, reached, target, scope=scope, include_fc=include_fc)
        model = model.to(memory_format=torch.channels_last)
        reached = target
        history += finetune(model, f"sparsity {target:.2f}")
    make_permanent(model)
    after = sparsity_report(model, include_fc)
    meta = dict(meta, pruning={"method": "magnitude_unstructured", "scope": scope, "sparsity": settings["sparsity"],
                               "steps": settings["steps"], "include_fc": include_fc})
    file = save_sparse(out_dir / "model.npz", model, meta)
    report = {"requested_sparsity": settings["sparsity"], "measured_sparsity": after["target_sparsity_measured"],
              "params": after["params"], "nonzero_params_before": before["nonzero_params"],
              "nonzero_params_after": after["nonzero_params"]}
    summary = (f"sparsity {after['target_sparsity_measured']:.3f} ({scope}, {settings['steps']} step(s)), "
               f"non-zero params {before['nonzero_params']} -> {after['nonzero_params']}")
    return EdgeBuild(file, report, history, summary)


@edge_method("structured")
def structured_edge(*, model, meta: dict, settings: dict, finetune: Finetune, out_dir: Path, seed: int,
                    **_) -> EdgeBuild:
    import torch

    from components.models.checkpoint import save_structured
    from components.prune.structured import structured_prune

    st = settings["structured"]
    example = torch.zeros(1, meta["in_chans"], meta["image_size"], meta["image_size"])
    res = structured_prune(model, example, target=st["target"], ratio=st["ratio"], importance=st["importance"],
                           global_pruning=st["global_pruning"], seed=seed)
    model = model.to(memory_format=torch.channels_last)
    history = finetune(model, f"structured {st['ratio']}")
    file = save_structured(out_dir / "model.pt", model, meta, res)
    report = {"structured": res.as_dict(), "params": res.params_after, "macs_before": res.macs_before,
              "macs_after": res.macs_after}
    return EdgeBuild(file, report, history, res.summary())


@edge_method("none")
def uncompressed_edge(*, out_dir: Path, source_file: Path, **_) -> EdgeBuild:
    file = out_dir / "model.pt"
    shutil.copy2(source_file, file)
    return EdgeBuild(file, {}, [], "the trained model as it is")


def quantize_edge_model(edge_file: Path, out_dir: Path, calibration: Callable[[dict], Iterable[dict]],
                        settings: dict) -> dict:
    """int8 ONNX of the saved edge model (``prune.quantize``): exported, statically quantized on the
    batches ``calibration(meta)`` yields (``{"image": float32 NCHW}``); the figures for the report."""
    from components.models.checkpoint import load_model
    from components.prune.quantize import export_onnx, quantize_onnx

    edge_model, edge_meta = load_model(edge_file)  # exactly what was saved
    onnx_float = export_onnx(edge_model, Path(out_dir) / "model.onnx", edge_meta["image_size"], edge_meta["in_chans"])
    qr = quantize_onnx(onnx_float, Path(out_dir) / "model.int8.onnx", calibration(edge_meta),
                       per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                       max_images=settings["calibration_images"])
    return {"onnx_file": "model.onnx", "int8_file": "model.int8.onnx", "file_bytes_onnx": qr.float_bytes,
            "file_bytes_int8": qr.int8_bytes}
