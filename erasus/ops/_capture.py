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
import warnings
from typing import Callable

import torch
from torch import nn

from erasus.errors import InvalidInputError, NonFiniteError, ShapeError, UnsupportedLayerError
from erasus.ops._parameter_uses import check_parameter_uses
from erasus.ops._validate import all_finite
from erasus.ops.layers import SlowPathWarning
from erasus.ops.layers._registry import LayerRule, registered_rule
from erasus.ops.layers.fallback import ForwardCall, fallback_function, fallback_outputs
from erasus.ops.layers.parameters import BARE, bare_parameters, is_bare_owner, per_sample_parameter_grads_of_losses


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer is measured, decided once (:func:`trainable_layers`, one rule lookup) and read everywhere
    after: ``kind`` "rule" (its registered rule), "fallback" (the exact torch.func path) or "bare" (the
    parameters a container uses directly, :mod:`erasus.ops.layers.parameters`); ``function(module, inputs, grad,
    backend)`` is the part ("norms" or "fisher") that measures it; ``outputs`` reads its forward's output (None:
    one batch-first tensor); ``subtree``: it measures its children's parameters too (dotted names)."""

    name: str
    module: nn.Module
    kind: str
    function: Callable
    outputs: Callable | None = None
    subtree: bool = False

    @property
    def label(self) -> str:
        return self.name or "<model>"

    def measured_parameters(self):
        """(attribute name, parameter) of what the plan measures (trainable or not)."""
        return self.module.named_parameters(recurse=self.subtree)

    def slow_names(self) -> list[str]:
        """What the plan measures on a slow path: the layer on the fallback, the bare parameters by name."""
        if self.kind == "fallback":
            return [self.label]
        if self.kind == "bare":
            return [f"{self.name}.{n}" if self.name else n for n in bare_parameters(self.module)]
        return []


@dataclasses.dataclass
class LayerRecord:
    """One layer call. ``inputs``: the forward's arguments as its plan's function reads them (a rule: positional
    in signature order; the fallback: a :class:`ForwardCall`). ``output`` / ``grad``: a tensor, or for a plan with
    an ``outputs`` reader a tuple aligned with what it read (a grad None where the loss does not reach that
    output), with ``batch_dims``. For the owner of bare parameters ``output`` and ``grad`` are None and
    ``measured`` holds the result of its function, taken during the capture (while the graph of the losses is
    alive)."""

    plan: LayerPlan
    inputs: tuple
    output: torch.Tensor | tuple | None
    grad: torch.Tensor | tuple | None = None
    batch_dims: tuple | None = None
    measured: object = None

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def module(self) -> nn.Module:
        return self.plan.module

    def output_tensors(self) -> tuple:
        if self.output is None:
            return ()
        return self.output if isinstance(self.output, tuple) else (self.output,)

    def measure(self, backend):
        """The plan's part for this call (None when the loss does not reach the layer); the layer's errors are
        re-raised with its name."""
        if self.measured is not None:
            return self.measured
        if self.grad is None:
            return None
        try:
            return self.plan.function(self.module, self.inputs, self.grad, backend)
        except (UnsupportedLayerError, NonFiniteError) as exc:
            raise type(exc)(f"layer {self.plan.label}: {exc}") from exc


def trainable_layers(model: nn.Module, part: str, fallback: bool = False) -> list[LayerPlan]:
    """The plan of every module that directly owns a trainable parameter, for ``part`` ("norms" or "fisher"). A
    module without a rule for ``part`` (or a subclass overriding its registered type's forward) takes the exact
    torch.func fallback with ``fallback=True`` and is refused by name otherwise. A module whose rule covers its
    subtree (nn.MultiheadAttention, and its subclasses on the fallback) counts its children's parameters as its
    own, and its children are not layers; the bare parameters of a container are measured from their
    definition."""
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidInputError("every parameter of the model is frozen (requires_grad=False): nothing to measure")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise InvalidInputError(f"layer {name} is a BatchNorm in training mode, which mixes the samples of a "
                                    "batch: per-sample gradients are undefined; call model.eval()")
    plans: list[LayerPlan] = []
    covered: list[str] = []  # name prefixes of the subtrees a plan measures whole
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        plan = _plan(name, module, part, fallback)
        if plan is None:
            continue
        if plan.subtree:
            covered.append(f"{name}." if name else "")
        plans.append(plan)
    if not plans:
        raise InvalidInputError("the model has no layer with trainable parameters")
    return plans


def _plan(name: str, module: nn.Module, part: str, fallback: bool) -> LayerPlan | None:
    found = registered_rule(module)
    subtree = found is not None and found[1].subtree
    if not any(p.requires_grad for p in module.parameters(recurse=subtree)):
        return None
    if found is None and is_bare_owner(module):
        return LayerPlan(name, module, "bare", BARE[part])
    problem = _unknown_layer_problem(name, module, found, part)
    if problem is None:
        rule = found[1]
        return LayerPlan(name, module, "rule", getattr(rule, part), rule.outputs, rule.subtree)
    if not fallback:
        raise UnsupportedLayerError(problem + "; or pass fallback=True for the exact (slower) torch.func path")
    # the layer's own forward is re-run, so none of the rule's layout parts apply; the subtree it reads does
    return LayerPlan(name, module, "fallback", fallback_function(part, subtree), fallback_outputs, subtree)


def _unknown_layer_problem(name: str, module: nn.Module, found: tuple[type, LayerRule] | None, part: str
                           ) -> str | None:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    register = "register one with erasus.ops.register_norm_sampler / register_fisher_sampler"
    if found is None:
        return (f"layer {name or '<model>'} of type {kind} has trainable parameters but no per-sample rule; freeze it "
                f"(requires_grad_(False)), {register}")
    registered, rule = found
    if getattr(rule, part) is None:
        return (f"layer {name or '<model>'} of type {kind} takes the rule of {registered.__qualname__}, which has no "
                f"{part} part; freeze it (requires_grad_(False)), {register}")
    if type(module).forward is not registered.forward:
        # the registered rule assumes the registered type's forward (y = x W^T + b, a lookup, ...); a subclass that
        # computes something else (e.g. scales the output) would get silently wrong results
        return (f"layer {name or '<model>'} of type {kind} subclasses {registered.__qualname__} but overrides its "
                f"forward, which the rule of {registered.__qualname__} does not know; freeze it, register a rule for "
                f"{type(module).__qualname__} with erasus.ops.register_norm_sampler / register_fisher_sampler")
    return None


def warn_slow_paths(op: str, slow: dict[str, list[str]]) -> None:
    """One :class:`SlowPathWarning` from ``op`` naming the layers on the fallback (``slow["fallback"]``) and the
    bare parameters (``slow["bare"]``), if any; the caller's caller is blamed."""
    notes = []
    if slow.get("fallback"):
        notes.append(f"layers {sorted(set(slow['fallback']))} have no rule and took the exact torch.func fallback "
                     "(slower)")
    if slow.get("bare"):
        notes.append(f"parameters {sorted(set(slow['bare']))} are used directly by their container and were measured "
                     "by one backward per sample (slower; freeze them with requires_grad_(False) to avoid the cost)")
    if notes:
        warnings.warn(f"erasus.ops.{op}: " + "; ".join(notes), SlowPathWarning, stacklevel=3)


def slow_paths(plans: list[LayerPlan], into: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """``{"fallback": layer names, "bare": parameter names}`` of the plans on a slow path, added to ``into``."""
    into = {"fallback": [], "bare": []} if into is None else into
    for plan in plans:
        if plan.kind in into:
            into[plan.kind] += plan.slow_names()
    return into


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


def capture(model: nn.Module, plans: list[LayerPlan], loss_fn: Callable, batch
            ) -> tuple[torch.Tensor, list[LayerRecord]]:
    """Run ``loss_fn(model, batch)`` with hooks on the layers of ``plans``; return the per-sample losses (B,) and
    the filled records.

    Layer outputs and inputs are kept by reference (no copies). If an in-place operation later in the forward
    changes one of them (``ReLU(inplace=True)``, ``x += ...``), the gradient taken at it would be the wrong
    one: the pass is then run again with copies of just those tensors.
    """
    losses, records, changed = _capture_once(model, plans, loss_fn, batch, copy=set())
    if changed:
        losses, records, changed = _capture_once(model, plans, loss_fn, batch, copy=changed)
        if changed:
            raise UnsupportedLayerError(f"layers {sorted(r.name for r in records if id(r.module) in changed)} "
                                        "change their own inputs or outputs in place")
    return losses, records


class _Measured:
    """What the parameter-use check asks of a layer (``parameters(recurse=False)``: those it owns), for a layer
    whose plan measures its children's parameters too."""

    def __init__(self, plan: LayerPlan):
        self.plan = plan

    def parameters(self, recurse: bool = False):
        return (p for _, p in self.plan.measured_parameters())


def _trainable_names(plans: list[LayerPlan]) -> dict[int, str]:
    """Qualified names of the parameters the layer plans measure; bare parameters are measured from their
    definition wherever they are used, so the parameter-use check leaves them out."""
    names: dict[int, str] = {}
    for plan in plans:
        if plan.kind == "bare":
            continue
        for attr, p in plan.measured_parameters():
            if p.requires_grad:
                names.setdefault(id(p), f"{plan.name}.{attr}" if plan.name else attr)
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
    """The tensors in a forward argument or output: a tensor, or nested in tuples / lists / dicts (a
    PackedSequence is a tuple, LSTM's hidden state a pair, a :class:`ForwardCall` holds a dict)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = tuple(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _map_tensors(value, fn):
    """``value`` with ``fn`` applied to each tensor in it, through plain tuples, lists, dicts and namedtuples (a
    PackedSequence keeps its type); anything else is kept as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return value._make(_map_tensors(item, fn) for item in value)
    if type(value) in (tuple, list):
        return type(value)(_map_tensors(item, fn) for item in value)
    if type(value) is dict:
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


def _versions(inputs: tuple, outputs: tuple) -> tuple:
    return tuple(t._version for t in _tensors(inputs) + list(outputs))


def _capture_once(model, plans: list[LayerPlan], loss_fn, batch, copy: set[int]):
    records: dict[int, LayerRecord] = {}
    versions: dict[int, tuple] = {}
    handles = []
    batch_seen = [0]

    def hook(plan: LayerPlan):
        name, reader = plan.name, plan.outputs

        def fn(module, args, kwargs, output):
            if id(module) in records:
                raise InvalidInputError(f"layer {name} ran more than once in one forward pass (a reused module); "
                                        "per-sample norms need one call per layer")
            # the fallback calls the layer again as it was called; a rule reads the arguments in signature order
            called = ForwardCall(args, kwargs) if plan.kind == "fallback" else _positional(module, args, kwargs)
            inputs = _map_tensors(called, torch.Tensor.detach)
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
                record = LayerRecord(plan, inputs, tuple(t for t, _ in read),
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
            records[id(module)] = LayerRecord(plan, inputs, output)
            versions[id(module)] = _versions(inputs, (output,))
            return downstream
        return fn

    bare = [plan for plan in plans if plan.kind == "bare"]
    try:
        for plan in plans:
            if plan.kind != "bare":
                handles.append(plan.module.register_forward_hook(hook(plan), with_kwargs=True))
        with torch.enable_grad():
            losses = check_losses(loss_fn(model, batch))
            changed = {key for key, r in records.items() if _versions(r.inputs, r.output_tensors()) != versions[key]}
            if changed:
                return losses, list(records.values()), changed
            check_parameter_uses(losses, [(r.name, _Measured(r.plan) if r.plan.subtree else r.module, t)
                                          for r in records.values() for t in r.output_tensors()],
                                 _trainable_names(plans))
            for plan in bare:  # reduced chunk by chunk here, while the graph of the losses is alive
                chunks = per_sample_parameter_grads_of_losses(losses, bare_parameters(plan.module), plan.name)
                records[id(plan.module)] = LayerRecord(plan, (), None,
                                                       measured=plan.function(plan.module, (), chunks, None))
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
    return losses.detach(), [records[id(p.module)] for p in plans if id(p.module) in records], set()


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
