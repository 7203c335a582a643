"""The default pipeline's stages by name: what ``resops run STAGE`` (and so each DVC stage) calls.

Each stage is one thin function in the module of its part of the pipeline, so a DVC stage depends on
that module only (dvc.yaml lists it): data (``pipelines/data_stages.py``: ingest, prepare, augment,
gan, rebalance), model (``pipelines/model_stages.py``: train, prune, evaluate, promote) and serving
(``pipelines/serve_stages.py``: calibrate, report). The artifact layout is ``pipelines/layout.py``.
The modules are imported when a stage is looked up, not here.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import Callable

STAGE_MODULES = {"ingest": "data_stages", "prepare": "data_stages", "augment": "data_stages", "gan": "data_stages",
                 "rebalance": "data_stages", "train": "model_stages", "prune": "model_stages",
                 "evaluate": "model_stages", "promote": "model_stages", "calibrate": "serve_stages",
                 "report": "serve_stages"}


class _Stages(Mapping):
    """``{stage name: stage function}`` in pipeline order, each module imported on first use."""

    def __getitem__(self, name: str) -> Callable:
        if name not in STAGE_MODULES:
            raise KeyError(name)
        return getattr(import_module(f"pipelines.{STAGE_MODULES[name]}"), name)

    def __iter__(self) -> Iterator[str]:
        return iter(STAGE_MODULES)

    def __len__(self) -> int:
        return len(STAGE_MODULES)


STAGES = _Stages()
