"""Typed params: one pydantic model per params.yaml section, built from the file.

``load_config(params)`` validates a whole params tree (params.yaml, or the detection pipeline's with
``pipeline: detect``) and fails with one :class:`ConfigError` naming every key that is missing,
unknown or of the wrong type, before a stage starts. Library functions take these section models
(e.g. :func:`components.rebalance.gan.train_gan` takes a :class:`GanConfig`), so a setting's value
lives in params.yaml only, never in a default argument that could disagree with it.
"""
from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from components import ResopsError
from components.config.base import Section
from components.config.detect import DetectConfig
from components.config.sections import (AugmentConfig, ClassifyConfig, DataConfig, EvaluateConfig, GanConfig,
                                        ModelConfig, PromoteConfig, PruneConfig, RebalanceConfig, ServeConfig,
                                        TrainConfig)

__all__ = ["AugmentConfig", "ClassifyConfig", "ConfigError", "DataConfig", "DetectConfig", "EvaluateConfig",
           "GanConfig", "ModelConfig", "PromoteConfig", "PruneConfig", "RebalanceConfig", "Section", "ServeConfig",
           "TrainConfig", "load_config", "section"]

PIPELINES: dict[str, type[Section]] = {"classify": ClassifyConfig, "detect": DetectConfig}


class ConfigError(ResopsError, ValueError):
    """A params file that does not match its pipeline's sections; the message lists every problem."""


def _problems(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors(include_url=False):
        key = ".".join(str(part) for part in e["loc"]) or "(the file)"
        if e["type"] == "missing":
            lines.append(f"`{key}` is missing: add it (params.yaml documents every key)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"`{key}` is not a known key: remove it or check its spelling")
        else:
            lines.append(f"`{key}`: {e['msg']} (got {e.get('input')!r})")
    return lines


def _validate(model: type[Section], tree: Mapping, source: str) -> Section:
    try:
        return model.model_validate(dict(tree))
    except ValidationError as err:
        problems = _problems(err)
        raise ConfigError(f"{source}: {len(problems)} problem(s): " + "; ".join(problems)) from None


def load_config(params: Mapping, source: str | None = None) -> ClassifyConfig | DetectConfig:
    """The typed config of a params tree: its ``pipeline`` key (absent: classify) picks the model."""
    source = source or getattr(params, "source", "params.yaml")
    kind = params.get("pipeline", "classify")
    if kind not in PIPELINES:
        raise ConfigError(f"{source}: pipeline must be one of {sorted(PIPELINES)}, got {kind!r}")
    tree = {k: v for k, v in params.items() if k != "pipeline"} if kind == "classify" else params
    return _validate(PIPELINES[kind], tree, source)


def section(model: type[Section], values: Mapping, source: str = "params") -> Section:
    """One section from a mapping (e.g. ``section(GanConfig, params("gan"))``), with the same errors."""
    return _validate(model, values, source)
