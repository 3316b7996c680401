"""Plain supervised training, for the original and the retrained (gold standard) classifiers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


def train_classifier(model: nn.Module, data, *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 64,
                     seed: int = 0) -> nn.Module:
    """Adam on cross-entropy, in place; returns the model in eval mode. Deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()
