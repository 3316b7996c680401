"""Evaluation of unlearning: accuracies (UA/RA/TA), gaps to a retrained model, membership inference."""
from erasus.metrics.accuracy import accuracy, average_gap, predict_logits
from erasus.metrics.mia import mia_efficacy, true_class_confidence
from erasus.metrics.neurips import final_score, forget_score, logit_scaled_confidence

__all__ = ["accuracy", "average_gap", "predict_logits", "mia_efficacy", "true_class_confidence", "forget_score",
           "final_score", "logit_scaled_confidence"]
