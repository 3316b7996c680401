"""The two layer-level ops on a linear map's inputs ``a`` and output gradients ``g``: per-sample squared gradient
norms (:func:`per_sample_grad_norms`) and the sum over samples of squared gradients (:func:`squared_grad_sum`,
the Fisher diagonal of one layer). The model-level ops (:func:`erasus.ops.grad_norms`,
:func:`erasus.ops.fisher_diagonal`) call them through the layer rules of :mod:`erasus.ops.layers`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from erasus.errors import DTypeError, InvalidInputError, NonFiniteError, ShapeError
from erasus.ops import _backend, _cpp
from erasus.ops._magnitude import squares_fit, to_float32
from erasus.ops._validate import FLOAT_DTYPES, all_finite, max_abs

PATHS = ("auto", "outer", "ghost", "materialize")
_PATH_CODE = {"outer": 0, "ghost": 1, "materialize": 2}
THIN = 64  # layers with min(d_in, d_out) <= THIN run on the C++ kernels on CPU (measured, bench/RESULTS.md)


class SquaredGradNorms(NamedTuple):
    weight: torch.Tensor
    """float32 (B,): ||dL_i/dW||_F^2 per sample."""
    bias: torch.Tensor
    """float32 (B,): ||dL_i/db||^2 per sample (the bias part; ignore it for a layer without bias)."""


def choose_path(steps: int, d_in: int, d_out: int) -> str:
    """The cheaper exact path by flop count: ``outer`` when T = 1, ``ghost`` (~T^2 (d + p) per sample) when
    T (d + p) < d p, else ``materialize`` (~T d p per sample, tile by tile)."""
    if steps == 1:
        return "outer"
    return "ghost" if steps * (d_in + d_out) < d_in * d_out else "materialize"


def per_sample_grad_norms(a: torch.Tensor, g: torch.Tensor, *, path: str = "auto", backend: str | None = None
                          ) -> SquaredGradNorms:
    """Squared per-sample gradient norms of a linear map ``y = x W^T + b`` without forming per-sample grads.

    With inputs ``A_i`` (T x d) and output gradients ``G_i`` (T x p) of sample i, ``dL_i/dW = G_i^T A_i`` and
    ``dL_i/db = sum_t g_it``. Paths (all exact; ``auto`` picks by :func:`choose_path`):

    - ``outer`` (T = 1): ``||a_i||^2 ||g_i||^2``;
    - ``ghost``: ``<A_i A_i^T, G_i G_i^T>_F``, cost ~T^2 (d + p), no d x p buffer;
    - ``materialize``: ``||G_i^T A_i||^2`` built one tile at a time and squared in place, cost ~T d p.

    ``g`` must be the gradient of the *sum* of per-sample losses; with a mean-reduced loss every norm is
    scaled by 1/B^2.

    Exact over the whole float32 range: a sample whose float32 result may have lost its value to an overflow
    or underflow of an intermediate square (values far from 1, e.g. inputs of 1e-25 with gradients of 1e25)
    is recomputed in float64. A norm too large for float32 raises :class:`~erasus.errors.NonFiniteError`.

    Args:
        a: (B, T, d) or (B, d) layer inputs; float32, float16 or bfloat16 (accumulated in float32).
        g: (B, T, p) or (B, p) gradients of the layer outputs, same dtype and (B, T) as ``a``.
        path: ``"auto"``, ``"outer"``, ``"ghost"`` or ``"materialize"``.
        backend: ``"reference"``, ``"cpp"`` or ``"triton"``; default: the fastest for the device.

    Returns:
        :class:`SquaredGradNorms` ``(weight, bias)``, float32 (B,) each, on the input's device. B = 0 gives empty
        tensors; T = 0 gives zeros.

    Example:
        >>> import torch, erasus.ops
        >>> a, g = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0]]])
        >>> erasus.ops.per_sample_grad_norms(a, g).weight.tolist()   # ||[3] x [1, 2]||^2 = 9 + 36
        [45.0]
    """
    a, g = _check_pair(a, g)
    if path not in PATHS:
        raise InvalidInputError(f"path must be one of {PATHS}, got {path!r}")
    if path == "outer" and a.shape[1] != 1:
        raise InvalidInputError(f"path='outer' needs one step per sample (T = 1), got T = {a.shape[1]}")
    return norms_unchecked(a, g, path, backend)


def norms_unchecked(a: torch.Tensor, g: torch.Tensor, path: str = "auto", backend: str | None = None, *,
                    with_bias: bool = True, out_dtype: torch.dtype = torch.float32) -> SquaredGradNorms:
    """:func:`per_sample_grad_norms` on inputs already checked: (B, T, d) and (B, T, p), one dtype and device,
    finite. The model-level code calls this, having checked its gradients once; a layer without a trainable
    bias passes ``with_bias=False``, and the bias part is then returned as computed (an overflow there is not
    an error, the caller ignores it). ``out_dtype=torch.float64`` returns the squared norms in float64 without
    a float32 range check (a norm can fit in float32 while its square does not)."""
    batch, steps, d = a.shape
    p = g.shape[2]
    if path == "auto":
        path = choose_path(steps, d, p)
    res = _fast_norms(a, g, path, backend)
    return _exact_where_float32_may_fail(a, g, path, res, with_bias, out_dtype)


def _fast_norms(a: torch.Tensor, g: torch.Tensor, path: str, backend: str | None) -> SquaredGradNorms:
    batch, steps, d = a.shape
    p = g.shape[2]
    # On the CPU the C++ kernel wins the T = 1 row norms and thin layers (one side <= 64, e.g. LoRA factors);
    # for wide GEMM-shaped work torch's BLAS wins (bench/RESULTS.md, layer-level table). Strided inputs (the
    # unfolded input of a convolution) would need a copy for C++, while torch's bmm reads them in place.
    dense = a.is_contiguous() and g.is_contiguous()
    cpu_order = ("cpp", "reference") if dense and (path == "outer" or min(d, p) <= THIN) else ("reference",)
    implementation = GRAD_NORMS.select(a.device, backend, preferred={**_backend.PREFERRED, "cpu": cpu_order})
    if batch == 0 or steps == 0 or d == 0 or p == 0:
        # no weight gradient; the bias gradient sum_t g_t still exists when only d is 0
        bias = g.sum(dim=1, dtype=torch.float32).square().sum(dim=1)
        return SquaredGradNorms(torch.zeros(batch, dtype=torch.float32, device=a.device), bias)
    if implementation is not per_sample_grad_norms_reference:  # the compiled kernels read dense row-major memory
        a, g = a.contiguous(), g.contiguous()
    return implementation(a, g, path)


def _norms_cpp(a: torch.Tensor, g: torch.Tensor, path: str) -> SquaredGradNorms:
    weight = torch.empty(a.shape[0], dtype=torch.float32)
    bias = torch.empty(a.shape[0], dtype=torch.float32)
    _cpp.call("per_sample_grad_norms", _cpp.as_numpy(a), _cpp.as_numpy(g), _cpp.elem_name(a.dtype),
              _PATH_CODE[path], weight.numpy(), bias.numpy())
    return SquaredGradNorms(weight, bias)


def _norms_triton(a: torch.Tensor, g: torch.Tensor, path: str) -> SquaredGradNorms:
    from erasus.kernels import per_sample_grad_norms as kernel

    weight = kernel.weight_norms(a, g, path)
    return SquaredGradNorms(weight, g.sum(dim=1, dtype=torch.float32).square().sum(dim=1))


# A float32 intermediate below 2**-149 is lost (underflow). The ghost and outer paths square A and G
# separately, which loses at most 2**-149 T^2 d p (max|a|^2 + max|g|^2) of a sample's squared norm; a result
# above that loss divided by float32's epsilon (2**-24, with margin: 2**-120 overall) is exact up to rounding.
_SUSPECT_BELOW = 2.0 ** -120


def _exact_where_float32_may_fail(a: torch.Tensor, g: torch.Tensor, path: str, res: SquaredGradNorms,
                                  with_bias: bool,
                                  out_dtype: torch.dtype) -> SquaredGradNorms:
    """Recompute in float64 the samples whose float32 result overflowed or may have underflowed."""
    batch, steps, d = a.shape
    p = g.shape[2]
    weight, bias = res.weight.to(out_dtype), res.bias.to(out_dtype)
    if batch == 0 or steps == 0:
        return SquaredGradNorms(weight, bias)
    largest_a, largest_g = max_abs(a), max_abs(g)
    if out_dtype == torch.float64 and with_bias and largest_g < 2.0**-40:
        # the float32 squares of sums this small may underflow; in float64 they cannot
        bias = g.sum(dim=1, dtype=torch.float32).double().square().sum(dim=1)
    suspect = ~torch.isfinite(weight)
    if with_bias:
        suspect |= ~torch.isfinite(bias)
    if largest_a > 0.0 and largest_g > 0.0:  # otherwise every weight gradient is exactly zero
        suspect |= res.weight < _SUSPECT_BELOW * steps * steps * d * p * (largest_a**2 + largest_g**2)
    if not bool(suspect.any()):
        return SquaredGradNorms(weight, bias)
    rows = suspect.nonzero().flatten()
    exact = per_sample_grad_norms_reference(a[rows], g[rows], path, dtype=torch.float64)
    weight, bias = weight.clone(), bias.clone()
    if out_dtype == torch.float64:
        weight[rows], bias[rows] = exact.weight, exact.bias
    else:
        weight[rows] = to_float32(exact.weight, "a per-sample squared weight-gradient norm")
        bias[rows] = to_float32(exact.bias, "a per-sample squared bias-gradient norm") if with_bias \
            else exact.bias.float()
    return SquaredGradNorms(weight, bias)


def per_sample_grad_norms_reference(a: torch.Tensor, g: torch.Tensor, path: str,
                                    dtype: torch.dtype = torch.float32) -> SquaredGradNorms:
    """Plain-torch oracle for each path, computed in ``dtype`` (float32, or float64 for exact range)."""
    af, gf = a.to(dtype), g.to(dtype)
    bias = gf.sum(dim=1).square().sum(dim=1)
    if path == "outer":
        weight = af.square().sum(dim=(1, 2)) * gf.square().sum(dim=(1, 2))
    elif path == "ghost":
        weight = (torch.bmm(af, af.transpose(1, 2)) * torch.bmm(gf, gf.transpose(1, 2))).sum(dim=(1, 2))
    else:  # batched G_i^T A_i in chunks of samples, so the chunk x p x d buffer stays under ~64 MB
        batch, _, d = af.shape
        chunk = max(1, (1 << 24) // max(1, d * gf.shape[2]))
        weight = torch.cat([torch.bmm(gf[i : i + chunk].transpose(1, 2), af[i : i + chunk]).square().sum(dim=(1, 2))
                            for i in range(0, batch, chunk)]) if batch else gf.new_zeros(0)
    return SquaredGradNorms(weight, bias)


#: (a, g, path) -> squared SquaredGradNorms of dense (B, T, d) / (B, T, p) inputs
GRAD_NORMS = _backend.OpTable("per_sample_grad_norms", {"reference": per_sample_grad_norms_reference,
                                                        "cpp": _norms_cpp, "triton": _norms_triton})


def _check_pair(a, g) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("a", a), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (2, 3):
            raise ShapeError(f"{name} must be (B, T, features) or (B, features), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if a.dim() != g.dim():
        raise ShapeError(f"a and g must have the same number of dimensions, got {tuple(a.shape)} and "
                         f"{tuple(g.shape)}")
    if a.dtype != g.dtype:
        raise DTypeError(f"a and g must share a dtype, got {a.dtype} and {g.dtype}")
    if a.device != g.device:
        raise InvalidInputError(f"a and g must be on one device, got {a.device} and {g.device}")
    if a.dim() == 2:
        a, g = a[:, None, :], g[:, None, :]
    if a.shape[:2] != g.shape[:2]:
        raise ShapeError(f"a and g must agree on (B, T), got {tuple(a.shape[:2])} and {tuple(g.shape[:2])}")
    for name, t in (("a", a), ("g", g)):
        if not all_finite(t):
            raise NonFiniteError(f"{name} holds NaN or infinite values")
    return a.detach(), g.detach()


class SquaredGradSum(NamedTuple):
    weight: torch.Tensor
    """float32 (p, d): sum_i (dL_i/dW)^2 elementwise."""
    bias: torch.Tensor
    """float32 (p,): sum_i (dL_i/db)^2."""


def squared_grad_sum(a: torch.Tensor, g: torch.Tensor, *, backend: str | None = None) -> SquaredGradSum:
    """Sum over samples of the squared per-sample gradients of a linear map ``y = x W^T + b``: the diagonal
    empirical Fisher of that layer (before dividing by the number of samples).

    With T = 1 this is ``(G o G)^T (A o A)``, one GEMM of squares. With a sequence axis there is no such
    identity (``(sum_t g_t a_t^T)^2`` has cross terms), so each sample's ``G_i^T A_i`` is formed tile by tile
    and squared in place, never as a B x p x d buffer.

    Exact over the whole float32 range: when a float32 square could overflow or underflow (T = 1 squares ``a``
    and ``g`` separately, so values beyond 2**+-30 are computed in float64) or did overflow, the sum is
    computed in float64. A result too large for float32 raises :class:`~erasus.errors.NonFiniteError`.

    Args:
        a: (B, T, d) or (B, d) inputs; g: (B, T, p) or (B, p) output gradients of the *summed* loss (a
            mean-reduced loss scales every term by 1/B^2). float32, float16 or bfloat16, one dtype.
        backend: ``"reference"``, ``"cpp"`` or ``"triton"``.

    Example:
        >>> import torch, erasus.ops
        >>> a, g = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1.0], [2.0]])
        >>> erasus.ops.squared_grad_sum(a, g).weight.tolist()   # 1*[1, 4] + 4*[9, 0]
        [[37.0, 4.0]]
    """
    a, g = _check_pair(a, g)
    return squares_unchecked(a, g, backend)


def squares_unchecked(a: torch.Tensor, g: torch.Tensor, backend: str | None = None, *,
                      with_bias: bool = True) -> SquaredGradSum:
    """:func:`squared_grad_sum` on inputs already checked ((B, T, d), (B, T, p), one dtype, finite). With
    ``with_bias=False`` the bias part is returned as computed (the caller ignores it)."""
    if a.shape[1] == 1 and not squares_fit(max_abs(a), max_abs(g)):
        return _exact_squares(a, g, with_bias)
    res = _fast_squares(a, g, backend)
    if all_finite(res.weight) and (not with_bias or all_finite(res.bias)):
        return res
    return _exact_squares(a, g, with_bias)


def _exact_squares(a: torch.Tensor, g: torch.Tensor, with_bias: bool) -> SquaredGradSum:
    exact = squared_grad_sum_reference(a, g, dtype=torch.float64)
    return SquaredGradSum(to_float32(exact.weight, "a sum of squared weight gradients"),
                          to_float32(exact.bias, "a sum of squared bias gradients") if with_bias
                          else exact.bias.float())


def _fast_squares(a: torch.Tensor, g: torch.Tensor, backend: str | None) -> SquaredGradSum:
    batch, steps, d = a.shape
    p = g.shape[2]
    dense = a.is_contiguous() and g.is_contiguous()  # as in grad_norms: C++ only where it needs no copy
    cpu_order = ("cpp", "reference") if dense and min(d, p) <= THIN else ("reference",)
    implementation = SQUARED_GRAD_SUM.select(a.device, backend,
                                             preferred={**_backend.PREFERRED, "cpu": cpu_order})
    if batch == 0 or steps == 0 or d == 0 or p == 0:
        # no weight gradient; the bias gradient sum_t g_t still exists when only d is 0
        return SquaredGradSum(torch.zeros(p, d, dtype=torch.float32, device=a.device),
                              g.sum(dim=1, dtype=torch.float32).square().sum(dim=0))
    if implementation is not squared_grad_sum_reference:  # the compiled kernels read dense row-major memory
        a, g = a.contiguous(), g.contiguous()
    return implementation(a, g)


def _squares_cpp(a: torch.Tensor, g: torch.Tensor) -> SquaredGradSum:
    weight = torch.zeros(g.shape[2], a.shape[2], dtype=torch.float32)
    bias = torch.zeros(g.shape[2], dtype=torch.float32)
    _cpp.call("squared_grad_sum", _cpp.as_numpy(a), _cpp.as_numpy(g), _cpp.elem_name(a.dtype), weight.numpy(),
              bias.numpy())
    return SquaredGradSum(weight, bias)


def _squares_triton(a: torch.Tensor, g: torch.Tensor) -> SquaredGradSum:
    from erasus.kernels import squared_grad_sum as kernel

    weight = torch.zeros(g.shape[2], a.shape[2], dtype=torch.float32, device=a.device)
    kernel.squared_grad_sum_(a, g, weight)
    return SquaredGradSum(weight, g.sum(dim=1, dtype=torch.float32).square().sum(dim=0))


def squared_grad_sum_reference(a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype = torch.float32
                               ) -> SquaredGradSum:
    """Plain-torch oracle in ``dtype`` (float32, or float64 for exact range): one GEMM of squares for T = 1,
    else per-sample bmm in chunks of samples (the chunk x p x d buffer stays under ~64 MB)."""
    af, gf = a.to(dtype), g.to(dtype)
    bias = gf.sum(dim=1).square().sum(dim=0)
    if af.shape[1] == 1:
        return SquaredGradSum(gf[:, 0].square().T @ af[:, 0].square(), bias)
    chunk = max(1, (1 << 24) // max(1, af.shape[2] * gf.shape[2]))
    weight = torch.zeros(gf.shape[2], af.shape[2], dtype=dtype, device=af.device)
    for i in range(0, af.shape[0], chunk):
        weight += torch.bmm(gf[i : i + chunk].transpose(1, 2), af[i : i + chunk]).square().sum(dim=0)
    return SquaredGradSum(weight, bias)


#: (a, g) -> SquaredGradSum of dense (B, T, d) / (B, T, p) inputs
SQUARED_GRAD_SUM = _backend.OpTable("squared_grad_sum", {"reference": squared_grad_sum_reference,
                                                         "cpp": _squares_cpp, "triton": _squares_triton})
