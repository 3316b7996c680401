"""Input checks shared by the ops. Every message names the argument it is about."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from erasus.errors import DTypeError, EmptyInputError, InvalidInputError, NonFiniteError, ShapeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: checks of tensors up to this many bytes run in numpy on the calling thread (see _magnitude_bits)
_SMALL_BYTES = 1 << 20


def check_matrix(x, name: str = "x", finite: bool = True) -> torch.Tensor:
    """A 2-D, non-empty, finite float32/float16/bfloat16 tensor; returned detached and contiguous. finite=False
    leaves the finiteness check to a caller that reads the values anyway (it must raise NonFiniteError)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ShapeError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] == 0:
        raise EmptyInputError(f"{name} has no rows (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise EmptyInputError(f"{name} has no features (shape {tuple(x.shape)})")
    if finite and not all_finite(x):
        raise NonFiniteError(f"{name} holds NaN or infinite values")
    return x.detach().contiguous()


def check_matrix_max_abs(x, name: str = "x") -> tuple[torch.Tensor, float]:
    """:func:`check_matrix` and the largest |element| (for an op's power-of-two scale) from one pass over x:
    a NaN or infinity makes that largest value non-finite, which is refused here."""
    x = check_matrix(x, name, finite=False)
    largest = max_abs(x)
    if not math.isfinite(largest):
        raise NonFiniteError(f"{name} holds NaN or infinite values")
    return x, largest


def all_finite(x: torch.Tensor) -> bool:
    """True when x holds no NaN or infinity, in one pass. The smallest and largest element decide it (NaN
    propagates through both); a sum would overflow for large finite values and report them as infinite."""
    if x.numel() == 0:
        return True
    small = _magnitude_bits(x)
    if small is not None:
        bits, exponent_all_ones = small
        return bits < exponent_all_ones
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def max_abs(x: torch.Tensor) -> float:
    """The largest |element| of a finite tensor (0 for an empty one), in one pass and without a copy."""
    if x.numel() == 0:
        return 0.0
    small = _magnitude_bits(x)
    if small is not None:
        return float(torch.tensor(small[0], dtype=_UINT_OF[x.dtype][2]).view(x.dtype))
    low, high = torch.aminmax(x.detach())
    return max(-float(low), float(high))


# dtype -> (unsigned numpy view, its bits with the sign cleared, the signed torch dtype of the same width,
# the smallest magnitude bits of inf / NaN: the exponent all ones)
_UINT_OF = {torch.float32: (np.uint32, 0x7FFFFFFF, torch.int32, 0x7F800000),
            torch.float16: (np.uint16, 0x7FFF, torch.int16, 0x7C00),
            torch.bfloat16: (np.uint16, 0x7FFF, torch.int16, 0x7F80)}


def _magnitude_bits(x: torch.Tensor):
    """For a small CPU float tensor: (largest magnitude bits, the bits where inf / NaN start), from numpy on the
    calling thread; None otherwise. Sign-cleared float bits order like the magnitudes, NaN and inf above every
    finite value. Why not torch.aminmax: on a busy machine its parallel region waits for parked threads (a
    1 MB reduction took 7.9 ms on 2 threads against 0.08 ms on one), and changing torch's thread count is not
    an option here (these checks run inside backward hooks; see erasus/ops/_threads.py)."""
    if x.device.type != "cpu" or x.dtype not in _UINT_OF or x.numel() * x.element_size() > _SMALL_BYTES:
        return None
    unsigned, magnitude, signed, top = _UINT_OF[x.dtype]
    bits = x.detach().reshape(-1).view(signed).numpy().view(unsigned)
    return int(np.bitwise_and(bits, magnitude).max()), top


def check_k(k, n: int, name: str = "k") -> int:
    """An integer with 1 <= k <= n."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise InvalidInputError(f"{name} must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= n:
        raise InvalidInputError(f"{name} must satisfy 1 <= {name} <= n = {n}, got {k}")
    return k


def check_indices(idx, n: int, name: str) -> torch.Tensor:
    """An int or a 1-D collection of distinct integers in [0, n); returned as an int64 CPU tensor."""
    if isinstance(idx, bool):
        raise InvalidInputError(f"{name} must be an index or a sequence of indices, got {idx!r}")
    if isinstance(idx, numbers.Integral):
        idx = [int(idx)]
    try:
        t = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(idx)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"{name} must be an index or a sequence of indices, got {idx!r}") from exc
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ShapeError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise EmptyInputError(f"{name} is empty; pass None for the default")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise DTypeError(f"{name} must hold integers, got {t.dtype}")
    t = t.to(device="cpu", dtype=torch.int64)
    if int(t.min()) < 0 or int(t.max()) >= n:
        raise InvalidInputError(f"{name} holds indices outside [0, {n})")
    if t.unique().numel() != t.numel():
        raise InvalidInputError(f"{name} holds repeated indices")
    return t.contiguous()
