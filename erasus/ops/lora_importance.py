"""LoRAPrune's weight importance from LoRA gradients, per element or summed over groups, and its moving average.

For a LoRA-wrapped linear layer with frozen weight W (out x in), adapters A (r x in) and B (out x r), scaling
s = lora_alpha / r, and the gradients G_A, G_B of a loss with respect to A and B, LoRAPrune (Zhang et al.,
arXiv 2305.18403) estimates the full weight gradient as G_hat = G_B A + B G_A - G_B G_A and scores each weight
of the merged matrix by the first-order Taylor term I = |G_hat * (W + s B A)|. Only the adapters need
gradients; the op never forms G_hat or B A as a whole (see :func:`lora_importance`).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import torch

from erasus.errors import DTypeError, EmptyInputError, InvalidInputError, NonFiniteError, ShapeError
from erasus.ops import _backend
from erasus.ops._validate import FLOAT_DTYPES, all_finite

GROUP_AXES = ("out", "in")
# the reference backend's row block: at most this many elements of the weight per temporary
REFERENCE_BLOCK_ELEMENTS = 1 << 18


class _Factors(NamedTuple):
    """The problem in the weight's stored layout: W (rows x cols) with importance |G_hat * (W + s L R)|,
    G_hat = GL R + L GR - GL GR. For nn.Linear (L, GL, R, GR) = (B, G_B, A, G_A); for a Conv1D weight stored
    in x out, every factor is transposed and swapped: (A^T, G_A^T, B^T, G_B^T)."""
    w: torch.Tensor
    left: torch.Tensor
    grad_left: torch.Tensor
    right: torch.Tensor
    grad_right: torch.Tensor


def lora_importance(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, grad_A: torch.Tensor,
                    grad_B: torch.Tensor, *, scaling: float, fan_in_fan_out: bool = False, groups=None,
                    backend: str | None = None) -> torch.Tensor:
    """LoRAPrune importance ``|G_hat * (W + s B A)|`` with ``G_hat = G_B A + B G_A - G_B G_A``, per weight or
    summed per group. Reads its arguments only (mutates nothing).

    The kernels never hold an out x in ``G_hat`` or ``B A``: each tile of the weight is scored from the rank-r
    factors (the A / G_A column tile and the B / G_B row tile, multiplied in registers) and, with ``groups``,
    reduced at once, so memory beyond the inputs is the result and O(r (out + in)). The reference backend does
    the same in plain torch, a block of rows of the weight at a time (temporaries of at most
    ``REFERENCE_BLOCK_ELEMENTS`` = 2**18 elements).

    At LoRA's standard initialisation B = 0, so G_A = B^T (...) = 0 as well: then ``G_hat = G_B A`` (rank r)
    and the importance is ``|G_B A * W|`` -- a low-rank projection of the true gradient, which is why LoRAPrune
    warms the adapters up before it scores. The formula is applied unchanged; nothing is special-cased.

    Args:
        weight: the frozen base weight, (out, in); (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D).
        lora_A, lora_B: adapter weights, (r, in) and (out, r) (peft's ``lora_A[name].weight``,
            ``lora_B[name].weight``).
        grad_A, grad_B: their gradients, shaped like ``lora_A`` and ``lora_B``.
        scaling: s = lora_alpha / r (peft's ``scaling[name]``), finite and > 0.
        fan_in_fan_out: ``weight`` is stored transposed (in, out), as peft's flag of the same name says.
        groups: ``None`` for one importance per weight; ``("out", n)`` sums over n equal contiguous blocks of
            output channels (n = out: one per channel; n = number of heads: one per attention head for q/k/v
            projections); ``("in", n)`` the same over input features (o_proj / down_proj columns, LoRAPrune's
            transposed groups). n must divide that dimension.
        backend: ``"reference"`` or ``"triton"``; default: the fastest for the device.

    Every tensor may be float32, float16 or bfloat16 independently (peft keeps fp32 adapters on a half base
    weight); all are read as they are and computed in float32.

    Returns:
        float32 on the weight's device: the importance with the shape of ``weight`` as stored, or with
        ``groups`` a vector of the n group sums.

    Raises:
        NonFiniteError: an input holds NaN or infinity (named), or the importance overflows float32.

    Example:
        >>> import torch, erasus.ops
        >>> W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> A, B = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [0.0]])   # LoRA init: B = 0, so G_A = 0
        >>> G_A, G_B = torch.zeros(1, 2), torch.tensor([[1.0], [-2.0]])
        >>> erasus.ops.lora_importance(W, A, B, G_A, G_B, scaling=2.0).tolist()   # |G_B A * W|
        [[1.0, 0.0], [6.0, 0.0]]
        >>> erasus.ops.lora_importance(W, A, B, G_A, G_B, scaling=2.0, groups=("out", 2)).tolist()
        [1.0, 6.0]
    """
    factors = _check_factors(weight, lora_A, lora_B, grad_A, grad_B, fan_in_fan_out)
    scaling = _check_scaling(scaling)
    axis, n_groups = _check_groups(groups, lora_B.shape[0], lora_A.shape[1], fan_in_fan_out)
    implementation = LORA_IMPORTANCE.select(weight.device, backend)
    result = implementation(*factors, scaling, axis)
    if not all_finite(result):
        # the factors were checked; a NaN or infinity left in the result comes from W or from an overflow
        if not all_finite(weight):
            raise NonFiniteError("weight holds NaN or infinite values")
        raise NonFiniteError("the importance overflows float32 (finite inputs whose products exceed 3.4e38)")
    if n_groups is None:
        return result
    return result.view(n_groups, -1).sum(dim=1, dtype=torch.float64).float()


def _check_tensor(x, name: str) -> torch.Tensor:
    if x is None:
        raise InvalidInputError(f"{name} is None (a LoRA gradient is None until a backward pass reaches it)")
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2:
        raise ShapeError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    return x.detach()


def _check_factors(weight, lora_A, lora_B, grad_A, grad_B, fan_in_fan_out: bool) -> _Factors:
    named = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, "grad_A": grad_A, "grad_B": grad_B}
    t = {name: _check_tensor(x, name) for name, x in named.items()}
    rank, in_features = t["lora_A"].shape
    out_features = t["lora_B"].shape[0]
    if rank == 0:
        raise EmptyInputError("lora_A has rank r = 0 (shape (0, in))")
    if t["lora_B"].shape[1] != rank:
        raise ShapeError(f"lora_B must be (out, r) with r = {rank} from lora_A {tuple(t['lora_A'].shape)}, "
                         f"got {tuple(t['lora_B'].shape)}")
    for grad, param in (("grad_A", "lora_A"), ("grad_B", "lora_B")):
        if t[grad].shape != t[param].shape:
            raise ShapeError(f"{grad} must have the shape of {param} {tuple(t[param].shape)}, "
                             f"got {tuple(t[grad].shape)}")
    want = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
    if tuple(t["weight"].shape) != want:
        hint = (f" (the transposed shape: pass fan_in_fan_out={not fan_in_fan_out})"
                if tuple(t["weight"].shape) == want[::-1] else "")
        layout = "(in, out)" if fan_in_fan_out else "(out, in)"
        raise ShapeError(f"weight must be {layout} = {want} for lora_A (r, in) = {tuple(t['lora_A'].shape)} and "
                         f"lora_B (out, r) = {tuple(t['lora_B'].shape)}, got {tuple(t['weight'].shape)}{hint}")
    if t["weight"].numel() == 0:
        raise EmptyInputError(f"weight is empty (shape {tuple(t['weight'].shape)})")
    device = t["weight"].device
    for name, x in t.items():
        if x.device != device:
            raise InvalidInputError(f"{name} is on {x.device} but weight is on {device}")
    for name in ("lora_A", "lora_B", "grad_A", "grad_B"):  # small (rank r); W is checked through the result
        if not all_finite(t[name]):
            raise NonFiniteError(f"{name} holds NaN or infinite values")
    if fan_in_fan_out:
        return _Factors(t["weight"], t["lora_A"].T, t["grad_A"].T, t["lora_B"].T, t["grad_B"].T)
    return _Factors(t["weight"], t["lora_B"], t["grad_B"], t["lora_A"], t["grad_A"])


def _check_scaling(scaling) -> float:
    if isinstance(scaling, torch.Tensor) and scaling.numel() == 1 and not scaling.dtype.is_complex:
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise InvalidInputError(f"scaling must be a real number (lora_alpha / r), got {scaling!r}")
    scaling = float(scaling)
    if not math.isfinite(scaling) or scaling <= 0:
        raise InvalidInputError(f"scaling must be finite and > 0 (lora_alpha / r), got {scaling}")
    return scaling


def _check_groups(groups, out_features: int, in_features: int, fan_in_fan_out: bool
                  ) -> tuple[int | None, int | None]:
    """(axis of the stored weight to reduce: 1 sums each row, 0 each column; number of groups)."""
    if groups is None:
        return None, None
    if (not isinstance(groups, (tuple, list)) or len(groups) != 2 or groups[0] not in GROUP_AXES
            or isinstance(groups[1], bool) or not isinstance(groups[1], numbers.Integral)):
        raise InvalidInputError(f"groups must be None, ('out', n_groups) or ('in', n_groups), got {groups!r}")
    along, n = groups[0], int(groups[1])
    size = out_features if along == "out" else in_features
    if n < 1 or size % n != 0:
        raise InvalidInputError(f"groups={tuple(groups)!r} does not tile the weight: n_groups must divide the "
                                f"{along} dimension ({size})")
    # an 'out' group sums over in: along the stored rows (axis 1) of an (out, in) weight, the columns of (in, out)
    summed_axis = 1 if (along == "out") != fan_in_fan_out else 0
    return summed_axis, n


def lora_importance_reference(w, left, grad_left, right, grad_right, scaling: float, axis: int | None
                              ) -> torch.Tensor:
    """Plain-torch oracle of the kernels, in row blocks of the stored weight (temporaries of at most
    :data:`REFERENCE_BLOCK_ELEMENTS` elements): per element (``axis=None``), row sums (1) or column sums (0)."""
    rows, cols = w.shape
    right32, grad_right32 = right.float(), grad_right.float()
    right_minus_grad = right32 - grad_right32  # G_hat = GL (R - GR) + L GR: two rank-r products, not three
    step = max(1, REFERENCE_BLOCK_ELEMENTS // cols)
    if axis is None:
        out = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    else:
        out = torch.zeros(rows if axis == 1 else cols, dtype=torch.float32, device=w.device)
    for r0 in range(0, rows, step):
        block = slice(r0, min(r0 + step, rows))
        left32, grad_left32 = left[block].float(), grad_left[block].float()
        g_hat = grad_left32 @ right_minus_grad
        g_hat.addmm_(left32, grad_right32)
        merged = torch.addmm(w[block].float(), left32, right32, alpha=scaling)
        importance = g_hat.mul_(merged).abs_()
        if axis is None:
            out[block] = importance
        elif axis == 1:
            out[block] = importance.sum(dim=1)
        else:
            out += importance.sum(dim=0)
    return out


def _lora_importance_triton(w, left, grad_left, right, grad_right, scaling: float, axis: int | None
                            ) -> torch.Tensor:
    from erasus.kernels import lora_importance as kernel

    return kernel.lora_importance(w, left, grad_left, right, grad_right, scaling, axis)


#: (stored weight, left, grad_left, right, grad_right, scaling, summed axis or None) -> float32 importance
LORA_IMPORTANCE = _backend.OpTable("lora_importance", {"reference": lora_importance_reference,
                                                       "triton": _lora_importance_triton})


class NonFiniteImportanceWarning(RuntimeWarning):
    """An importance holding NaN or infinity was skipped by :class:`LoraImportanceEMA` (its average kept)."""


class LoraImportanceEMA:
    """LoRAPrune's moving average of importances, one per module: ``I_bar <- beta I_bar + (1 - beta) I``.

    The first update of a name stores ``I`` itself (no bias towards zero). An update whose importance holds NaN
    or infinity (e.g. an fp16 gradient overflow) is skipped with a :class:`NonFiniteImportanceWarning` and the
    average is kept, as LoRAPrune does (``skip_nonfinite=True``, the default); with ``skip_nonfinite=False`` it
    raises :class:`~erasus.errors.NonFiniteError`. Averages are float32 tensors on the importance's device;
    :meth:`update` mutates this object only.

    Example:
        >>> import torch
        >>> from erasus.ops.lora_importance import LoraImportanceEMA
        >>> ema = LoraImportanceEMA(beta=0.9)
        >>> ema.update("q_proj", torch.tensor([1.0, 0.0])).tolist()
        [1.0, 0.0]
        >>> [round(v, 6) for v in ema.update("q_proj", torch.tensor([0.0, 1.0])).tolist()]
        [0.9, 0.1]
    """

    def __init__(self, beta: float = 0.9, *, skip_nonfinite: bool = True):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= float(beta) < 1.0:
            raise InvalidInputError(f"beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.averages: dict[str, torch.Tensor] = {}
        self.skipped: dict[str, int] = {}
        """how many updates of each name were skipped for NaN / infinity"""

    def update(self, name: str, importance: torch.Tensor) -> torch.Tensor:
        """Fold ``importance`` into the average of ``name`` and return the average (the stored tensor; ``None``
        when the first update of ``name`` was skipped)."""
        if not isinstance(importance, torch.Tensor) or not importance.dtype.is_floating_point:
            raise DTypeError(f"importance of {name!r} must be a floating-point tensor, got {importance!r}")
        previous = self.averages.get(name)
        if previous is not None and previous.shape != importance.shape:
            raise ShapeError(f"importance of {name!r} has shape {tuple(importance.shape)}, but its average has "
                             f"{tuple(previous.shape)}")
        if not all_finite(importance):
            if not self.skip_nonfinite:
                raise NonFiniteError(f"importance of {name!r} holds NaN or infinite values")
            self.skipped[name] = self.skipped.get(name, 0) + 1
            warnings.warn(f"importance of {name!r} holds NaN or infinite values: update skipped, average kept",
                          NonFiniteImportanceWarning, stacklevel=2)
            return previous
        current = importance.detach().float()
        if previous is None:
            self.averages[name] = current.clone()
        else:
            previous.mul_(self.beta).add_(current.to(previous.device), alpha=1.0 - self.beta)
        return self.averages[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.averages[name]

    def __contains__(self, name: str) -> bool:
        return name in self.averages
