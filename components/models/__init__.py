"""Model zoo: ResNet18 variants behind one registry, the model file format, and transfer learning."""
from components.models.checkpoint import CheckpointError, load_model, save_model, unwrap
from components.models.registry import (count_parameters, create_model, list_models, model_task, predict_proba,
                                        prediction_layer, register_model)
from components.models import variants  # noqa: F401  (registers se_resnet18, resnet18_simam, resnet18_k2)
from components.models import detector  # noqa: F401  (registers the detector resnet18_yolo; after the backbones)
from components.models.transfer import (PretrainedWeightsError, TransferReport, backbone_parameters, head_parameters,
                                        load_pretrained, resolve_pretrained)

__all__ = ["CheckpointError", "load_model", "save_model", "unwrap", "count_parameters", "create_model",
           "list_models", "model_task", "predict_proba", "prediction_layer", "register_model", "PretrainedWeightsError",
           "TransferReport", "backbone_parameters", "head_parameters", "load_pretrained",
           "resolve_pretrained"]
