"""Feedback: what serving saw, kept for labelling and the next data version (:mod:`.store`)."""
from components.feedback.store import FeedbackRecorder, FeedbackSettings, FeedbackStore

__all__ = ["FeedbackRecorder", "FeedbackSettings", "FeedbackStore"]
