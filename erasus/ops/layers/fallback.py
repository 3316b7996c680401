"""The opt-in exact fallback for a layer no rule knows: the per-sample gradients of just that layer's own trainable
parameters, by ``torch.func`` (``vmap`` over the samples of ``grad`` of ``<layer(x_i), g_i>``), from the same
captured inputs and output gradients the rules get. Exact for any layer whose forward treats samples
independently; slower than a rule (it materialises per-sample gradients of that layer, in chunks of samples, and
runs one sample at a time where ``vmap`` cannot run the forward), so the ops name the layers that took it
(:class:`SlowPathWarning`). The layer is called as it was (keyword arguments by name), and each of its outputs on
one sample must have the shape of its batch output with one row, or it is refused by name."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad as func_grad, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from erasus.errors import UnsupportedLayerError

# per-sample gradients held at once: samples per chunk x trainable elements of the layer
_CHUNK_ELEMENTS = 1 << 24


class SlowPathWarning(UserWarning):
    """Some parameters were measured by a slower exact path: layers without a rule (the torch.func fallback), or
    bare parameters of a container (one backward per sample)."""


class ForwardCall(NamedTuple):
    """A layer's forward arguments as the layer was called, positional and keyword apart: the fallback calls the
    layer again the same way (``functional_call(module, params, args, kwargs)``), so a keyword-only argument
    keeps its name."""

    args: tuple
    kwargs: dict


def fallback_outputs(module, inputs, output):
    """The outputs reader of a layer on the fallback: every tensor its forward returned (one, or nested in
    tuples / lists / dicts), each with the samples in dimension 0 (layers are batch-first)."""
    tensors = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise UnsupportedLayerError(f"{type(module).__qualname__} returned {type(output).__name__} holding no tensor")
    return tuple((t, 0 if t.dim() else None) for t in tensors)


def per_sample_parameter_grads(module: nn.Module, call: ForwardCall, grads: tuple, subtree: bool = False):
    """Yield ``{parameter name: (b, *shape) float32 per-sample gradients}`` over chunks of samples of
    ``module``'s own trainable parameters (its whole subtree's with ``subtree=True``, dotted names), given its
    forward call and the gradients at the tensors of its output (:func:`fallback_outputs`, batch-first; None for
    one the loss does not reach). Every tensor argument with the batch's rows, nested in lists, tuples or dicts
    too, is split per sample; the others are shared. The module is not changed (``functional_call`` substitutes
    detached copies of its parameters)."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=subtree) if p.requires_grad}
    if any(g is not None and g.dim() == 0 for g in grads):
        raise UnsupportedLayerError(f"{type(module).__qualname__} returns a scalar that the loss reaches: it has no "
                                    "sample dimension, so its per-sample gradients cannot be taken")
    batch = next(g for g in grads if g is not None).shape[0]
    leaves, spec = tree_flatten((tuple(call.args), dict(call.kwargs)))
    dims = tuple(0 if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else None for a in leaves)
    if all(d is None for d in dims):
        raise UnsupportedLayerError(f"{type(module).__qualname__}: no forward argument has the batch's {batch} rows, "
                                    "so its per-sample gradients cannot be taken")

    def run(p, values):
        args, kwargs = tree_unflatten(list(values), spec)
        return tuple(t for t in tree_leaves(functional_call(module, p, args, kwargs)) if isinstance(t, torch.Tensor))

    yield from vmapped_parameter_grads(module, run, params, tuple(leaves), dims, grads, (0,) * len(grads))


def vmapped_parameter_grads(module: nn.Module, call: Callable, params: dict[str, torch.Tensor], args: tuple,
                            arg_dims: tuple, grads: tuple, grad_dims: tuple):
    """The engine of the exact torch.func rules: yield ``{name: (b, *shape) float32}`` per-sample gradients of
    ``params`` over chunks of samples, where sample i's gradient is that of ``sum_k <out_k(x_i), g_k,i>``.

    ``call(params, args) -> (out_1, ..., out_K)`` runs the layer on ``args`` in which each argument with a batch
    dimension (``arg_dims[j]`` not None) holds one sample, kept as a size-1 dimension at that position;
    ``grads`` are the gradients at the K outputs (None for one the loss does not reach), each with its batch
    dimension in ``grad_dims``. Each output of one sample must have its full output's shape with 1 in the batch
    dimension: one that does not (an argument holding samples that was not split, an output that mixes the
    samples) is refused with an UnsupportedLayerError rather than measured wrong. Nothing is changed in place."""
    batched = [j for j, d in enumerate(arg_dims) if d is not None]
    reached = [k for k, g in enumerate(grads) if g is not None]
    batch = grads[reached[0]].shape[grad_dims[reached[0]]]
    expected = {k: _one_sample_shape(grads[k].shape, grad_dims[k]) for k in reached}

    def contribution(p, xs, gs):
        full = list(args)
        for j, x in zip(batched, xs):
            full[j] = x.unsqueeze(arg_dims[j])
        outs = call(p, tuple(full))
        _check_one_sample_outputs(module, outs, len(grads), expected)
        return sum((outs[k].float() * g.unsqueeze(grad_dims[k]).float()).sum() for k, g in zip(reached, gs))

    one_sample = func_grad(contribution)
    per_sample = vmap(one_sample, in_dims=(None, tuple(arg_dims[j] for j in batched),
                                           tuple(grad_dims[k] for k in reached)))
    elements = max(1, sum(p.numel() for p in params.values()))
    chunk = max(1, _CHUNK_ELEMENTS // elements)
    vectorised = True  # until vmap turns out unable to run the forward: then one sample at a time, throughout
    for start in range(0, batch, chunk):
        size = min(chunk, batch - start)
        xs = tuple(args[j].narrow(arg_dims[j], start, size) for j in batched)
        gs = tuple(grads[k].narrow(grad_dims[k], start, size) for k in reached)
        out = None
        if vectorised:
            try:
                with warnings.catch_warnings():
                    # torch's note that an op (e.g. CPU flash attention) is vmapped by a loop: the result is the
                    # same, the ops already name the layers on this path, and the user has nothing to act on
                    warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
                    out = per_sample(params, xs, gs)
            except RuntimeError as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                # a forward vmap cannot batch (a fused recurrent kernel writing into a state it allocates, ...):
                # the same gradients, one sample at a time
                vectorised = False
        if out is None:
            out = _sample_by_sample(module, one_sample, params, xs, [arg_dims[j] for j in batched], gs,
                                    [grad_dims[k] for k in reached])
        yield {name: g.float() for name, g in out.items()}


def _sample_by_sample(module, one_sample, params, xs, x_dims, gs, g_dims) -> dict[str, torch.Tensor]:
    rows = []
    for i in range(gs[0].shape[g_dims[0]]):
        try:
            rows.append(one_sample(params, tuple(x.select(d, i) for x, d in zip(xs, x_dims)),
                                   tuple(g.select(d, i) for g, d in zip(gs, g_dims))))
        except RuntimeError as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            raise UnsupportedLayerError(f"{type(module).__qualname__}: the torch.func fallback cannot run its forward "
                                        f"per sample ({exc}); register a rule with erasus.ops.register_norm_sampler / "
                                        "register_fisher_sampler") from exc
    return {name: torch.stack([row[name] for row in rows]) for name in params}


def _one_sample_shape(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return tuple(1 if i == dim else n for i, n in enumerate(shape))


def _check_one_sample_outputs(module: nn.Module, outs: tuple, count: int, expected: dict[int, tuple]) -> None:
    if len(outs) != count:
        raise UnsupportedLayerError(f"{type(module).__qualname__}: called on one sample, its forward returned "
                                    f"{len(outs)} tensors, not the {count} it returned on the batch")
    for k, shape in expected.items():
        if tuple(outs[k].shape) != shape:
            raise UnsupportedLayerError(
                f"{type(module).__qualname__}: called on one sample, its output {k} has shape "
                f"{tuple(outs[k].shape)}, not {shape} (its batch output with one row): an argument holding the "
                "samples was not split (only tensors with the batch's rows in dimension 0 are), or the forward mixes "
                "the samples; register a rule with erasus.ops.register_norm_sampler / register_fisher_sampler")


def squared_norms_of(chunks) -> torch.Tensor:
    """(B,) float64 squared norms over all parameters, from chunks ``{name: (b, *shape) per-sample gradients}``
    (:func:`vmapped_parameter_grads`); each chunk is reduced as it comes."""
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


def _call_and_grads(inputs, grad) -> tuple[ForwardCall, tuple]:
    call = inputs if isinstance(inputs, ForwardCall) else ForwardCall(tuple(inputs), {})
    return call, grad if isinstance(grad, tuple) else (grad,)


def fallback_norms(module, inputs, grad, backend, *, subtree: bool = False):
    """(B,) float64 squared per-sample norms over the module's own trainable parameters (its subtree's with
    ``subtree=True``); ``inputs``: a :class:`ForwardCall`, ``grad``: the gradients at :func:`fallback_outputs`."""
    return squared_norms_of(per_sample_parameter_grads(module, *_call_and_grads(inputs, grad), subtree))


def fallback_fisher(module, inputs, grad, backend, *, subtree: bool = False):
    """{parameter name: float32 sum over samples of squared per-sample gradients}."""
    return squared_sums_of(per_sample_parameter_grads(module, *_call_and_grads(inputs, grad), subtree))


FALLBACK = {"norms": fallback_norms, "fisher": fallback_fisher}


def fallback_function(part: str, subtree: bool) -> Callable:
    """The fallback's ``part`` ("norms" or "fisher") function, over the module's subtree if ``subtree``."""
    return functools.partial(FALLBACK[part], subtree=True) if subtree else FALLBACK[part]
