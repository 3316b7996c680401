"""``nn.Embedding``: a lookup, so a sample's gradient has one non-zero row per distinct token it holds."""
from __future__ import annotations

import torch
from torch import nn

from erasus.ops.layers._math import own_trainable, token_grad_sums
from erasus.ops.layers._registry import register_layer
from erasus.ops.layers.fallback import fallback_fisher, fallback_norms


def embedding_norms(module, inputs, grad, backend):
    sample, _, sums = token_grad_sums(module, inputs, grad)
    squares = sums.double().square().sum(1)
    return torch.zeros(grad.shape[0], dtype=torch.float64, device=sums.device).index_add_(0, sample, squares)


def embedding_fisher(module, inputs, grad, backend):
    _, token, sums = token_grad_sums(module, inputs, grad)
    weight = torch.zeros(module.num_embeddings, sums.shape[-1], device=sums.device).index_add_(0, token, sums.square())
    return own_trainable(module, {"weight": weight})


register_layer(nn.Embedding, norms=embedding_norms, fisher=embedding_fisher)
# EmbeddingBag (bags of lookups reduced by sum / mean / max): exact per-sample gradients by torch.func
register_layer(nn.EmbeddingBag, norms=fallback_norms, fisher=fallback_fisher)
