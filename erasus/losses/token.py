"""Cross-entropy per sample, for classifiers and for token sequences with padding."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from erasus.errors import InvalidInputError, ShapeError


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                             shift: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each sample: (B,).

    Args:
        logits: (B, C) or (B, T, C).
        labels: (B,) or (B, T); positions equal to ``ignore_index`` (padding, prompt tokens) count for nothing.
        shift: causal-LM convention (as Hugging Face's ``labels=input_ids``): position t predicts label t+1.
        reduction: over each sample's tokens, ``"mean"`` (over the counted tokens; 0 for a sample with none)
            or ``"sum"``.

    Example:
        >>> import torch
        >>> from erasus.losses import per_sample_cross_entropy
        >>> logits = torch.zeros(2, 3, 4)                      # uniform over 4 classes
        >>> labels = torch.tensor([[1, 2, -100], [0, -100, -100]])
        >>> per_sample_cross_entropy(logits, labels, reduction="sum").div(torch.log(torch.tensor(4.0))).tolist()
        [2.0, 1.0]
    """
    if reduction not in ("mean", "sum"):
        raise InvalidInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.dim() == 2:
        if labels.shape != logits.shape[:1]:
            raise ShapeError(f"labels must have shape {tuple(logits.shape[:1])}, got {tuple(labels.shape)}")
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ShapeError(f"logits (B, T, C) and labels (B, T) must agree, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    total = token.sum(dim=1)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum(dim=1).clamp(min=1)
