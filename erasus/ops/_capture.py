"""One batched forward and one backward that yield, for every layer with trainable parameters, its inputs
and the gradient of the summed per-sample losses with respect to its output -- the raw material of
per-sample gradient norms and the diagonal Fisher.

The backward asks autograd for gradients with respect to the layer *outputs* only, so no weight gradient is
computed and no ``.grad`` field of the model is touched.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from erasus.errors import InvalidInputError, NonFiniteError, ShapeError, UnsupportedLayerError
from erasus.ops._validate import all_finite


@dataclasses.dataclass
class LayerRecord:
    name: str
    module: nn.Module
    inputs: tuple
    output: torch.Tensor
    grad: torch.Tensor | None = None


def trainable_layers(model: nn.Module, registry: dict[type, Callable]) -> list[tuple[str, nn.Module]]:
    """Modules that directly own a trainable parameter; each must have a function in ``registry``."""
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidInputError("every parameter of the model is frozen (requires_grad=False): nothing to measure")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise InvalidInputError(f"layer {name} is a BatchNorm in training mode, which mixes the samples of a "
                                    "batch: per-sample gradients are undefined; call model.eval()")
    layers = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if lookup(registry, module) is None:
            raise UnsupportedLayerError(
                f"layer {name or '<model>'} of type {type(module).__module__}.{type(module).__qualname__} has "
                f"trainable parameters but no per-sample function; freeze it (requires_grad_(False)) or "
                f"register one with erasus.ops.register_norm_sampler")
        layers.append((name, module))
    if not layers:
        raise InvalidInputError("the model has no layer with trainable parameters")
    return layers


def registrar(registry: dict[type, Callable]) -> Callable:
    """A decorator factory filling ``registry``: ``@register(LayerA, LayerB)`` maps both types to the function
    (subclasses find it through their MRO, see :func:`lookup`)."""
    def register(*layer_types: type):
        def decorate(fn):
            for t in layer_types:
                registry[t] = fn
            return fn
        return decorate
    return register


def check_losses(losses) -> torch.Tensor:
    """What a ``loss_fn`` returned must be one finite loss per sample, shape (B,) with B >= 1."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ShapeError(f"loss_fn must return one loss per sample, shape (B,), got {shape}; compute it "
                         "with reduction='none' (and sum or average over tokens per sample)")
    if not all_finite(losses):
        raise NonFiniteError("loss_fn returned NaN or infinite losses")
    return losses


def own_trainable(module: nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``values`` (keyed by parameter attribute name) whose parameter is trainable."""
    return {k: v for k, v in values.items()
            if isinstance(getattr(module, k, None), torch.Tensor) and getattr(module, k).requires_grad}


def lookup(registry: dict[type, Callable], module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def capture(model: nn.Module, layers: list[tuple[str, nn.Module]], loss_fn: Callable, batch
            ) -> tuple[torch.Tensor, list[LayerRecord]]:
    """Run ``loss_fn(model, batch)`` with hooks; return the per-sample losses (B,) and the filled records.

    Layer outputs and inputs are kept by reference (no copies). If an in-place operation later in the forward
    changes one of them (``ReLU(inplace=True)``, ``x += ...``), the gradient taken at it would be the wrong
    one: the pass is then run again with copies of just those tensors.
    """
    losses, records, changed = _capture_once(model, layers, loss_fn, batch, copy=set())
    if changed:
        losses, records, changed = _capture_once(model, layers, loss_fn, batch, copy=changed)
        if changed:
            raise UnsupportedLayerError(f"layers {sorted(r.name for r in records if id(r.module) in changed)} "
                                        "change their own inputs or outputs in place")
    return losses, records


def _versions(inputs: tuple, output: torch.Tensor) -> tuple:
    return tuple(a._version for a in inputs if isinstance(a, torch.Tensor)) + (output._version,)


def _capture_once(model, layers, loss_fn, batch, copy: set[int]):
    records: dict[int, LayerRecord] = {}
    versions: dict[int, tuple] = {}
    handles = []
    batch_seen = [0]

    def hook(name):
        def fn(module, args, output):
            if id(module) in records:
                raise InvalidInputError(f"layer {name} ran more than once in one forward pass (a reused module); "
                                        "per-sample norms need one call per layer")
            if not isinstance(output, torch.Tensor):
                raise UnsupportedLayerError(f"layer {name} returned {type(output).__name__}, not a tensor")
            inputs = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            downstream = output
            if id(module) in copy:  # keep our own inputs; hand the rest of the model a copy to modify in place
                inputs = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in inputs)
                downstream = output.clone()
            ids = args[0] if args else None
            if (isinstance(module, nn.Embedding) and isinstance(ids, torch.Tensor) and ids.dim() == 2
                    and ids.shape[0] == 1 and batch_seen[0] > 1):
                # Positions (1, T) looked up once and broadcast over the batch (GPT-2's position embedding):
                # give each sample its own copy, so that each gets its own output gradient. Anything else with
                # one row while the batch has more fails the batch-first check below, with a clear error.
                output = downstream = output.expand(batch_seen[0], *output.shape[1:])
                inputs = tuple(a.expand(batch_seen[0], *a.shape[1:]) if isinstance(a, torch.Tensor) and a.dim()
                               and a.shape[0] == 1 else a for a in inputs)
            elif output.dim():
                batch_seen[0] = max(batch_seen[0], output.shape[0])
            records[id(module)] = LayerRecord(name, module, inputs, output)
            versions[id(module)] = _versions(inputs, output)
            return downstream
        return fn

    try:
        for name, module in layers:
            handles.append(module.register_forward_hook(hook(name)))
        with torch.enable_grad():
            losses = check_losses(loss_fn(model, batch))
            changed = {key for key, r in records.items() if _versions(r.inputs, r.output) != versions[key]}
            if changed:
                return losses, list(records.values()), changed
            used = [r for r in records.values() if r.output.requires_grad]
            grads = torch.autograd.grad(losses.sum(), [r.output for r in used], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for record, grad in zip(used, grads):
        record.grad = None if grad is None else grad.detach()
        record.output = record.output.detach()
    batch_size = losses.shape[0]
    for record in records.values():
        if record.grad is not None:
            if record.grad.shape[0] != batch_size:
                raise ShapeError(f"layer {record.name}: output has {record.grad.shape[0]} rows but the loss has "
                                 f"{batch_size} samples; outputs must be batch-first")
            if not all_finite(record.grad):
                raise NonFiniteError(f"the gradient at the output of layer {record.name} holds NaN or infinity")
    return losses.detach(), [records[id(m)] for _, m in layers if id(m) in records], set()
