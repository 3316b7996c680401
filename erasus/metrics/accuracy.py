"""Accuracy-type metrics of a classifier on a dataset."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from erasus._device import model_device
from erasus.errors import EmptyInputError, InvalidInputError


def predict_logits(model: nn.Module, data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over ``data`` (a Dataset or DataLoader of ``(inputs, labels)``), in eval mode under
    ``no_grad``, on the CPU whatever the model's device; the model's mode is restored."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    device = model_device(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with torch.no_grad():
            for x, y in loader:
                logits.append(model(x.to(device)).float().cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise EmptyInputError("data holds no samples")
    logits, labels = torch.cat(logits), torch.cat(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool or \
            labels.is_complex():
        raise InvalidInputError(f"labels must be a 1-D integer tensor of class indices, got dtype {labels.dtype} "
                                f"and shape {tuple(labels.shape)}")
    return logits, labels


def accuracy(model: nn.Module, data, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1]. UA (unlearning accuracy, SalUn) is ``1 - accuracy(model, forget)``; RA and TA
    are the accuracies on the retain and test sets."""
    logits, labels = predict_logits(model, data, batch_size)
    return float((logits.argmax(dim=1) == labels).float().mean())


def average_gap(metrics: dict[str, float], reference: dict[str, float], keys=("UA", "RA", "TA", "MIA")) -> float:
    """SalUn's Avg. Gap: the mean of ``|metric - reference|`` over ``keys`` present in both."""
    shared = [k for k in keys if k in metrics and k in reference]
    if not shared:
        raise EmptyInputError("no metric is shared with the reference")
    return sum(abs(metrics[k] - reference[k]) for k in shared) / len(shared)
