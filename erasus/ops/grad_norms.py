"""Per-sample gradient norms of a whole model from one batched forward and backward (the public
:func:`erasus.ops.grad_norms`).

Each layer type has a rule (:mod:`erasus.ops.layers`, the Opacus pattern) that turns the layer's inputs and output
gradients into per-sample squared norms of its trainable parameters; supporting a new layer type is one
``@register_norm_sampler(MyLayer)`` function, not an edit here.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from erasus.errors import NonFiniteError, UnsupportedLayerError
from erasus.ops import _capture
from erasus.ops._magnitude import to_float32
from erasus.ops._validate import all_finite


def grad_norms(model: nn.Module, loss_fn: Callable, batch, *, squared: bool = False,
               backend: str | None = None, fallback: bool = False) -> torch.Tensor:
    """Per-sample norms ``||d loss_i / d theta||`` over the model's trainable parameters, for every sample of
    ``batch``, from one batched forward and one backward, without per-sample gradients.

    Args:
        model: any ``nn.Module`` whose layers with trainable parameters are registered types: ``nn.Linear``,
            ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.RNN`` /
            ``nn.LSTM`` / ``nn.GRU`` (any layout, packed sequences too), ``nn.MultiheadAttention``,
            transformers' ``Conv1D`` (GPT-2) and Llama-style RMSNorm (the full list: CONTRIBUTING.md); peft LoRA
            adapters are ``nn.Linear`` layers, so freezing the base model measures the adapters only. Parameters
            a container uses directly in its forward (a class token, a position embedding, CLIP's
            ``logit_scale``) are measured exactly from their definition, by a vectorised backward per sample
            (:mod:`erasus.ops.layers.parameters`; a :class:`~erasus.ops.SlowPathWarning` names them: freezing
            them avoids the cost). Parameters with ``requires_grad=False`` are
            left out. Each trainable parameter must reach the loss only through the forward of a layer that
            owns it (an embedding tied to a linear head counts); any other use is refused. The model runs in
            its current mode (call ``model.eval()`` to score without dropout); its parameters (bit for bit,
            including the rows ``nn.Embedding(max_norm=...)`` renormalises in its forward), ``.grad`` fields
            and mode are not changed: this function does not mutate the model.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses (``reduction="none"``; for sequences,
            sum or average each sample's token losses, skipping padding). The gradient taken is that of
            their sum, so sample i's norm is that of ``loss_i`` alone -- when ``loss_i`` depends on sample i
            only. A loss that mixes the samples (CLIP's batch contrastive loss: each row's cross-entropy reads
            every caption of the batch) is not a per-sample loss: a layer's part of sample i's norm is then that
            of ``d (sum_j loss_j) / d (the layer's output row i)``, the gradient flowing back through sample i's
            own forward, not ``d loss_i / d theta``; bare parameters are still measured from ``d loss_i / d p``.
        batch: whatever ``loss_fn`` takes. Layers must be batch-first (B, ...): a layer that runs once for the
            whole batch is an error, but a time-major layer with T == B cannot be told apart — keep them
            batch-first (Hugging Face models are).
        squared: return squared norms.
        backend: backend of the layer kernels (:func:`erasus.ops.per_sample_grad_norms`).
        fallback: measure a trainable layer that no rule knows exactly, by ``torch.func`` per-sample gradients of
            that layer's own parameters (slower; a :class:`~erasus.ops.SlowPathWarning` names those layers)
            instead of refusing it (a subclass overriding a registered type's forward too). The layer is called
            again as it was called; each tensor argument with the batch's rows (nested in lists or tuples too) is
            split per sample, and an output that does not come out per sample is refused by name. Registered
            layers keep their fast rules.

    Returns:
        float32 (B,) on the model's device.

    Raises:
        UnsupportedLayerError: a trainable layer of an unregistered type, or of a registered type whose forward
            is overridden, or a trainable parameter used outside its layer's forward (``F.linear(h,
            layer.weight)``, ``h @ emb.weight.T``, a penalty on the weights in the loss): named in the message.
        NonFiniteError: also when the result overflows float32 (the message says so). Squares are summed in
            float64, so a norm that fits in float32 is returned even when its square does not.
        InvalidInputError / ShapeError / NonFiniteError: all parameters frozen, a BatchNorm in training mode,
            a layer called twice per forward, losses that are not per-sample, NaN/inf losses or gradients.

    Example:
        >>> import torch, erasus.ops
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
        >>> erasus.ops.grad_norms(model, loss, (x, y)).shape
        torch.Size([16])
    """
    plans = _capture.trainable_layers(model, "norms", fallback)
    ties = _shared_parameters(plans)
    with _capture.parameters_kept(model):
        losses, records = _capture.capture(model, plans, loss_fn, batch)
    total = torch.zeros(losses.shape[0], dtype=torch.float64, device=losses.device)
    for record in records:
        part = record.measure(backend)
        if part is not None:
            total += part.to(total.device, torch.float64)
    total += _tied_cross_terms(ties, records)
    total.clamp_(min=0.0)  # a negative cross term can take an exact zero a rounding below it
    if not all_finite(total):
        raise NonFiniteError("a per-sample squared gradient norm overflows float64 although the losses and "
                             "gradients are finite; scale the loss down")
    _capture.warn_slow_paths("grad_norms", _capture.slow_paths(plans))
    what = "a per-sample squared gradient norm" if squared else "a per-sample gradient norm"
    return to_float32(total if squared else total.sqrt(), what)


def _shared_parameters(plans) -> list[tuple[nn.Module, nn.Module]]:
    """Pairs of layers sharing a trainable parameter. Only an embedding tied to an output projection (the
    tied LM head) is supported: the norm then needs the cross term 2 <grad_emb, grad_head>."""
    owner: dict[int, tuple[str, nn.Module]] = {}
    ties = []
    for plan in plans:
        name, module = plan.name, plan.module
        for _, p in plan.measured_parameters():
            if not p.requires_grad:
                continue
            if id(p) in owner:
                other_name, other = owner[id(p)]
                pair = (other, module) if isinstance(other, nn.Embedding) else (module, other)
                if not (isinstance(pair[0], nn.Embedding) and isinstance(pair[1], nn.Linear)
                        and pair[1].weight is pair[0].weight):
                    raise UnsupportedLayerError(f"layers {other_name} and {name} share a parameter; only an "
                                                "embedding tied to a linear output layer is supported")
                ties.append(pair)
            else:
                owner[id(p)] = (name, module)
    return ties


def _tied_cross_terms(ties, records) -> torch.Tensor:
    by_module = {id(r.module): r for r in records}
    total = 0.0
    for emb, head in ties:
        e, h = by_module.get(id(emb)), by_module.get(id(head))
        if e is None or h is None or e.grad is None or h.grad is None:
            continue
        ids = e.inputs[0]
        batch = ids.shape[0]
        ids = ids.reshape(batch, -1)
        g_emb = e.grad.reshape(batch, ids.shape[1], -1).float()
        if emb.padding_idx is not None:
            g_emb = g_emb * (ids != emb.padding_idx).unsqueeze(-1)
        hidden = h.inputs[0].reshape(batch, -1, h.inputs[0].shape[-1]).float()
        g_head = h.grad.reshape(batch, hidden.shape[1], -1).float()
        # <sum_s e_{x_s} g_emb_s^T, sum_t g_head_t h_t^T> = sum_{t,s} g_head_t[x_s] (h_t . g_emb_s)
        picked = torch.gather(g_head, 2, ids.unsqueeze(1).expand(-1, g_head.shape[1], -1))
        # one gradient factor per float32 product; the product of two is taken in float64 (range)
        total = total + 2 * (picked.double() * torch.bmm(hidden, g_emb.transpose(1, 2)).double()).sum(dim=(1, 2))
    return total
