"""Ray Serve deployments (``EdgeClassifier`` and ``CloudClassifier`` tiers behind a FastAPI ``Router``),
and the Serve config file (the HTTP schemas are in ``components.http.schema``, re-exported here).

``build_app`` and ``app_builder`` live in ``components.serve.app``, the config functions in
``components.serve.config``; they are imported lazily here so that ``components.http.schema``
can be used without importing Ray Serve.
"""
from components.http.schema import (MODES, BatchPredictResponse, ErrorResponse, HealthResponse, ModelsResponse,
                                     PredictResponse, TierInfo)

_LAZY = {"build_app": "app", "app_builder": "app", "build_serve_config": "config", "deploy_config": "config",
         "load_serve_config": "config", "write_serve_config": "config", "serve_args": "config"}

__all__ = [*_LAZY, "MODES", "BatchPredictResponse", "ErrorResponse", "HealthResponse", "ModelsResponse",
           "PredictResponse", "TierInfo"]


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"components.serve.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'components.serve' has no attribute {name!r}")
