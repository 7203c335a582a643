"""Evaluation: metrics (scikit-learn), DVC plot data, confusion-matrix pictures, HTML report."""
from components.evaluate.metrics import classification_metrics, summary_from_confusion
from components.evaluate.report import confusion_png, confusion_rows, predict_dataset, write_report

__all__ = ["classification_metrics", "summary_from_confusion", "confusion_png", "confusion_rows", "predict_dataset",
           "write_report"]
