"""Greedy k-center (farthest-first traversal) coreset selection."""
from __future__ import annotations

from typing import NamedTuple

import torch

from erasus.errors import InvalidInputError
from erasus.ops import _backend, _cpp
from erasus.ops._magnitude import coreset_exponent
from erasus.ops._validate import check_indices, check_k, check_matrix_max_abs, max_abs

METRICS = ("l2", "cosine")


class KCenterResult(NamedTuple):
    indices: torch.Tensor
    """int64 (k,), in selection order, on the input's device; the init centres come first."""
    radius: torch.Tensor
    """0-d float64: the largest distance from any row to its nearest selected row (Euclidean for
    ``metric="l2"``, ``1 - cos`` for ``metric="cosine"``); 0 when every row is selected. float64 because the
    radius of finite float32 rows can exceed the float32 range (up to 2 sqrt(d) max|x|)."""


def kcenter_greedy(x: torch.Tensor, k: int, *, metric: str = "l2", init=None, backend: str | None = None
                   ) -> KCenterResult:
    """Pick ``k`` rows of ``x`` that cover it: each new centre is the row farthest from those chosen so far.

    O(n) extra memory: a running minimum distance per row, updated in one fused pass over ``x`` per centre
    (distance to the newest centre, min-update, argmax); never an n x n or k x n matrix.

    Args:
        x: (n, d) float32, float16 or bfloat16 features, CPU or CUDA. Half types are read as they are and
            accumulated in float32.
        k: number of rows to select, 1 <= k <= n. ``k == n`` returns every row.
        metric: ``"l2"`` (Euclidean) or ``"cosine"`` (1 - cosine similarity; rows must be non-zero).
        init: the first centre(s): an index or a sequence of distinct indices, which open the selection in
            the given order. ``None`` starts from the row nearest the mean of ``x``, which does not depend on
            the order of the rows.
        backend: ``"reference"``, ``"cpp"`` or ``"triton"``; default: the fastest one for ``x.device``
            (see :func:`erasus.ops.backends`).

    Ties go to the lowest row index, so backends agree exactly unless two distances differ only by rounding.
    The C++ backend uses at most ``torch.get_num_threads()`` threads (fewer on a busy machine or for small
    ``x``) and selects bit for bit the same rows whatever their number; 16-bit ``x`` selects exactly what its
    float32 widening selects.
    Every backend computes on ``x`` rescaled by a power of two (exact) when max|x| is outside [2**-20, 2**20],
    so squared distances never overflow or underflow: the selection is the same for ``x`` and ``c * x`` (c a
    power of two; any c up to rounding) over the whole float32 range, and the radius scales by |c|.

    Example:
        >>> import torch, erasus.ops
        >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]])
        >>> erasus.ops.kcenter_greedy(x, 2, init=0).indices.tolist()
        [0, 3]
    """
    x, largest = check_matrix_max_abs(x, "x")  # one pass over x for the finiteness check and the scale
    n = x.shape[0]
    k = check_k(k, n)
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "cosine":
        x = _unit_rows(x)
    init_idx = None if init is None else check_indices(init, n, "init")
    if init_idx is not None and init_idx.numel() > k:
        raise InvalidInputError(f"init holds {init_idx.numel()} indices but k = {k}")
    implementation = KCENTER.select(x.device, backend)
    exponent = coreset_exponent(largest if metric == "l2" else max_abs(x))
    scale = 2.0 ** -exponent
    if init_idx is None:
        init_idx = _default_init(x, scale)
    indices, radius2 = implementation(x, k, init_idx, scale)
    radius2 = radius2.double() * 4.0 ** exponent  # back to the units of x (exact: a power of two)
    radius = radius2.sqrt() if metric == "l2" else radius2 / 2  # on unit rows, ||u - v||^2 / 2 = 1 - cos
    return KCenterResult(indices.to(x.device), radius.to(x.device))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # float64 norms: the squares of any finite float32 row fit, so no row looks zero or infinite by mistake
    xd = x.double()
    norms = torch.linalg.vector_norm(xd, dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise InvalidInputError("x has an all-zero row, which has no cosine distance; use metric='l2'")
    return (xd / norms).to(x.dtype)


#: rows of x widened at a time by :func:`_default_init` (about this many bytes of float32)
_INIT_CHUNK_BYTES = 4 << 20


def _default_init(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The row nearest the mean of ``x * scale`` (the mean summed in float64, rounded to float32; ties to the
    lowest index), whichever backend then runs the selection: on CPU in C++ where erasus._C is built (two
    streaming passes over x on the op's threads, 50k x 512: ~11-13 ms against ~16-23 ms for the torch chunks),
    else through :func:`_default_init_torch`. Neither widens x whole."""
    if x.device.type == "cpu" and _backend._probe("cpp")[0]:
        index = _cpp.call("row_nearest_mean", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), scale,
                          torch.get_num_threads())
        return torch.tensor([index], dtype=torch.int64)
    return _default_init_torch(x, scale)


def _default_init_torch(x: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`_default_init` in torch, through one reused float32 buffer of a few MB: two passes over row
    chunks (their sum, then each row's distance to the mean), so the O(n) extra memory of the op holds here
    too, and 16-bit x is never widened whole (50k x 512: a 100 MB copy and ~70 ms before)."""
    n, d = x.shape
    rows = max(1, min(n, _INIT_CHUNK_BYTES // (4 * d)))
    buf = torch.empty(rows, d, dtype=torch.float32, device=x.device)

    as_is = x.dtype == torch.float32 and scale == 1.0  # float32 rows are read in place

    def widened(start: int) -> torch.Tensor:  # x[start:start + rows] * scale in float32 (exact: a power of 2)
        chunk = x[start:start + rows]
        if as_is:
            return chunk
        b = buf[: chunk.shape[0]]
        b.copy_(chunk)
        if scale != 1.0:
            b.mul_(scale)
        return b

    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        total += widened(start).sum(dim=0, dtype=torch.float64)
    mean = (total / n).float()
    # direct differences: the expanded ||x||^2 - 2 x.mean cancels catastrophically for features far from 0
    norms = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        chunk = widened(start)
        b = buf[: chunk.shape[0]]
        torch.sub(chunk, mean, out=b)
        torch.linalg.vector_norm(b, dim=1, out=norms[start:start + b.shape[0]])
    return torch.argmin(norms).reshape(1).cpu()


def kcenter_greedy_reference(x: torch.Tensor, k: int, init: torch.Tensor, scale: float = 1.0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch oracle on ``x * scale``: running-min loop with one GEMV per centre. Returns (indices, squared
    radius of ``x * scale``). Rows are centred first: distances do not change, and the expanded form
    ||x||^2 + ||c||^2 - 2 x.c then does not cancel for features far from the origin."""
    xf = x.float() if scale == 1.0 else x.float() * scale
    xf = xf - xf.mean(dim=0)
    n = xf.shape[0]
    sq_norms = (xf * xf).sum(dim=1)
    min_dist = torch.full((n,), float("inf"), device=xf.device)
    indices = torch.empty(k, dtype=torch.int64, device=xf.device)
    indices[: init.numel()] = init.to(xf.device)
    dist = torch.empty(n, device=xf.device)
    for step in range(k):
        c = indices[step]
        # ||x_j - c||^2 = ||x_j||^2 + ||c||^2 - 2 x_j.c, clamped against rounding below zero
        torch.addmv(sq_norms + sq_norms[c], xf, xf[c], alpha=-2.0, out=dist)
        dist.clamp_(min=0.0)
        torch.minimum(min_dist, dist, out=min_dist)  # keeps the -1 that marks chosen centres
        min_dist[c] = -1.0
        if init.numel() <= step + 1 < k:
            indices[step + 1] = torch.argmax(min_dist)
    return indices, min_dist.max().clamp(min=0.0)


def _kcenter_cpp(x: torch.Tensor, k: int, init: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    indices = torch.empty(k, dtype=torch.int64)
    min_dist = torch.empty(x.shape[0], dtype=torch.float32)  # preallocated: the kernel writes it every step
    # At most torch's thread count (the kernel also caps it by the CPUs this process may use, runs small steps on
    # one thread and moves between its team and one thread as the step times it measures say); same selection.
    r2 = _cpp.call("kcenter_greedy", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), init.numpy(), indices.numpy(),
                   min_dist.numpy(), scale, True, torch.get_num_threads())
    return indices, torch.tensor(r2, dtype=torch.float32)


def _kcenter_triton(x: torch.Tensor, k: int, init: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from erasus.kernels import kcenter as kernel

    # small X: the whole loop in one program (per-step launches would dominate); large X: one launch per step
    run = (kernel.kcenter_greedy_persistent if x.numel() * x.element_size() <= kernel.PERSISTENT_MAX_BYTES
           else kernel.kcenter_greedy)
    indices, radius2, _ = run(x, init.to(x.device), k, scale)
    return indices, radius2


#: (x, k, init indices, scale) -> (indices, squared radius of x * scale)
KCENTER = _backend.OpTable("kcenter_greedy", {"reference": kcenter_greedy_reference, "cpp": _kcenter_cpp,
                                              "triton": _kcenter_triton})
BACKENDS = KCENTER.backends
