"""Magnitude: keeping the ops exact over the whole float32 range.

Squares of finite float32 values overflow above ~1.8e19 and underflow below ~1e-19, long before the values
themselves do. Two tools keep the ops honest about that:

- a power-of-two rescaling (exact: it only moves exponents) that brings the largest |x| near 1, used by the
  coreset loops, so that their selections are the same for x and c * x and their distances cannot overflow;
- float64 recomputation, whose range holds every product of four float32 values, used by the gradient
  kernels where a float32 result could be wrong; a float64 result that does not fit in float32 is reported
  as an overflow (:func:`to_float32`), never returned as infinity or as a wrong finite number.
"""
from __future__ import annotations

import math

import torch

from erasus.errors import NonFiniteError

# 2**-e must stay a normal float32 (kernels multiply by it), so exponents are clamped to this range.
MAX_EXPONENT = 126


def pow2_exponent(max_abs: float) -> int:
    """e such that ``max_abs * 2**-e`` lies in [0.5, 1) (clamped to +-126 for subnormal or huge inputs; 0 for 0)."""
    if max_abs == 0.0:
        return 0
    return max(-MAX_EXPONENT, min(MAX_EXPONENT, math.frexp(max_abs)[1]))


def coreset_exponent(max_abs: float) -> int:
    """The power of two the coreset loops divide by: 0 (no rescaling, no extra work) when max|x| lies in
    [2**-20, 2**20], where squared distances can neither overflow nor lose precision to subnormals; otherwise
    :func:`pow2_exponent`. Any power of two gives the same selection (it scales every distance alike)."""
    if 2.0**-20 <= max_abs <= 2.0**20:
        return 0
    return pow2_exponent(max_abs)


def to_float32(values: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` (float64) as float32, or a NonFiniteError if some value is too large for float32."""
    out = values.float()
    if values.numel() and not bool(torch.isfinite(out).all()):
        largest = float(values.abs().max())
        raise NonFiniteError(f"{what} overflows float32 (the largest is {largest:.4g} > 3.4e38) although the "
                             "inputs are finite; scale the inputs down")
    return out


def squares_fit(*maxima: float, limit_exponent: int = 30) -> bool:
    """True when every |value| bounded by ``maxima`` lies in [2**-limit, 2**limit]: their squares and the
    products of two squares then stay far inside the float32 range, so a float32 kernel that squares its
    inputs separately loses nothing but rounding. An all-zero input (maximum 0) fits."""
    low, high = 2.0 ** -limit_exponent, 2.0 ** limit_exponent
    return all(m == 0.0 or low <= m <= high for m in maxima)
