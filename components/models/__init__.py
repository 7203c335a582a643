"""Model zoo: ResNet18 variants behind one registry, and the model file format."""
from components.models.checkpoint import CheckpointError, load_model, save_model, unwrap
from components.models.registry import count_parameters, create_model, list_models, predict_proba, register_model

__all__ = ["CheckpointError", "load_model", "save_model", "unwrap", "count_parameters", "create_model",
           "list_models", "predict_proba", "register_model"]
