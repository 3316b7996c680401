"""Where a model lives, and moving batches there: used by selectors, strategies and metrics alike."""
from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch, device):
    """A batch (tensor, tuple/list or dict of them) with its tensors on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
