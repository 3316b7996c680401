"""Diagonal Fisher of a model (the public :func:`erasus.ops.fisher_diagonal`); each layer's part comes from its
rule in :mod:`erasus.ops.layers` (the layer op is :func:`erasus.ops.squared_grad_sum`)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from erasus.errors import EmptyInputError, InvalidInputError, NonFiniteError
from erasus.ops import _capture
from erasus.ops._validate import all_finite



MODES = ("empirical", "batch_squared", "mc")


def fisher_diagonal(model: nn.Module, data: Iterable, *, mode: str = "empirical", loss_fn: Callable | None = None,
                    logits_fn: Callable | None = None, reduction: str = "mean", seed: int = 0,
                    backend: str | None = None, fallback: bool = False) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's trainable parameters over the batches of ``data``.

    Modes, named for what they compute:

    - ``"empirical"``: ``sum_i (d loss_i / d theta)^2`` with the data's own labels, from per-sample squared
      gradients (one batched forward and backward per batch; the layer kernels of :func:`squared_grad_sum`).
      Needs ``loss_fn(model, batch) -> (B,)`` per-sample losses. A loss that mixes the samples (CLIP's batch
      contrastive loss) is not a per-sample loss: a layer's "per-sample gradient" is then the one flowing back
      through sample i's own forward from the summed loss, ``d (sum_j loss_j) / d (output row i)``, not
      ``d loss_i / d theta`` (bare parameters of a container are measured from ``d loss_i / d p``).
    - ``"batch_squared"``: ``sum_batches (d mean_batch_loss / d theta)^2`` -- what SSD (Foster et al. 2024)
      calls importance: squared mini-batch gradients, so it depends on the batch size. Needs ``loss_fn``.
    - ``"mc"``: the true Fisher, estimated with one label per sample (and position) drawn from the model's own
      predictive distribution: ``loss_i = sum_positions CE(logits, y ~ softmax(logits))``. Needs
      ``logits_fn(model, batch) -> (B, ..., C)`` logits; ``seed`` seeds the draws.

    ``reduction="mean"`` divides by the number of samples (``empirical``, ``mc``) or batches
    (``batch_squared``); ``"sum"`` returns the plain sums. The model's parameters (bit for bit, including rows
    that ``nn.Embedding(max_norm=...)`` renormalises in its forward), ``.grad`` fields and mode are left as
    they were (it runs in its current mode): this function does not mutate the model. The per-sample modes
    refuse, as :func:`erasus.ops.grad_norms` does, a trainable parameter used outside its layer's forward;
    ``fallback=True`` measures a layer no rule knows exactly by torch.func, as there (a
    :class:`~erasus.ops.SlowPathWarning` names those layers, and the bare parameters measured by one backward
    per sample).

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
    count, slow = 0, {"fallback": [], "bare": []}
    with _capture.parameters_kept(model):
        for batch in data:
            if mode == "batch_squared":
                count += 1
                with torch.enable_grad():
                    _accumulate_batch_squared(params, fisher, per_sample_loss(model, batch))
            else:
                count += _accumulate_per_sample(model, fisher, per_sample_loss, batch, backend, fallback, slow)
    if count == 0:
        raise EmptyInputError("data yielded no batches")
    _capture.warn_slow_paths("fisher_diagonal", slow)
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


def _accumulate_per_sample(model, fisher: dict, loss_fn: Callable, batch, backend, fallback: bool,
                           slow: dict[str, list[str]]) -> int:
    plans = _capture.trainable_layers(model, "fisher", fallback)
    _capture.slow_paths(plans, into=slow)
    seen: set[int] = set()
    for plan in plans:
        for _, p in plan.measured_parameters():
            if p.requires_grad and id(p) in seen:
                raise InvalidInputError(f"layer {plan.label} shares a parameter with another layer (tied weights); the "
                                        "per-sample Fisher of a shared parameter is not supported: use "
                                        "mode='batch_squared' or untie it")
            seen.add(id(p))
    losses, records = _capture.capture(model, plans, loss_fn, batch)
    for record in records:
        values = record.measure(backend)
        if values is None:
            continue
        for pname, value in values.items():
            full = f"{record.name}.{pname}" if record.name else pname
            fisher[full] += value.reshape(fisher[full].shape).to(fisher[full].device)
    return int(losses.shape[0])
