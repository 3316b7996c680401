"""Bare parameters: trainable parameters that a module uses directly in its forward, with no layer of their own
around them -- ViT's class token and position embedding, CLIP's ``logit_scale``, a learned residual gain.

Their owner is a container (a module with child layers) without a rule of its own, so there is no layer input
and output gradient to read their per-sample gradients from. They are measured from their definition instead:
``d loss_i / d p`` for every sample, by one vectorised backward from the per-sample losses to just these
parameters (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the backward graph). That is exact
however the parameter is used (broadcast over the batch, concatenated, in a product mixing samples), needs no
change to the model (Opacus asks for the parameter to be wrapped in a module of its own, BackPACK leaves it
out), and costs one backward per sample of the part of the graph between the losses and these parameters
(vectorised, in chunks of samples), each over the whole batch's activations: cheap for a scale used at the end
of the model (CLIP's logit_scale), but B backwards of the batch for a position embedding used at its start (a
2-layer ViT, B = 32: ~250 ms against ~25 ms for one batched forward and backward). The ops therefore name these
parameters in a :class:`~erasus.ops.SlowPathWarning`; freeze such a parameter (``requires_grad_(False)``) where its
gradient is not wanted, and the cost is gone. Each chunk of samples is reduced (squared norms, squared sums) as it
comes, so no (B, *shape) gradient is kept.

A module with trainable parameters of its own and no child holding parameters is a layer, not a container: it
needs a rule (or ``fallback=True``), as before.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from erasus.errors import NonFiniteError
from erasus.ops._validate import all_finite
from erasus.ops.layers._registry import registered_rule
from erasus.ops.layers.fallback import squared_norms_of, squared_sums_of

# samples whose backward runs at once (vmapped): each holds its own gradients of every activation between the
# losses and the parameters, a size not known here, so few; on a 2-layer ViT (B = 32) 4 at once took 207 ms,
# 16 at once 284 ms and one by one 238 ms (machine shared, so within noise): the batching is about memory
_SAMPLES_PER_BACKWARD = 4


def is_bare_owner(module: nn.Module) -> bool:
    """A container (a child holds parameters) that owns trainable parameters directly and has no rule."""
    return (registered_rule(module) is None and any(p.requires_grad for p in module.parameters(recurse=False))
            and any(True for child in module.children() for _ in child.parameters()))


def bare_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own trainable parameters, by attribute name."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def per_sample_parameter_grads_of_losses(losses: torch.Tensor, params: dict[str, torch.Tensor], owner: str
                                         ) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{name: (b, *shape) float32 d loss_i / d p}`` over chunks of samples i of the parameters ``params``
    of the module named ``owner``, leaving the graph of ``losses`` in place for the caller's own backward. The
    caller reduces each chunk before asking for the next, while that graph is alive."""
    batch = losses.shape[0]
    names, tensors = list(params), list(params.values())
    eye = torch.eye(batch, dtype=losses.dtype, device=losses.device)
    vectorised = True  # until an op on the way turns out not to batch: then one backward per sample, throughout
    for start in range(0, batch, _SAMPLES_PER_BACKWARD):
        rows = eye[start:start + _SAMPLES_PER_BACKWARD]
        grads = None
        if vectorised:
            try:
                grads = torch.autograd.grad(losses, tensors, grad_outputs=rows, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)
            except RuntimeError as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                vectorised = False  # a backward vmap cannot batch (a custom Function reading a number, ...)
        if grads is None:
            per_row = [torch.autograd.grad(losses, tensors, grad_outputs=row, retain_graph=True, allow_unused=True)
                       for row in rows]
            grads = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_row)]
        chunk = {name: torch.zeros(rows.shape[0], *p.shape, device=p.device) if g is None else g.detach().float()
                 for name, g, p in zip(names, grads, tensors)}
        for name, value in chunk.items():
            if not all_finite(value):
                raise NonFiniteError(f"the per-sample gradient of parameter {owner + '.' if owner else ''}{name} "
                                     "holds NaN or infinity")
        yield chunk


def parameter_norms(module, inputs, grad, backend):
    """(B,) float64 squared norms; ``grad`` is the chunks of :func:`per_sample_parameter_grads_of_losses` (not
    an output gradient: the owner is given its parameters' own per-sample gradients)."""
    return squared_norms_of(grad)


def parameter_fisher(module, inputs, grad, backend):
    """{name: float32 sum over samples of squared gradients}, from the same chunks."""
    return squared_sums_of(grad)


BARE = {"norms": parameter_norms, "fisher": parameter_fisher}
