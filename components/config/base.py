"""The base of every params section model: strict, immutable, no defaults.

A section model lists each key its params.yaml section has, with its type and no default value, so
params.yaml stays the one place a setting's value is written: a key missing from the file, a key the
model does not know (a typo, a stale option) and a value of the wrong type are errors that name the
key (:func:`components.config.load_config`).

The enumerations below are the library's accepted values, written here so that validating a params
file imports no torch; ``tests/test_config.py`` checks each against the library's own tuple.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # components.train.precision.PRECISIONS
Schedule = Literal["cosine", "linear", "onecycle"]  # components.train.loop.SCHEDULES
SelectBy = Literal["last", "val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_loss"]  # loop.SELECT_BY
Head = Literal["softmax", "ordinal"]  # components.models.heads.HEADS
Tta = Literal["none", "flips", "dihedral"]  # components.evaluate.tta.TTA_MODES
ClassWeight = Literal["none", "balanced", "sqrt"]  # components.rebalance.samplers.CLASS_WEIGHTS
Mode = Literal["edge", "cloud", "cascade"]  # components.http.schema.MODES
CascadeTarget = Literal["accuracy_drop", "accuracy", "escalation_rate"]  # evaluate.calibration.TARGETS
EdgeMethod = Literal["structured", "unstructured", "none"]  # components.prune.edge.EDGE_METHODS
WandbMode = Literal["offline", "online", "disabled"]


class Section(BaseModel):
    """One params.yaml mapping: unknown keys fail, every key is required, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
