"""The opt-in exact fallback for a layer no rule knows: the per-sample gradients of just that layer's own trainable
parameters, by ``torch.func`` (``vmap`` over the samples of ``grad`` of ``<layer(x_i), g_i>``), from the same
captured inputs and output gradients the rules get. Exact for any layer whose forward treats samples
independently and that ``vmap`` can run; slower than a rule (it materialises per-sample gradients of that layer,
in chunks of samples), so the ops name the layers that took it (:class:`SlowPathWarning`)."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad as func_grad, vmap

from erasus.errors import UnsupportedLayerError

# per-sample gradients held at once: samples per chunk x trainable elements of the layer
_CHUNK_ELEMENTS = 1 << 24


class SlowPathWarning(UserWarning):
    """Some layers had no rule and were measured by the exact torch.func fallback (slower)."""


def per_sample_parameter_grads(module: nn.Module, inputs: tuple, grad: torch.Tensor):
    """Yield ``{parameter attribute name: (b, *shape) float32 per-sample gradients}`` over chunks of samples of
    ``module``'s own trainable parameters, given its forward arguments and the gradient at its output.
    The module is not changed (``functional_call`` substitutes detached copies of its parameters)."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False) if p.requires_grad}
    batch = grad.shape[0]
    batched = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch]
    if not batched:
        raise UnsupportedLayerError(f"{type(module).__qualname__}: no forward argument has the batch's {batch} rows, "
                                    "so its per-sample gradients cannot be taken")

    def contribution(p, xs, g):
        args = list(inputs)
        for i, x in zip(batched, xs):
            args[i] = x.unsqueeze(0)
        out = functional_call(module, p, tuple(args))
        return (out.float() * g.unsqueeze(0).float()).sum()

    per_sample = vmap(func_grad(contribution), in_dims=(None, 0, 0))
    elements = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, _CHUNK_ELEMENTS // elements)
    for start in range(0, batch, chunk):
        xs = tuple(inputs[i][start:start + chunk] for i in batched)
        try:
            grads = per_sample(params, xs, grad[start:start + chunk])
        except RuntimeError as exc:
            raise UnsupportedLayerError(f"{type(module).__qualname__}: the torch.func fallback cannot run its forward "
                                        f"per sample ({exc}); register a rule with erasus.ops.register_norm_sampler / "
                                        "register_fisher_sampler") from exc
        yield {name: g.float() for name, g in grads.items()}


def fallback_norms(module, inputs, grad, backend):
    """(B,) float64 squared per-sample norms over the module's own trainable parameters."""
    parts = [sum(g.double().square().reshape(g.shape[0], -1).sum(1) for g in grads.values())
             for grads in per_sample_parameter_grads(module, inputs, grad)]
    return torch.cat(parts)


def fallback_fisher(module, inputs, grad, backend):
    """{parameter attribute name: float32 sum over samples of squared per-sample gradients}."""
    total: dict[str, torch.Tensor] = {}
    for grads in per_sample_parameter_grads(module, inputs, grad):
        for name, g in grads.items():
            square = g.square().sum(0)
            total[name] = total[name] + square if name in total else square
    return total


FALLBACK = {"norms": fallback_norms, "fisher": fallback_fisher}
