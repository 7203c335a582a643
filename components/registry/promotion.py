"""Model registry and promotion gates.

``models/registry.json`` lists every candidate the promote stage saw, promoted or not, with
its metrics, params, data version and git revision; the promoted weights live at a stable
path so serving never has to search.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GATE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)


def _check(checks: list, reasons: list, name: str, value: float, op: str, bound: float) -> None:
    ok = value >= bound if op == ">=" else value <= bound
    checks.append({"gate": name, "value": round(value, 6), "op": op, "bound": round(bound, 6), "passed": ok})
    if not ok:
        reasons.append(f"{name}: {value:.4f} is not {op} {bound:.4f}")


def decide(candidate: dict, current: dict | None, gates: dict) -> Decision:
    """Apply the gates of params.yaml ``promote.gates`` to a candidate's test metrics.

    * ``min_<metric>``: absolute floors (accuracy, balanced_accuracy, macro_f1);
    * ``min_gain_over_majority``: accuracy must beat the majority-class rate by this much;
    * ``max_regression``: the ``compare_metric`` may not fall more than this below the
      currently promoted model's (no current model: the gate passes).
    """
    checks: list[dict] = []
    reasons: list[str] = []
    for metric in GATE_METRICS:
        bound = gates.get(f"min_{metric}")
        if bound is not None:
            _check(checks, reasons, f"min_{metric}", candidate[metric], ">=", float(bound))
    if gates.get("min_gain_over_majority") is not None:
        _check(checks, reasons, "min_gain_over_majority", candidate["accuracy"] - candidate["majority_rate"], ">=",
               float(gates["min_gain_over_majority"]))
    compare = gates.get("compare_metric", "macro_f1")
    if current is not None and gates.get("max_regression") is not None:
        _check(checks, reasons, f"max_regression({compare})", candidate[compare], ">=",
               current["metrics"][compare] - float(gates["max_regression"]))
    return Decision(not reasons, reasons, checks)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_revision(cwd: str | Path = ".") -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_out_hash(lock_file: str | Path, out_path: str) -> str | None:
    """The md5 DVC recorded for ``out_path`` in dvc.lock (the data version), if any."""
    lock_file = Path(lock_file)
    if not lock_file.exists():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == out_path:
                return out.get("md5") or out.get("hash")
    return None


def load_registry(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        return {"promoted": None, "entries": []}
    return json.loads(path.read_text())


def current_promoted(registry: dict) -> dict | None:
    version = registry.get("promoted")
    return next((e for e in registry["entries"] if e["version"] == version), None)


def register_candidate(registry_path: str | Path, promoted_dir: str | Path, files: dict[str, str | Path],
                       metrics: dict, gates: dict, lineage: dict) -> dict:
    """Record a candidate; when every gate passes, copy its files to ``promoted_dir``.

    ``files`` maps a role (``full``, ``edge``) to a model file; ``metrics`` is the candidate's
    headline test metrics (of the full model); ``lineage`` holds params, data version, git rev.
    Returns the registry entry (with ``status`` and the reasons of a rejection).
    """
    registry_path, promoted_dir = Path(registry_path), Path(promoted_dir)
    registry = load_registry(registry_path)
    current = current_promoted(registry)
    decision = decide(metrics, current, gates)
    hashes = {role: file_sha256(p) for role, p in files.items()}
    version = f"v{len(registry['entries']) + 1}-{hashes.get('full', next(iter(hashes.values())))[:8]}"
    entry = {
        "version": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": "promoted" if decision.promote else "rejected", "reasons": decision.reasons,
        "checks": decision.checks, "metrics": metrics, "files_sha256": hashes,
        "previous": current["version"] if current else None, **lineage,
    }
    if decision.promote:
        promoted_dir.mkdir(parents=True, exist_ok=True)
        for old in promoted_dir.iterdir():  # exactly one version's files: no stale edge model of another
            if old.is_file():
                old.unlink()
        stable = {}
        for role, src in files.items():
            dest = promoted_dir / f"{role}{Path(src).suffix}"
            shutil.copy2(src, dest)
            stable[role] = dest.as_posix()
        entry["files"] = stable
        (promoted_dir / "model.json").write_text(json.dumps({"version": version, "files": stable, "metrics": metrics}, indent=2))
        registry["promoted"] = version
    registry["entries"].append(entry)
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    registry_path.write_text(json.dumps(registry, indent=2))
    return entry


__all__ = ["Decision", "decide", "register_candidate", "load_registry", "current_promoted", "git_revision",
           "dvc_out_hash", "file_sha256"]
