"""Training precision: ``auto | fp32 | bf16 | fp16``, chosen from what the hardware runs natively.

``auto`` is bf16 autocast on CPUs with native bf16 arithmetic (AVX512_BF16 or AMX-BF16: measured
1.5-1.8x faster ResNet18 training there), fp16 AMP with a gradient scaler on CUDA GPUs (bf16 where
the GPU supports it), and fp32 everywhere else: on AVX2-only CPUs bf16 autocast emulates the
arithmetic and is slower than fp32. The CPU is probed at run time (machines change), never assumed.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo names of CPU features that execute bf16 dot products natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 arithmetic natively (AVX512_BF16 or AMX-BF16)."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> str:
    """The precision to train with on ``device``: ``requested`` unless it is ``auto``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    device = torch.device(device)
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str = "fp32"):
    """The autocast context of a resolved ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str):
    """A gradient scaler where fp16 needs one (CUDA); None otherwise (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None


def describe(precision: str, requested: str) -> dict:
    """What was chosen and why, for metrics/train.json."""
    return {"precision": precision, "precision_requested": requested,
            "cpu_native_bf16": cpu_has_native_bf16(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
