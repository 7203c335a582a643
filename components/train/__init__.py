"""Training: the Ray Train loop, checkpoints every epoch, resume, and metric sinks."""
from components.train.trainer import TrainResult, fit, image_dataset, run_name

__all__ = ["TrainResult", "fit", "image_dataset", "run_name"]
