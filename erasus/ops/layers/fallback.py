"""The opt-in exact fallback for a layer no rule knows: the per-sample gradients of just that layer's own trainable
parameters, by ``torch.func`` (``vmap`` over the samples of ``grad`` of ``<layer(x_i), g_i>``), from the same
captured inputs and output gradients the rules get. Exact for any layer whose forward treats samples
independently and that ``vmap`` can run; slower than a rule (it materialises per-sample gradients of that layer,
in chunks of samples), so the ops name the layers that took it (:class:`SlowPathWarning`)."""
from __future__ import annotations

import warnings
from typing import Callable

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
    dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else None for a in inputs)
    if all(d is None for d in dims):
        raise UnsupportedLayerError(f"{type(module).__qualname__}: no forward argument has the batch's {batch} rows, "
                                    "so its per-sample gradients cannot be taken")

    def call(p, args):
        return (functional_call(module, p, args),)

    yield from vmapped_parameter_grads(module, call, params, inputs, dims, (grad,), (0,))


def vmapped_parameter_grads(module: nn.Module, call: Callable, params: dict[str, torch.Tensor], args: tuple,
                            arg_dims: tuple, grads: tuple, grad_dims: tuple):
    """The engine of the exact torch.func rules: yield ``{name: (b, *shape) float32}`` per-sample gradients of
    ``params`` over chunks of samples, where sample i's gradient is that of ``sum_k <out_k(x_i), g_k,i>``.

    ``call(params, args) -> (out_1, ..., out_K)`` runs the layer on ``args`` in which each argument with a batch
    dimension (``arg_dims[j]`` not None) holds one sample, kept as a size-1 dimension at that position;
    ``grads`` are the gradients at the K outputs (None for one the loss does not reach), each with its batch
    dimension in ``grad_dims``. Nothing is changed in place."""
    batched = [j for j, d in enumerate(arg_dims) if d is not None]
    reached = [k for k, g in enumerate(grads) if g is not None]
    batch = grads[reached[0]].shape[grad_dims[reached[0]]]

    def contribution(p, xs, gs):
        full = list(args)
        for j, x in zip(batched, xs):
            full[j] = x.unsqueeze(arg_dims[j])
        outs = call(p, tuple(full))
        return sum((outs[k].float() * g.unsqueeze(grad_dims[k]).float()).sum() for k, g in zip(reached, gs))

    per_sample = vmap(func_grad(contribution), in_dims=(None, tuple(arg_dims[j] for j in batched),
                                                         tuple(grad_dims[k] for k in reached)))
    elements = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, _CHUNK_ELEMENTS // elements)
    for start in range(0, batch, chunk):
        size = min(chunk, batch - start)
        xs = tuple(args[j].narrow(arg_dims[j], start, size) for j in batched)
        gs = tuple(grads[k].narrow(grad_dims[k], start, size) for k in reached)
        try:
            with warnings.catch_warnings():
                # torch's note that an op (e.g. CPU flash attention) is vmapped by a loop: the result is the same,
                # the ops already name the layers on this path, and the user has nothing to act on
                warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
                out = per_sample(params, xs, gs)
        except RuntimeError as exc:
            raise UnsupportedLayerError(f"{type(module).__qualname__}: the torch.func fallback cannot run its forward "
                                        f"per sample ({exc}); register a rule with erasus.ops.register_norm_sampler / "
                                        "register_fisher_sampler") from exc
        yield {name: g.float() for name, g in out.items()}


def squared_norms_of(chunks) -> torch.Tensor:
    """(B,) float64 squared norms over all parameters, from the chunks :func:`vmapped_parameter_grads` yields."""
    return torch.cat([sum(g.double().square().reshape(g.shape[0], -1).sum(1) for g in grads.values())
                      for grads in chunks])


def squared_sums_of(chunks) -> dict[str, torch.Tensor]:
    """{name: float32 sum over samples of squared gradients}, from the same chunks."""
    total: dict[str, torch.Tensor] = {}
    for grads in chunks:
        for name, g in grads.items():
            square = g.square().sum(0)
            total[name] = total[name] + square if name in total else square
    return total


def fallback_norms(module, inputs, grad, backend):
    """(B,) float64 squared per-sample norms over the module's own trainable parameters."""
    return squared_norms_of(per_sample_parameter_grads(module, inputs, grad))


def fallback_fisher(module, inputs, grad, backend):
    """{parameter attribute name: float32 sum over samples of squared per-sample gradients}."""
    return squared_sums_of(per_sample_parameter_grads(module, inputs, grad))


FALLBACK = {"norms": fallback_norms, "fisher": fallback_fisher}
