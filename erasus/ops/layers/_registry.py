"""The one registry of layer rules: for each layer type, how to turn a layer's inputs and output gradient into
per-sample squared gradient norms (``norms``) and the sum over samples of squared gradients (``fisher``) of its
own trainable parameters. Both model-level ops read it; a rule is looked up through the module's MRO
(the first class with a rule gives every part).

Types from optional libraries (transformers) are registered lazily, on the first lookup after the library has
been imported by the caller (a model of that library implies it): erasus never imports them on its own, and
importing :mod:`erasus.ops` registers nothing as a side effect beyond the torch layers of this package.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

# (module, inputs, output_grad, backend) -> (B,) squared norm over the module's own trainable parameters,
# float64 preferred (squares of finite float32 gradients can leave the float32 range while the norm fits).
NormRule = Callable[[nn.Module, tuple, torch.Tensor, "str | None"], torch.Tensor]
# (module, inputs, output_grad, backend) -> {parameter attribute name: float32 sum_i (grad_i)^2, param-shaped}
FisherRule = Callable[[nn.Module, tuple, torch.Tensor, "str | None"], "dict[str, torch.Tensor]"]
# (module, inputs, output) -> ((tensor, batch dim or None), ...): the tensors a layer's forward returned that carry
# gradient back to its parameters, each with the dimension holding the samples (None: none to check, e.g. the
# data of a PackedSequence). Its rules then get ``output_grad`` as a tuple aligned with these tensors (None for
# one the loss does not reach).
OutputsRule = Callable[[nn.Module, tuple, object], "tuple[tuple[torch.Tensor, int | None], ...]"]


@dataclasses.dataclass
class LayerRule:
    """How one layer type yields per-sample quantities; either part may be missing (None) for a user's type
    registered for one op only.

    ``outputs`` reads a layer whose forward returns several tensors or is not batch-first (nn.LSTM's
    ``(output, (h_n, c_n))``, time-major ``(T, B, H)``); without it the output must be one batch-first tensor.
    ``subtree`` says the rule measures every parameter under the module, children's included, because the
    module uses its children's parameters without calling their forward (nn.MultiheadAttention reads
    ``out_proj.weight``): the children are then not layers of their own, and the parameter names the rules
    return may be dotted (``"out_proj.weight"``)."""

    norms: NormRule | None = None
    fisher: FisherRule | None = None
    outputs: OutputsRule | None = None
    subtree: bool = False


RULES: dict[type, LayerRule] = {}
_lazy_loaders: list[Callable[[], bool]] = []


def register_layer(*layer_types: type, norms: NormRule | None = None, fisher: FisherRule | None = None,
                   outputs: OutputsRule | None = None, subtree: bool | None = None) -> None:
    """Register ``norms`` and/or ``fisher`` (and the layout parts ``outputs`` / ``subtree`` of
    :class:`LayerRule`) for each of ``layer_types``; a part given replaces the old one."""
    for layer_type in layer_types:
        if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
            from erasus.errors import InvalidInputError

            raise InvalidInputError(f"layer types must be nn.Module subclasses, got {layer_type!r}")
        rule = RULES.setdefault(layer_type, LayerRule())
        if norms is not None:
            rule.norms = norms
        if fisher is not None:
            rule.fisher = fisher
        if outputs is not None:
            rule.outputs = outputs
        if subtree is not None:
            rule.subtree = subtree


def register_norm_sampler(*layer_types: type):
    """``@register_norm_sampler(Layer)``: ``fn(module, inputs, output_grad, backend) -> (B,)`` squared
    per-sample norms over the module's own trainable parameters (float64 preferred: square in float64 what may
    underflow). ``inputs`` are the layer's forward arguments (keyword arguments in signature order),
    ``output_grad`` the gradient of the summed per-sample losses at its output."""
    def decorate(fn: NormRule) -> NormRule:
        register_layer(*layer_types, norms=fn)
        return fn
    return decorate


def register_fisher_sampler(*layer_types: type):
    """``@register_fisher_sampler(Layer)``: ``fn(module, inputs, output_grad, backend) -> {parameter attribute
    name: sum over samples of squared per-sample gradients}`` (float32, shaped like the parameter)."""
    def decorate(fn: FisherRule) -> FisherRule:
        register_layer(*layer_types, fisher=fn)
        return fn
    return decorate


def register_lazy(loader: Callable[[], bool]) -> None:
    """``loader()`` registers the types of an optional library and returns True once it has (it is then not
    called again); it returns False while the library is not imported."""
    _lazy_loaders.append(loader)


def _load_lazy() -> None:
    for loader in list(_lazy_loaders):
        if loader():
            _lazy_loaders.remove(loader)


def registered_rule(module: nn.Module) -> tuple[type, LayerRule] | None:
    """``(class, rule)`` of the first class in the module's MRO that has a rule, or None. Every part of a layer's
    rule comes from that one class: a user's subclass registered for ``norms`` only does not inherit its parent's
    ``outputs`` reader or ``fisher`` (the parent's layout need not be the subclass's)."""
    _load_lazy()
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return cls, rule
    return None


def registered_type(module: nn.Module, part: str | None = None) -> type | None:
    """The class whose rule the module takes (:func:`registered_rule`); with ``part`` ("norms", "fisher" or
    "outputs"), None when that rule lacks the part."""
    found = registered_rule(module)
    if found is None or part is not None and getattr(found[1], part) is None:
        return None
    return found[0]


def rule_for(module: nn.Module, part: str) -> Callable | None:
    """The ``part`` function ("norms", "fisher" or "outputs") of the module's rule, or None."""
    found = registered_rule(module)
    return None if found is None else getattr(found[1], part)
