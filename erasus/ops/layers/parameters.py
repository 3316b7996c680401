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
2-layer ViT, B = 32: ~250 ms against ~25 ms for one batched forward and backward). Freeze such a parameter
(``requires_grad_(False)``) where its gradient is not wanted.

A module with trainable parameters of its own and no child holding parameters is a layer, not a container: it
needs a rule (or ``fallback=True``), as before.
"""
from __future__ import annotations

import torch
from torch import nn

from erasus.errors import NonFiniteError
from erasus.ops._validate import all_finite
from erasus.ops.layers._registry import registered_type

# samples whose backward runs at once (vmapped): each holds its own gradients of every activation between the
# losses and the parameters, a size not known here, so few; on a 2-layer ViT (B = 32) 4 at once took 207 ms,
# 16 at once 284 ms and one by one 238 ms (machine shared, so within noise): the batching is about memory
_SAMPLES_PER_BACKWARD = 4


def is_bare_owner(module: nn.Module) -> bool:
    """A container (a child holds parameters) that owns trainable parameters directly and has no rule (a
    container type registered for one op only is refused by the other, as any layer is)."""
    return (registered_type(module, "norms") is None and registered_type(module, "fisher") is None
            and any(p.requires_grad for p in module.parameters(recurse=False))
            and any(True for child in module.children() for _ in child.parameters()))


def bare_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own trainable parameters, by attribute name."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.requires_grad}


def per_sample_parameter_grads_of_losses(losses: torch.Tensor, params: dict[str, torch.Tensor], owner: str
                                         ) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape) float32 d loss_i / d p}`` for every sample i of the parameters ``params`` of the
    module named ``owner``, leaving the graph of ``losses`` in place for the caller's own backward."""
    batch = losses.shape[0]
    names, tensors = list(params), list(params.values())
    eye = torch.eye(batch, dtype=losses.dtype, device=losses.device)
    chunks: list[list[torch.Tensor]] = []
    for start in range(0, batch, _SAMPLES_PER_BACKWARD):
        rows = eye[start:start + _SAMPLES_PER_BACKWARD]
        try:
            grads = torch.autograd.grad(losses, tensors, grad_outputs=rows, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
        except RuntimeError:
            # an op on the way whose backward vmap cannot batch: the same gradients, one backward per sample
            per_row = [torch.autograd.grad(losses, tensors, grad_outputs=row, retain_graph=True, allow_unused=True)
                       for row in rows]
            grads = [None if parts[0] is None else torch.stack(parts) for parts in zip(*per_row)]
        chunks.append([torch.zeros(rows.shape[0], *p.shape, device=p.device) if g is None else g.detach().float()
                       for g, p in zip(grads, tensors)])
    out = {name: torch.cat([chunk[i] for chunk in chunks]) for i, name in enumerate(names)}
    for name, value in out.items():
        if not all_finite(value):
            raise NonFiniteError(f"the per-sample gradient of parameter {owner + '.' if owner else ''}{name} holds "
                                 "NaN or infinity")
    return out


def parameter_norms(module, inputs, grad, backend):
    """(B,) float64 squared norms; ``grad`` is ``{name: (B, *shape) per-sample gradients}`` (not an output
    gradient: the owner's rule is given the parameters' own per-sample gradients)."""
    return sum(g.double().square().reshape(g.shape[0], -1).sum(1) for g in grad.values())


def parameter_fisher(module, inputs, grad, backend):
    """{name: float32 sum over samples of squared gradients}, from the same per-sample gradients."""
    return {name: g.square().sum(0) for name, g in grad.items()}


BARE = {"norms": parameter_norms, "fisher": parameter_fisher}
