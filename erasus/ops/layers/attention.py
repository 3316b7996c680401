"""``nn.MultiheadAttention`` as it is (no replacement module). Its forward reads its output projection's weights
(``out_proj.weight``) without calling ``out_proj``, so its rule measures the whole subtree, and it returns
``(attn_output, attn_weights)``, time-major unless ``batch_first``.

Every weight of the layer is a linear map -- the query, key and value projections (one packed ``in_proj_weight``
or three ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ, biases in ``in_proj_bias``) and ``out_proj`` --
so, as for the recurrent layers, the rule re-runs the attention with the projections' outputs as leaves (torch's
equations between them: scaled dot products, masks, ``add_zero_attn``, softmax, ``need_weights`` and
``average_attn_weights``), backpropagates the captured output gradients to those leaves once for the whole
batch, and hands each map's ``(inputs, output gradients)`` to the linear kernels (``out_proj``'s are the attention
context and the captured output gradient themselves). ``add_bias_kv``'s rows are appended per sample as leaves
too: a sample's gradient of ``bias_k`` is the gradient at its appended row. Exact for a 2-D or per-sample 3-D
``attn_mask`` (with or without the ``is_causal`` hint), ``key_padding_mask``, either layout; no per-sample gradient
is formed (the projections are recomputed once, as one batched forward would).

Attention layers whose projections are ``nn.Linear`` layers called by their own forward (diffusers'
``Attention``, Hugging Face attention blocks) need no rule: each projection is a layer of its own, counted once.

Refused by name: an unbatched query (no sample dimension), and attention dropout in training mode (its random
mask cannot be replayed; call ``model.eval()``).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from erasus.errors import UnsupportedLayerError
from erasus.ops.layers._math import common_dtype
from erasus.ops.layers._registry import register_layer
from erasus.ops.linear_grads import norms_unchecked, squares_unchecked

_ARGUMENTS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


@dataclasses.dataclass
class Projection:
    """One linear map of the layer: ``weight`` and ``bias`` (parameter names; ``*_rows``: the rows of a packed
    parameter it uses, None: all), with what it read (B, T, d) and the gradient at what it produced (B, T, p)."""

    weight: str
    weight_rows: slice | None
    bias: str | None
    bias_rows: slice | None
    inputs: torch.Tensor
    grads: torch.Tensor


def mha_outputs(module, inputs, output):
    """(attn_output, batch dim)[, (attn_weights, 0)]: the weights are batch-first whichever the layout."""
    attn_output, attn_weights = output
    if attn_output.dim() != 3:
        raise UnsupportedLayerError(f"MultiheadAttention called on an unbatched query of shape "
                                    f"{tuple(attn_output.shape)}: per-sample gradients need a batch dimension")
    first = (attn_output, 0 if module.batch_first else 1)
    return (first,) if attn_weights is None else (first, (attn_weights, 0))


def mha_norms(module, inputs, grad, backend):
    projections, appended = _rerun(module, inputs, grad)
    batch = projections[0].inputs.shape[0]
    total = torch.zeros(batch, dtype=torch.float64, device=projections[0].inputs.device)
    for p in projections:
        a, g = common_dtype(p.inputs, p.grads)
        res = norms_unchecked(a, g, backend=backend, with_bias=_trainable(module, p.bias), out_dtype=torch.float64)
        if _trainable(module, p.weight):
            total += res.weight
        if _trainable(module, p.bias):
            total += res.bias
    for name, per_sample in appended.items():
        if _trainable(module, name):
            total += per_sample.double().square().sum(1)
    return total


def mha_fisher(module, inputs, grad, backend):
    projections, appended = _rerun(module, inputs, grad)
    values: dict[str, torch.Tensor] = {}
    for p in projections:
        a, g = common_dtype(p.inputs, p.grads)
        res = squares_unchecked(a, g, backend, with_bias=_trainable(module, p.bias))
        for name, rows, value in ((p.weight, p.weight_rows, res.weight), (p.bias, p.bias_rows, res.bias)):
            if _trainable(module, name):
                _place(values, module, name, rows, value)
    for name, per_sample in appended.items():
        if _trainable(module, name):
            values[name] = per_sample.float().square().sum(0).reshape(module.get_parameter(name).shape)
    return values


def _trainable(module, name: str | None) -> bool:
    return name is not None and module.get_parameter(name).requires_grad


def _place(values: dict, module, name: str, rows: slice | None, value: torch.Tensor) -> None:
    """Write a projection's part of a packed parameter (rows of ``in_proj_weight`` / ``in_proj_bias``)."""
    if rows is None:
        values[name] = value
        return
    if name not in values:
        values[name] = torch.zeros(module.get_parameter(name).shape, dtype=torch.float32, device=value.device)
    values[name][rows] = value


def _rerun(module, inputs, grad) -> tuple[list[Projection], dict[str, torch.Tensor]]:
    """Re-run the attention between the projections and backpropagate the captured output gradients once:
    every projection's (inputs, output gradients) batch-first, and the per-sample gradients (B, E) of the
    appended ``bias_k`` / ``bias_v`` rows. The module is not changed."""
    if module.training and module.dropout > 0:
        raise UnsupportedLayerError(f"MultiheadAttention(dropout={module.dropout}) in training mode drops random "
                                    "attention weights, a mask that cannot be replayed; call model.eval()")
    args = dict(zip(_ARGUMENTS, inputs))
    dtype = torch.promote_types(module.out_proj.weight.dtype, torch.float32)
    # time-major (T, B, d), as torch's functional forward takes them
    query, key, value = (args[n].to(dtype).transpose(0, 1) if module.batch_first else args[n].to(dtype)
                         for n in ("query", "key", "value"))
    batch, embed = query.shape[1], module.embed_dim
    out_grad = None if grad[0] is None else grad[0].to(dtype)
    if out_grad is not None and module.batch_first:
        out_grad = out_grad.transpose(0, 1)
    weights_grad = grad[1] if len(grad) > 1 else None
    maps = _input_maps(module, embed)
    with torch.enable_grad():
        leaves = [F.linear(x, _detached(module, w, w_rows, dtype), _detached(module, b, b_rows, dtype)).detach()
                  .requires_grad_() for x, (w, w_rows, b, b_rows) in zip((query, key, value), maps)]
        keys, values_in = leaves[1], leaves[2]
        key_padding_mask, attn_mask = args.get("key_padding_mask"), args.get("attn_mask")
        appended = {}
        if module.bias_k is not None:  # one appended row per sample, as torch's repeat over the batch makes
            appended = {name: getattr(module, name).detach().to(dtype).expand(1, batch, embed).clone()
                        .requires_grad_() for name in ("bias_k", "bias_v")}
            keys = torch.cat([keys, appended["bias_k"]])
            values_in = torch.cat([values_in, appended["bias_v"]])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        context, attn_weights = _attend(module, leaves[0], keys, values_in, key_padding_mask, attn_mask,
                                        bool(args.get("need_weights", True)),
                                        bool(args.get("average_attn_weights", True)))
        out_weight = module.out_proj.weight.detach().to(dtype)
        terms = [] if out_grad is None else [(context * (out_grad @ out_weight)).sum()]
        if weights_grad is not None and attn_weights is not None:
            terms.append((attn_weights * weights_grad.to(dtype)).sum())
        targets = leaves + list(appended.values())
        deltas = torch.autograd.grad(sum(terms), targets, allow_unused=True) if terms else [None] * len(targets)
    deltas = [torch.zeros_like(t) if d is None else d.detach() for t, d in zip(targets, deltas)]
    projections = [Projection(*names, x.transpose(0, 1), d.transpose(0, 1))
                   for x, d, names in zip((query, key, value), deltas, maps)]
    context = context.detach()
    out_bias = "out_proj.bias" if module.out_proj.bias is not None else None
    projections.append(Projection("out_proj.weight", None, out_bias, None, context.transpose(0, 1),
                                  (torch.zeros_like(context) if out_grad is None else out_grad).transpose(0, 1)))
    return projections, {name: d[0] for name, d in zip(appended, deltas[3:])}


def _attend(module, q, k, v, key_padding_mask, attn_mask, need_weights: bool, average: bool):
    """torch's attention between the projections (``F.multi_head_attention_forward`` after its input projections
    and before ``out_proj``), time-major: ``softmax(q k^T / sqrt(d_head) + masks) v`` per head, with
    ``add_zero_attn``'s zero key and value, boolean masks as -inf, a 2-D or (B * heads, L, S) ``attn_mask`` (with
    ``is_causal`` it is the causal mask, as torch requires) and a (B, S) ``key_padding_mask``. Returns the context
    (L, B, E) and, if ``need_weights``, the weights (B, L, S), averaged over heads if ``average``."""
    length, batch, embed = q.shape
    heads = module.num_heads
    per_head = embed // heads
    q, k, v = (t.reshape(t.shape[0], batch * heads, per_head).transpose(0, 1) for t in (q, k, v))
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch * heads, 1, per_head)], dim=1)
        v = torch.cat([v, v.new_zeros(batch * heads, 1, per_head)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    scores = torch.bmm(q * per_head ** -0.5, k.transpose(1, 2))
    if attn_mask is not None:
        scores = scores + _additive(attn_mask, q.dtype)
    if key_padding_mask is not None:
        padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, -1)
        scores = (scores.view(batch, heads, length, -1) + padding).view(batch * heads, length, -1)
    weights = torch.softmax(scores, dim=-1)
    context = torch.bmm(weights, v).transpose(0, 1).reshape(length, batch, embed)
    if not need_weights:
        return context, None
    weights = weights.view(batch, heads, length, -1)
    return context, weights.mean(dim=1) if average else weights


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A mask as torch adds it to the scores: a boolean one is -inf where True."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _input_maps(module, embed: int) -> list[tuple]:
    """(weight name, its rows, bias name, its rows) of the query, key and value projections: rows of the packed
    ``in_proj_weight`` / ``in_proj_bias``, or separate ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ."""
    bias = "in_proj_bias" if module.in_proj_bias is not None else None
    rows = [slice(i * embed, (i + 1) * embed) for i in range(3)]
    if module._qkv_same_embed_dim:
        return [("in_proj_weight", r, bias, r) for r in rows]
    return [(f"{k}_proj_weight", None, bias, r) for k, r in zip("qkv", rows)]


def _detached(module, name: str | None, rows: slice | None, dtype) -> torch.Tensor | None:
    """A projection's weight or bias (its rows of a packed parameter), detached."""
    if name is None:
        return None
    value = module.get_parameter(name).detach().to(dtype)
    return value if rows is None else value[rows]


register_layer(nn.MultiheadAttention, norms=mha_norms, fisher=mha_fisher, outputs=mha_outputs, subtree=True)
