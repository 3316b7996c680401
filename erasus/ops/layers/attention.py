"""``nn.MultiheadAttention`` as it is (no replacement module). Its forward reads its output projection's weights
(``out_proj.weight``) without calling ``out_proj``, so its rule measures the whole subtree, and it returns
``(attn_output, attn_weights)``, time-major unless ``batch_first``: the rule takes the exact per-sample gradients
of all its trainable parameters by torch.func (a vmap over the samples of the gradient of
``<attn_output_i, g_i> + <attn_weights_i, g'_i>``) from the captured arguments: query, key and value (separate
projections when ``kdim`` / ``vdim`` differ), ``key_padding_mask``, a 2-D or per-sample 3-D ``attn_mask``,
``add_bias_kv``, ``add_zero_attn``, with or without biases, need_weights and average_attn_weights either way.

Attention layers whose projections are ``nn.Linear`` layers called by their own forward (diffusers'
``Attention``, Hugging Face attention blocks) need no rule: each projection is a layer of its own, counted once.

Refused by name: an unbatched query (no sample dimension), and attention dropout in training mode (its random
mask cannot be replayed; call ``model.eval()``).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.func import functional_call

from erasus.errors import UnsupportedLayerError
from erasus.ops.layers._registry import register_layer
from erasus.ops.layers.fallback import squared_norms_of, squared_sums_of, vmapped_parameter_grads

_ARGUMENTS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


def mha_outputs(module, inputs, output):
    """(attn_output, batch dim)[, (attn_weights, 0)]: the weights are batch-first whichever the layout."""
    attn_output, attn_weights = output
    if attn_output.dim() != 3:
        raise UnsupportedLayerError(f"MultiheadAttention called on an unbatched query of shape "
                                    f"{tuple(attn_output.shape)}: per-sample gradients need a batch dimension")
    first = (attn_output, 0 if module.batch_first else 1)
    return (first,) if attn_weights is None else (first, (attn_weights, 0))


def mha_norms(module, inputs, grad, backend):
    return squared_norms_of(_per_sample_grads(module, inputs, grad))


def mha_fisher(module, inputs, grad, backend):
    return squared_sums_of(_per_sample_grads(module, inputs, grad))


def _per_sample_grads(module, inputs, grad):
    if module.training and module.dropout > 0:
        raise UnsupportedLayerError(f"MultiheadAttention(dropout={module.dropout}) in training mode drops random "
                                    "attention weights, a mask that cannot be replayed; call model.eval()")
    args = dict(zip(_ARGUMENTS, inputs))
    batch_dim = 0 if module.batch_first else 1
    batch = args["query"].shape[batch_dim]
    dims = {"query": batch_dim, "key": batch_dim, "value": batch_dim}
    if isinstance(args.get("key_padding_mask"), torch.Tensor):
        dims["key_padding_mask"] = 0
    mask = args.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:  # (B * heads, L, S): sample i owns rows i*heads...
        args["attn_mask"] = mask.reshape(batch, module.num_heads, *mask.shape[1:])
        dims["attn_mask"] = 0
    names = tuple(args)
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}

    def call(p, values):
        kwargs = dict(zip(names, values))
        if "attn_mask" in dims:
            kwargs["attn_mask"] = kwargs["attn_mask"].flatten(0, 1)
        attn_output, attn_weights = functional_call(module, p, (), kwargs)
        return attn_output, attn_weights

    grads = grad + (None,) * (2 - len(grad))
    return vmapped_parameter_grads(module, call, params, tuple(args.values()), tuple(dims.get(n) for n in names),
                                   grads, (batch_dim, 0))


register_layer(nn.MultiheadAttention, norms=mha_norms, fisher=mha_fisher, outputs=mha_outputs, subtree=True)
