"""Herding (kernel herding / iCaRL exemplar rule) coreset selection."""
from __future__ import annotations

import torch

from erasus.ops import _backend, _cpp
from erasus.ops._magnitude import coreset_exponent
from erasus.ops._validate import check_k, check_matrix_max_abs


def herding(x: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """Pick ``k`` rows of ``x`` whose running mean tracks the mean of all rows (Welling 2009).

    Step i chooses the unchosen row x_j minimising ``||(i+1) * mean(x) - S_i - x_j||``, where ``S_i`` is the
    sum of the rows chosen so far. ``S_i`` is updated incrementally (never re-summed), so each step is one
    pass over ``x``. (DeepCore's ``Herding`` takes the argmax of this distance; this is the classic argmin.)
    Every backend computes on ``x`` rescaled by a power of two (exact) when max|x| is outside [2**-20, 2**20],
    so squared distances never overflow or underflow: the selection is the same for ``x`` and ``c * x`` (c a
    power of two; any c up to rounding) over the whole float32 range.

    Args:
        x: (n, d) float32, float16 or bfloat16 features, CPU or CUDA; accumulation is float32.
        k: number of rows, 1 <= k <= n; ``k == n`` returns every row.
        backend: ``"reference"``, ``"cpp"`` or ``"triton"``; default: the fastest one for ``x.device``. The C++
            backend uses at most ``torch.get_num_threads()`` threads and selects the same rows on any number.

    Returns:
        int64 (k,) row indices in selection order, on ``x.device``. Ties go to the lowest row index.

    Example:
        >>> import torch, erasus.ops
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
        >>> erasus.ops.herding(x, 2).tolist()
        [2, 1]
    """
    x, largest = check_matrix_max_abs(x, "x")  # one pass over x for the finiteness check and the scale
    k = check_k(k, x.shape[0])
    implementation = HERDING.select(x.device, backend)
    return implementation(x, k, 2.0 ** -coreset_exponent(largest)).to(x.device)


def herding_reference(x: torch.Tensor, k: int, scale: float = 1.0) -> torch.Tensor:
    """Plain-torch oracle on ``x * scale``: ``argmin_j ||x_j||^2 - 2 x_j . t`` over unchosen rows, with
    t = (i+1) mean - S_i. Rows are centred first (the choice is shift-invariant), so the expanded form does
    not cancel."""
    xf = x.float() if scale == 1.0 else x.float() * scale
    xf = xf - xf.mean(dim=0)
    n, d = xf.shape
    sq_norms = (xf * xf).sum(dim=1)
    mean = xf.mean(dim=0)
    chosen_sum = torch.zeros(d, dtype=torch.float64, device=xf.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=xf.device)
    out = torch.empty(k, dtype=torch.int64, device=xf.device)
    score = torch.empty(n, device=xf.device)
    for i in range(k):
        target = (mean.double() * (i + 1) - chosen_sum).float()
        torch.addmv(sq_norms, xf, target, alpha=-2.0, out=score)
        score[chosen] = float("inf")
        j = torch.argmin(score)
        out[i] = j
        chosen[j] = True
        chosen_sum += xf[j].double()
    return out


def _herding_cpp(x: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    out = torch.empty(k, dtype=torch.int64)
    selected = torch.empty(x.shape[0], dtype=torch.uint8)
    # Threads as for k-center (see _kcenter_cpp); the selection does not depend on them.
    _cpp.call("herding", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), out.numpy(), selected.numpy(), scale,
              torch.get_num_threads())
    return out


def _herding_triton(x: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    from erasus.kernels import herding as kernel

    return kernel.herding(x, k, scale)


#: (x, k, scale) -> int64 (k,) indices
HERDING = _backend.OpTable("herding", {"reference": herding_reference, "cpp": _herding_cpp,
                                       "triton": _herding_triton})
BACKENDS = HERDING.backends
