"""The offline replay of the served cascade: what the Serve app must answer, image by image.

Each image of a split is decoded and preprocessed as the serving tiers do
(``components.augment.resize.validation_tensor``), run through the edge model (its int8 ONNX export in
ONNX Runtime when the app serves it, else the torch edge model) and the cloud model, scaled by the
calibrated temperatures, and routed by the cascade rule (escalate iff the edge's top probability <
threshold). The calibrate stage writes the answers (``models/serve/replay.json``, keyed by the sha256
of the image bytes); ``benchmarks/serve.py`` sends the same images to the running app and reports how
many served answers agree.
"""
from __future__ import annotations

import hashlib

import numpy as np


def cascade_route(edge_probs: np.ndarray, cloud_probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class, escalated)`` per row: the edge's class unless its top probability < threshold."""
    escalate = edge_probs.max(1) < threshold
    return np.where(escalate, cloud_probs.argmax(1), edge_probs.argmax(1)), escalate


def _batched_logits(run, images: list[bytes], in_chans: int, image_size: int, batch_size: int,
                    max_pixels: int, desc: str = "") -> np.ndarray:
    from components.augment.resize import validation_tensor
    from components.data.images import decode_image
    from components.progress import bar

    out = []
    for i in bar(range(0, len(images), batch_size), desc=desc or "logits", unit="batch"):
        x = np.stack([validation_tensor(decode_image(b, in_chans, max_pixels), image_size)
                      for b in images[i:i + batch_size]])
        out.append(run(x))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def tier_logits(model_path, onnx_path, images: list[bytes], *, threads: int = 2, batch_size: int = 64,
                max_pixels: int, desc: str = "") -> np.ndarray:
    """Logits of one tier's model on encoded images, computed as that tier computes them."""
    import torch

    from components.models.checkpoint import load_model

    model, meta = load_model(model_path)
    size, chans = int(meta["image_size"]), int(meta["in_chans"])
    if onnx_path:
        from components.edge.model import OnnxLogits

        onnx = OnnxLogits(str(onnx_path), threads=threads)
        return _batched_logits(onnx, images, chans, size, batch_size, max_pixels, desc)
    model = model.eval().to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()

    return _batched_logits(run, images, chans, size, batch_size, max_pixels, desc)


def replay_cascade(images: list[bytes], labels: np.ndarray, *, cloud_model, edge_model, edge_onnx, temperatures: dict,
                   threshold: float, class_names: list[str], model_version: str, threads: int = 2,
                   max_pixels: int, desc: str = "replay") -> dict:
    """:func:`replay_from_logits` of the tiers' logits on ``images`` (computed here as the tiers do)."""
    logits = {t: tier_logits(m, o, images, threads=threads, max_pixels=max_pixels, desc=f"{desc}, {t}")
              for t, m, o in (("cloud", cloud_model, None), ("edge", edge_model, edge_onnx))}
    return replay_from_logits(images, labels, logits, temperatures=temperatures, threshold=threshold,
                              class_names=class_names, model_version=model_version)


def replay_from_logits(images: list[bytes], labels: np.ndarray, logits: dict, *, temperatures: dict, threshold: float,
                       class_names: list[str], model_version: str) -> dict:
    """The cascade's answer for every image from the tiers' ``logits`` (``{"edge", "cloud"}``, rows in the
    order of ``images``): ``{"threshold", "model_version", "answers": {sha256: {...}}, "edge_probs",
    "cloud_probs", "edge_logits", "cloud_logits", "labels"}`` (the arrays for the caller's figures; not
    serialised)."""
    from components.evaluate.calibration import softmax

    cloud, edge = (softmax(logits[t], temperatures[t]) for t in ("cloud", "edge"))
    pred, escalated = cascade_route(edge, cloud, threshold)
    answers = {}
    for data, k, e, pe in zip(images, pred.tolist(), escalated.tolist(), edge.max(1).tolist()):
        answers[hashlib.sha256(data).hexdigest()] = {"label_index": int(k), "label": class_names[int(k)],
                                                     "tier": "cloud" if e else "edge", "edge_confidence": float(pe)}
    return {"threshold": float(threshold), "model_version": model_version, "mode": "cascade",
            "temperatures": {k: float(v) for k, v in temperatures.items()}, "n": len(images), "answers": answers,
            "edge_probs": edge, "cloud_probs": cloud, "edge_logits": logits["edge"], "cloud_logits": logits["cloud"],
            "labels": np.asarray(labels)}


def agreement(replay: dict, served: list[tuple[bytes, dict]]) -> dict:
    """How many served cascade answers (``(image bytes, response JSON)``) agree with the replay: the
    same class, and the same answering tier; the first disagreements, with both answers."""
    answers = replay["answers"]
    same_label = same_tier = 0
    different = []
    for data, got in served:
        want = answers.get(hashlib.sha256(data).hexdigest())
        ok_label = want is not None and got.get("label_index") == want["label_index"]
        ok_tier = want is not None and got.get("tier") == want["tier"]
        same_label += ok_label
        same_tier += ok_tier
        if not (ok_label and ok_tier) and len(different) < 10:
            different.append({"replayed": want, "served": {k: got.get(k) for k in
                                                           ("label_index", "tier", "edge_confidence", "threshold",
                                                            "status")}})
    n = len(served)
    return {"n": n, "label_agreement": same_label / max(1, n), "tier_agreement": same_tier / max(1, n),
            "replayed_model_version": replay["model_version"], "threshold": replay["threshold"],
            "disagreements": different}
