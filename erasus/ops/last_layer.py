"""Last-layer gradient geometry without materialising the gradients.

For logits ``z = W h + b`` and per-sample loss gradient ``e_i = d loss_i / d z_i`` (for softmax
cross-entropy, ``softmax(z_i) - onehot(y_i)``), the gradient of the last layer is ``g_i = [e_i, e_i (x) h_i]``
of size C (d + 1). Its inner products factorise: ``<g_i, g_j> = (e_i . e_j)(h_i . h_j + 1)``, so the Gram
matrix costs two GEMMs of sizes n x C and n x d instead of one of size n x C(d+1).

Both functions square ``e`` and ``h`` separately, so values far from 1 (beyond 2**+-30) or a float32 result
that overflowed are computed again in float64; a result too large for float32 raises NonFiniteError.
"""
from __future__ import annotations

import torch

from erasus.errors import ShapeError
from erasus.ops._magnitude import squares_fit, to_float32
from erasus.ops._validate import all_finite, check_matrix, max_abs


def last_layer_grad_gram(errors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(n, n) Gram matrix of last-layer gradients, ``(E E^T) o (H H^T + 1)``.

    Args:
        errors: (n, C) loss gradients with respect to the logits.
        features: (n, d) inputs of the last layer.

    Example:
        >>> import torch
        >>> from erasus.ops import last_layer_grad_gram
        >>> e, h = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0]])
        >>> last_layer_grad_gram(e, h).item()   # ||[e, e*h]||^2 = 2 + 2*4
        10.0
    """
    e, h = _pair(errors, features)
    return _in_range(lambda e, h: (e @ e.T) * (h @ h.T + 1.0), e, h, "a last-layer gradient inner product")


def last_layer_grad_sq_norms(errors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(n,) squared norms of last-layer gradients, ``||e_i||^2 (||h_i||^2 + 1)`` (GraNd's closed form)."""
    e, h = _pair(errors, features)
    return _in_range(lambda e, h: e.square().sum(1) * (h.square().sum(1) + 1.0), e, h,
                     "a squared last-layer gradient norm")


def _in_range(formula, e: torch.Tensor, h: torch.Tensor, what: str) -> torch.Tensor:
    if squares_fit(max_abs(e), max_abs(h)):
        out = formula(e.float(), h.float())
        if all_finite(out):
            return out
    return to_float32(formula(e.double(), h.double()), what)


def _pair(errors, features):
    e = check_matrix(errors, "errors")
    h = check_matrix(features, "features")
    if e.shape[0] != h.shape[0]:
        raise ShapeError(f"errors and features must have the same rows, got {e.shape[0]} and {h.shape[0]}")
    return e, h
