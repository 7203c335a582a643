"""Ray Serve deployments (``Classifier`` tiers behind a FastAPI ``Router``) and the HTTP schema.

``build_app``, ``deploy`` and ``run`` live in ``components.serve.app``; they are imported lazily here so
that ``components.serve.schema`` can be used without importing Ray Serve.
"""
from components.serve.schema import ErrorResponse, HealthResponse, ModelInfo, PredictResponse

__all__ = ["build_app", "deploy", "run", "ErrorResponse", "HealthResponse", "ModelInfo", "PredictResponse"]


def __getattr__(name: str):
    if name in ("build_app", "deploy", "run"):
        from components.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'components.serve' has no attribute {name!r}")
