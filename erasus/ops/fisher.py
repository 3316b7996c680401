"""Diagonal Fisher: the layer kernel (sum of squared per-sample gradients) and the model-level modes."""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError
from erasus.ops import _backend, _capture, _cpp
from erasus.ops._magnitude import squares_fit, to_float32
from erasus.ops._validate import all_finite, max_abs
from erasus.ops.grad_norms import THIN, _check_pair
from erasus.ops.model_grad_norms import conv_as_linear, has_trainable_bias, token_grad_sums



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
        return SquaredGradSum(torch.zeros(p, d, dtype=torch.float32, device=a.device),
                              torch.zeros(p, dtype=torch.float32, device=a.device))
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
    from erasus.kernels import fisher as kernel

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


# (module, inputs, output_grad, backend) -> {parameter attribute name: float32 sum_i (grad_i)^2, param-shaped}
FisherSampler = Callable[[nn.Module, tuple, torch.Tensor, "str | None"], "dict[str, torch.Tensor]"]
FISHER_SAMPLERS: dict[type, FisherSampler] = {}
#: (a, g) -> SquaredGradSum of dense (B, T, d) / (B, T, p) inputs
SQUARED_GRAD_SUM = _backend.OpTable("squared_grad_sum", {"reference": squared_grad_sum_reference,
                                                         "cpp": _squares_cpp, "triton": _squares_triton})
BACKENDS = SQUARED_GRAD_SUM.backends
MODES = ("empirical", "batch_squared", "mc")


register_fisher_sampler = _capture.registrar(FISHER_SAMPLERS)
"""``@register_fisher_sampler(Layer)``: ``fn(module, inputs, output_grad, backend) -> {param_name: sum over
samples of squared per-sample grads}``."""


def fisher_diagonal(model: nn.Module, data: Iterable, *, mode: str = "empirical", loss_fn: Callable | None = None,
                    logits_fn: Callable | None = None, reduction: str = "mean", seed: int = 0,
                    backend: str | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's trainable parameters over the batches of ``data``.

    Modes, named for what they compute:

    - ``"empirical"``: ``sum_i (d loss_i / d theta)^2`` with the data's own labels, from per-sample squared
      gradients (one batched forward and backward per batch; the layer kernels of :func:`squared_grad_sum`).
      Needs ``loss_fn(model, batch) -> (B,)`` per-sample losses.
    - ``"batch_squared"``: ``sum_batches (d mean_batch_loss / d theta)^2`` -- what SSD (Foster et al. 2024)
      calls importance: squared mini-batch gradients, so it depends on the batch size. Needs ``loss_fn``.
    - ``"mc"``: the true Fisher, estimated with one label per sample (and position) drawn from the model's own
      predictive distribution: ``loss_i = sum_positions CE(logits, y ~ softmax(logits))``. Needs
      ``logits_fn(model, batch) -> (B, ..., C)`` logits; ``seed`` seeds the draws.

    ``reduction="mean"`` divides by the number of samples (``empirical``, ``mc``) or batches
    (``batch_squared``); ``"sum"`` returns the plain sums. The model's parameters (bit for bit, including rows
    that ``nn.Embedding(max_norm=...)`` renormalises in its forward), ``.grad`` fields and mode are left as
    they were (it runs in its current mode): this function does not mutate the model. The per-sample modes
    refuse, as :func:`erasus.ops.grad_norms` does, a trainable parameter used outside its layer's forward.

    Returns:
        ``{parameter name: float32 tensor shaped like the parameter}`` for every trainable parameter.

    Example:
        >>> import torch, erasus.ops
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> sorted(erasus.ops.fisher_diagonal(model, data, loss_fn=loss))
        ['bias', 'weight']
    """
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise InvalidInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if mode == "mc":
        if logits_fn is None:
            raise InvalidInputError("mode='mc' needs logits_fn(model, batch) -> logits")
        generator = torch.Generator().manual_seed(int(seed))
        per_sample_loss = _sampled_label_loss(logits_fn, generator)
    else:
        if loss_fn is None:
            raise InvalidInputError(f"mode={mode!r} needs loss_fn(model, batch) -> per-sample losses (B,)")
        per_sample_loss = loss_fn
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise InvalidInputError("every parameter of the model is frozen (requires_grad=False): nothing to measure")
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    with _capture.parameters_kept(model):
        for batch in data:
            if mode == "batch_squared":
                count += 1
                with torch.enable_grad():
                    _accumulate_batch_squared(params, fisher, per_sample_loss(model, batch))
            else:
                count += _accumulate_per_sample(model, fisher, per_sample_loss, batch, backend)
    if count == 0:
        raise EmptyInputError("data yielded no batches")
    if reduction == "mean":
        for value in fisher.values():
            value /= count
    for name, value in fisher.items():  # the gradients were finite: an infinity here is an overflow of the sum
        if not all_finite(value):
            raise NonFiniteError(f"the Fisher of {name} overflows float32 (a squared gradient above 3.4e38) although "
                                 "the losses and gradients are finite; scale the loss down")
    return fisher


def _sampled_label_loss(logits_fn: Callable, generator: torch.Generator) -> Callable:
    def loss(model, batch):
        logits = logits_fn(model, batch)
        flat = logits.reshape(-1, logits.shape[-1])
        if not bool(torch.isfinite(flat.detach()).all()):
            raise NonFiniteError("mode='mc': logits_fn returned NaN or infinite logits, so no label can be drawn "
                                 "from the model's distribution")
        probs = torch.softmax(flat.detach().float(), dim=-1).cpu()
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(flat.device)
        ce = nn.functional.cross_entropy(flat.float(), labels, reduction="none")
        return ce.reshape(logits.shape[0], -1).sum(dim=1)
    return loss


def _accumulate_batch_squared(params: dict, fisher: dict, losses: torch.Tensor) -> None:
    losses = _capture.check_losses(losses)
    grads = torch.autograd.grad(losses.mean(), list(params.values()), allow_unused=True)
    for name, grad in zip(params, grads):
        if grad is not None:
            if not all_finite(grad):
                raise NonFiniteError(f"the gradient of {name} holds NaN or infinity")
            fisher[name] += grad.float().square()


def _accumulate_per_sample(model, fisher: dict, loss_fn: Callable, batch, backend) -> int:
    from erasus.ops._affine_layers import register_transformers_layers

    register_transformers_layers()
    layers = _capture.trainable_layers(model, FISHER_SAMPLERS)
    seen: set[int] = set()
    for name, module in layers:
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) in seen:
                raise InvalidInputError(f"layer {name} shares a parameter with another layer (tied weights); the "
                                        "per-sample Fisher of a shared parameter is not supported: use "
                                        "mode='batch_squared' or untie it")
            seen.add(id(p))
    losses, records = _capture.capture(model, layers, loss_fn, batch)
    for record in records:
        if record.grad is None:
            continue
        fn = _capture.lookup(FISHER_SAMPLERS, record.module)
        try:
            values = fn(record.module, record.inputs, record.grad, backend)
        except NonFiniteError as exc:
            raise NonFiniteError(f"layer {record.name}: {exc}") from exc
        for pname, value in values.items():
            full = f"{record.name}.{pname}" if record.name else pname
            fisher[full] += value.reshape(fisher[full].shape).to(fisher[full].device)
    return int(losses.shape[0])


@register_fisher_sampler(nn.Linear)
def linear_fisher(module, inputs, grad, backend):
    a, g = inputs[0], grad
    a, g = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
    if a.dtype != g.dtype:
        a, g = a.float(), g.float()
    res = squares_unchecked(a, g, backend, with_bias=has_trainable_bias(module))
    return _capture.own_trainable(module, {"weight": res.weight, "bias": res.bias})


def transposed_linear_fisher(module, inputs, grad, backend):
    """transformers' Conv1D: y = x W + b with W stored as (d_in, d_out)."""
    values = linear_fisher(module, inputs, grad, backend)
    if "weight" in values:
        values["weight"] = values["weight"].T
    return values


@register_fisher_sampler(nn.Embedding)
def embedding_fisher(module, inputs, grad, backend):
    _, token, sums = token_grad_sums(module, inputs, grad)
    weight = torch.zeros(module.num_embeddings, sums.shape[-1], device=sums.device).index_add_(0, token, sums.square())
    return _capture.own_trainable(module, {"weight": weight})


@register_fisher_sampler(nn.Conv1d, nn.Conv2d)
def conv_fisher(module, inputs, grad, backend):
    a, g = conv_as_linear(module, inputs[0], grad)
    if a.dtype != g.dtype:
        a, g = a.float(), g.float()
    res = squares_unchecked(a, g, backend, with_bias=has_trainable_bias(module))
    return _capture.own_trainable(module, {"weight": res.weight.reshape(module.weight.shape), "bias": res.bias})
