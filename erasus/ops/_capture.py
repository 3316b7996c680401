"""One batched forward and one backward that yield, for every layer with trainable parameters, its inputs
and the gradient of the summed per-sample losses with respect to its output -- the raw material of
per-sample gradient norms and the diagonal Fisher.

The backward asks autograd for gradients with respect to the layer *outputs* only, so no weight gradient is
computed and no ``.grad`` field of the model is touched.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Callable

import torch
from torch import nn

from erasus.errors import InvalidInputError, NonFiniteError, ShapeError, UnsupportedLayerError
from erasus.ops._parameter_uses import check_parameter_uses
from erasus.ops._validate import all_finite
from erasus.ops.layers import FALLBACK, registered_type, rule_for
from erasus.ops.layers._registry import covers_subtree
from erasus.ops.layers.parameters import BARE, bare_parameters, is_bare_owner, per_sample_parameter_grads_of_losses


@dataclasses.dataclass
class LayerRecord:
    """One layer call. ``output`` / ``grad``: a tensor, or for a rule with an ``outputs`` reader a tuple aligned
    with what it read (a grad None where the loss does not reach that output), with ``batch_dims``; for the owner
    of bare parameters ``grad`` is ``{name: (B, *shape) per-sample gradients}`` and ``output`` is None."""

    name: str
    module: nn.Module
    inputs: tuple
    output: torch.Tensor | tuple | None
    grad: torch.Tensor | tuple | dict | None = None
    batch_dims: tuple | None = None

    def output_tensors(self) -> tuple:
        if self.output is None:
            return ()
        return self.output if isinstance(self.output, tuple) else (self.output,)


def trainable_layers(model: nn.Module, part: str, fallback: bool = False
                     ) -> tuple[list[tuple[str, nn.Module]], dict[int, Callable], list[str]]:
    """Modules that directly own a trainable parameter, each with its ``part`` ("norms" or "fisher") function
    from the layer rules: ``(layers, {id(module): function}, names of the layers on the fallback)``. A module
    without a rule (or a subclass overriding its registered type's forward) takes the exact torch.func
    fallback with ``fallback=True`` and is refused by name otherwise. A module whose rule covers its subtree
    (nn.MultiheadAttention) counts its children's parameters as its own, and its children are not layers; the
    bare parameters of a container (:mod:`erasus.ops.layers.parameters`) are measured from their definition."""
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidInputError("every parameter of the model is frozen (requires_grad=False): nothing to measure")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise InvalidInputError(f"layer {name} is a BatchNorm in training mode, which mixes the samples of a "
                                    "batch: per-sample gradients are undefined; call model.eval()")
    layers, functions, slow = [], {}, []
    covered: list[str] = []  # name prefixes of the subtrees a rule measures whole
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        subtree = covers_subtree(module)
        if not any(p.requires_grad for p in module.parameters(recurse=subtree)):
            continue
        if subtree:
            covered.append(f"{name}." if name else "")
        if is_bare_owner(module):
            functions[id(module)] = BARE[part]
            layers.append((name, module))
            continue
        registered = registered_type(module, part)
        problem = _unknown_layer_problem(name, module, registered)
        if problem is None:
            functions[id(module)] = rule_for(module, part)
        elif fallback:
            functions[id(module)] = FALLBACK[part]
            slow.append(name or "<model>")
        else:
            raise UnsupportedLayerError(problem + "; or pass fallback=True for the exact (slower) torch.func path")
        layers.append((name, module))
    if not layers:
        raise InvalidInputError("the model has no layer with trainable parameters")
    return layers, functions, slow


def _unknown_layer_problem(name: str, module: nn.Module, registered: type | None) -> str | None:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if registered is None:
        return (f"layer {name or '<model>'} of type {kind} has trainable parameters but no per-sample rule; freeze it "
                f"(requires_grad_(False)), register one with erasus.ops.register_norm_sampler / "
                f"register_fisher_sampler")
    if type(module).forward is not registered.forward:
        # the registered rule assumes the registered type's forward (y = x W^T + b, a lookup, ...); a subclass that
        # computes something else (e.g. scales the output) would get silently wrong results
        return (f"layer {name or '<model>'} of type {kind} subclasses {registered.__qualname__} but overrides its "
                f"forward, which the rule of {registered.__qualname__} does not know; freeze it, register a rule for "
                f"{type(module).__qualname__} with erasus.ops.register_norm_sampler / register_fisher_sampler")
    return None


def check_losses(losses) -> torch.Tensor:
    """What a ``loss_fn`` returned must be one finite loss per sample, shape (B,) with B >= 1, attached to the
    model's graph."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ShapeError(f"loss_fn must return one loss per sample, shape (B,), got {shape}; compute it "
                         "with reduction='none' (and sum or average over tokens per sample)")
    if not losses.dtype.is_floating_point:
        raise InvalidInputError(f"loss_fn must return floating-point losses, got {losses.dtype}")
    if not all_finite(losses):
        raise NonFiniteError("loss_fn returned NaN or infinite losses")
    if not losses.requires_grad:
        raise InvalidInputError("loss_fn returned losses that do not depend on the trainable parameters (detached, "
                                "computed under torch.no_grad(), or from frozen layers only)")
    return losses


@contextlib.contextmanager
def parameters_kept(model: nn.Module):
    """Run model code that must leave the parameters as they were.

    ``nn.Embedding(max_norm=...)`` renormalises the rows it looks up, in place, in its forward: those weights
    are saved first and restored bit for bit afterwards (the gradients computed in between are those of the
    renormalised rows, as in any forward of that model). Any other parameter changed in place by the forward
    cannot be restored (it was not saved) and is reported as an UnsupportedLayerError.
    """
    renormed = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.max_norm is not None]
    saved = [w.detach().clone() for w in renormed]
    versions = {name: (p, p._version) for name, p in model.named_parameters()}

    def restore():
        with torch.no_grad():
            for weight, copy in zip(renormed, saved):
                if not torch.equal(weight, copy):
                    weight.copy_(copy)

    try:
        yield
    except BaseException:
        restore()
        raise
    restore()
    restored = {id(w) for w in renormed}
    changed = [name for name, (p, version) in versions.items() if id(p) not in restored and p._version != version]
    if changed:
        raise UnsupportedLayerError(f"the model's forward changed parameters {changed} in place, so their values "
                                    "now differ from before the call; per-sample scores need a forward that leaves "
                                    "its parameters alone")


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


def measured_parameters(module: nn.Module):
    """(attribute name, parameter) of what the module's rule measures: its own parameters, or its whole subtree's
    for a rule that covers it (the names are then dotted)."""
    return module.named_parameters(recurse=covers_subtree(module))


class _Measured:
    """What the parameter-use check asks of a layer (``parameters(recurse=False)``: those it owns), for a layer
    whose rule measures its children's parameters too."""

    def __init__(self, module: nn.Module):
        self.module = module

    def parameters(self, recurse: bool = False):
        return (p for _, p in measured_parameters(self.module))


def _trainable_names(layers) -> dict[int, str]:
    """Qualified names of the parameters the layer rules measure; bare parameters are measured from their
    definition wherever they are used, so the parameter-use check leaves them out."""
    names: dict[int, str] = {}
    for layer, module in layers:
        if is_bare_owner(module):
            continue
        for attr, p in measured_parameters(module):
            if p.requires_grad:
                names.setdefault(id(p), f"{layer}.{attr}" if layer else attr)
    return names


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The forward's arguments in signature order, whether they were passed by position or by name (a layer
    called as ``layer(input=x)`` still has x as its first input)."""
    if not kwargs:
        return args
    signature = _forward_signature(type(module))
    if signature is None:
        return args + tuple(kwargs.values())
    try:
        bound = signature.bind(module, *args, **kwargs)
    except TypeError:
        return args + tuple(kwargs.values())
    # positional parameters skipped before the last one passed take their defaults, so that an argument's
    # position is its position in the signature (mha(q, k, v, attn_mask=m) has m sixth, not fourth)
    parameters = list(signature.parameters.values())[1:]
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    passed = [i for i, p in enumerate(positional) if p.name in bound.arguments]
    values = [bound.arguments.get(p.name, p.default) for p in positional[:passed[-1] + 1]] if passed else []
    rest = [value for key, value in bound.arguments.items() if key not in {p.name for p in positional}][1:]
    return tuple(values + rest)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a forward argument or output: a tensor, or nested in tuples / lists (a PackedSequence is a
    tuple, LSTM's hidden state a pair)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _map_tensors(value, fn):
    """``value`` with ``fn`` applied to each tensor in it, through plain tuples and lists and namedtuples (a
    PackedSequence keeps its type); anything else is kept as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return value._make(_map_tensors(item, fn) for item in value)
    if type(value) in (tuple, list):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


def _versions(inputs: tuple, outputs: tuple) -> tuple:
    return tuple(t._version for t in _tensors(inputs) + list(outputs))


def _capture_once(model, layers, loss_fn, batch, copy: set[int]):
    records: dict[int, LayerRecord] = {}
    versions: dict[int, tuple] = {}
    handles = []
    batch_seen = [0]

    def hook(name):
        def fn(module, args, kwargs, output):
            if id(module) in records:
                raise InvalidInputError(f"layer {name} ran more than once in one forward pass (a reused module); "
                                        "per-sample norms need one call per layer")
            inputs = _map_tensors(_positional(module, args, kwargs), torch.Tensor.detach)
            reader = rule_for(module, "outputs")
            if reader is None and not isinstance(output, torch.Tensor):
                raise UnsupportedLayerError(f"layer {name} returned {type(output).__name__}, not a tensor")
            downstream = output
            if id(module) in copy:  # keep our own inputs; hand the rest of the model a copy to modify in place
                inputs = _map_tensors(inputs, torch.Tensor.clone)
                downstream = _map_tensors(output, torch.Tensor.clone)
            if reader is not None:
                try:
                    read = tuple(reader(module, inputs, output))
                except UnsupportedLayerError as exc:
                    raise UnsupportedLayerError(f"layer {name or '<model>'}: {exc}") from exc
                record = LayerRecord(name, module, inputs, tuple(t for t, _ in read),
                                     batch_dims=tuple(d for _, d in read))
                for tensor, dim in read:
                    if dim is not None:
                        batch_seen[0] = max(batch_seen[0], tensor.shape[dim])
                records[id(module)] = record
                versions[id(module)] = _versions(inputs, record.output_tensors())
                return downstream
            ids = inputs[0] if inputs else None
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
            versions[id(module)] = _versions(inputs, (output,))
            return downstream
        return fn

    bare = [(name, module) for name, module in layers if is_bare_owner(module)]
    try:
        for name, module in layers:
            if not is_bare_owner(module):
                handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
        with torch.enable_grad():
            losses = check_losses(loss_fn(model, batch))
            changed = {key for key, r in records.items() if _versions(r.inputs, r.output_tensors()) != versions[key]}
            if changed:
                return losses, list(records.values()), changed
            check_parameter_uses(losses, [(r.name, _Measured(r.module) if covers_subtree(r.module) else r.module, t)
                                          for r in records.values() for t in r.output_tensors()],
                                 _trainable_names(layers))
            for name, module in bare:
                records[id(module)] = LayerRecord(name, module, (), None, per_sample_parameter_grads_of_losses(
                    losses, bare_parameters(module), name))
            used = [(r, k, t) for r in records.values() for k, t in enumerate(r.output_tensors()) if t.requires_grad]
            grads = torch.autograd.grad(losses.sum(), [t for _, _, t in used], allow_unused=True) if used else ()
    finally:
        for h in handles:
            h.remove()
    _attach_grads(records.values(), used, grads)
    batch_size = losses.shape[0]
    for record in records.values():
        if record.output is not None:
            _check_grads(record, batch_size)
    return losses.detach(), [records[id(m)] for _, m in layers if id(m) in records], set()


def _attach_grads(records, used, grads) -> None:
    """Give each record the gradients at its outputs (detached): one tensor, or a tuple aligned with the
    outputs its rule read (None for an output the loss does not reach; None overall when it reaches none)."""
    by_record: dict[int, dict[int, torch.Tensor]] = {}
    for (record, k, _), grad in zip(used, grads):
        if grad is not None:
            by_record.setdefault(id(record), {})[k] = grad.detach()
    for record in records:
        if record.output is None:
            continue
        found = by_record.get(id(record))
        if isinstance(record.output, tuple):
            record.grad = None if not found else tuple(found.get(k) for k in range(len(record.output)))
            record.output = tuple(t.detach() for t in record.output)
        else:
            record.grad = None if not found else found[0]
            record.output = record.output.detach()


def _check_grads(record: LayerRecord, batch_size: int) -> None:
    if record.grad is None:
        return
    grads = record.grad if isinstance(record.grad, tuple) else (record.grad,)
    dims = record.batch_dims or (0,)
    for grad, dim in zip(grads, dims):
        if grad is None:
            continue
        if dim is not None and grad.shape[dim] != batch_size:
            raise ShapeError(f"layer {record.name}: output has {grad.shape[dim]} rows but the loss has "
                             f"{batch_size} samples; outputs must be batch-first")
        if not all_finite(grad):
            raise NonFiniteError(f"the gradient at the output of layer {record.name} holds NaN or infinity")
