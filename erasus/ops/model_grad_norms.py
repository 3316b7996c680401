"""Per-sample gradient norms of a whole model from one batched forward and backward.

Each layer type has a small function (the Opacus pattern) that turns the layer's inputs and output
gradients into per-sample squared norms of its trainable parameters; supporting a new layer type is one
``@register_norm_sampler(MyLayer)`` function, not an edit here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from erasus.errors import NonFiniteError, UnsupportedLayerError
from erasus.ops._magnitude import to_float32
from erasus.ops import _capture
from erasus.ops._validate import all_finite
from erasus.ops.grad_norms import norms_unchecked

# (module, inputs, output_grad, backend) -> (B,) squared norm of the module's own trainable params, float64
# (or float32): squares of finite float32 gradients can leave the float32 range while the norm itself fits.
NormSampler = Callable[[nn.Module, tuple, torch.Tensor, "str | None"], torch.Tensor]
NORM_SAMPLERS: dict[type, NormSampler] = {}


register_norm_sampler = _capture.registrar(NORM_SAMPLERS)
"""``@register_norm_sampler(Layer)``: ``fn(module, inputs, output_grad, backend) -> (B,)`` squared per-sample
norms over the module's own trainable parameters (float64 preferred: square in float64 what may underflow)."""


def grad_norms(model: nn.Module, loss_fn: Callable, batch, *, squared: bool = False,
               backend: str | None = None) -> torch.Tensor:
    """Per-sample norms ``||d loss_i / d theta||`` over the model's trainable parameters, for every sample of
    ``batch``, from one batched forward and one backward, without per-sample gradients.

    Args:
        model: any ``nn.Module`` whose layers with trainable parameters are registered types: ``nn.Linear``,
            ``nn.Conv1d``/``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, transformers'
            ``Conv1D`` (GPT-2) and Llama-style RMSNorm; peft LoRA adapters are ``nn.Linear`` layers, so
            freezing the base model measures the adapters only. Parameters with ``requires_grad=False`` are
            left out. Each trainable parameter must reach the loss only through the forward of a layer that
            owns it (an embedding tied to a linear head counts); any other use is refused. The model runs in
            its current mode (call ``model.eval()`` to score without dropout); its parameters (bit for bit,
            including the rows ``nn.Embedding(max_norm=...)`` renormalises in its forward), ``.grad`` fields
            and mode are not changed: this function does not mutate the model.
        loss_fn: ``loss_fn(model, batch) -> (B,)`` per-sample losses (``reduction="none"``; for sequences,
            sum or average each sample's token losses, skipping padding). The gradient taken is that of
            their sum, so sample i's norm is that of ``loss_i`` alone.
        batch: whatever ``loss_fn`` takes. Layers must be batch-first (B, ...): a layer that runs once for the
            whole batch is an error, but a time-major layer with T == B cannot be told apart — keep them
            batch-first (Hugging Face models are).
        squared: return squared norms.
        backend: backend of the layer kernels (:func:`erasus.ops.per_sample_grad_norms`).

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
    from erasus.ops._affine_layers import register_transformers_layers

    register_transformers_layers()
    layers = _capture.trainable_layers(model, NORM_SAMPLERS)
    ties = _shared_parameters(layers)
    with _capture.parameters_kept(model):
        losses, records = _capture.capture(model, layers, loss_fn, batch)
    total = torch.zeros(losses.shape[0], dtype=torch.float64, device=losses.device)
    for record in records:
        if record.grad is not None:
            fn = _capture.lookup(NORM_SAMPLERS, record.module)
            total += fn(record.module, record.inputs, record.grad, backend).to(total.device, torch.float64)
    total += _tied_cross_terms(ties, records)
    total.clamp_(min=0.0)  # a negative cross term can take an exact zero a rounding below it
    if not all_finite(total):
        raise NonFiniteError("a per-sample squared gradient norm overflows float64 although the losses and "
                             "gradients are finite; scale the loss down")
    what = "a per-sample squared gradient norm" if squared else "a per-sample gradient norm"
    return to_float32(total if squared else total.sqrt(), what)


def _shared_parameters(layers) -> list[tuple[nn.Module, nn.Module]]:
    """Pairs of layers sharing a trainable parameter. Only an embedding tied to an output projection (the
    tied LM head) is supported: the norm then needs the cross term 2 <grad_emb, grad_head>."""
    owner: dict[int, tuple[str, nn.Module]] = {}
    ties = []
    for name, module in layers:
        for p in module.parameters(recurse=False):
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


def _batched(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., f) -> (B, T, f)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _common_dtype(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Mixed precision (autocast) hands a layer float32 inputs and bfloat16 output grads: compute in float32.
    if a.dtype != g.dtype:
        return a.float(), g.float()
    return a, g


def _weight_bias(module, weight_sq: torch.Tensor, bias_sq: torch.Tensor) -> torch.Tensor:
    """The per-sample squared norm over the module's trainable weight and bias."""
    return sum(_capture.own_trainable(module, {"weight": weight_sq, "bias": bias_sq}).values(),
               torch.zeros_like(weight_sq))


def has_trainable_bias(module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor) and module.bias.requires_grad


@register_norm_sampler(nn.Linear)
def linear_norms(module, inputs, grad, backend):
    a, g = _common_dtype(_batched(inputs[0]), _batched(grad))
    res = norms_unchecked(a, g, backend=backend, with_bias=has_trainable_bias(module), out_dtype=torch.float64)
    return _weight_bias(module, res.weight, res.bias)


def token_grad_sums(module: nn.Embedding, inputs: tuple, grad: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample, token) sums of an embedding's output gradients: ``sum_{t: x_t = v} g_t`` for each distinct
    token v of each sample -- exactly the non-zero rows of the per-sample embedding gradients -- via one
    index_add, O(B T p), with no T x T mask and no V x p buffer. Returns (sample index, token id, sums)."""
    if module.scale_grad_by_freq:
        raise UnsupportedLayerError("nn.Embedding(scale_grad_by_freq=True) scales gradients by batch-wide token "
                                    "counts, so per-sample gradients are not defined by the layer alone")
    ids = inputs[0].reshape(grad.shape[0], -1)
    g = grad.reshape(ids.shape[0], ids.shape[1], -1).float()
    if module.padding_idx is not None:
        g = g * (ids != module.padding_idx).unsqueeze(-1)
    keys = torch.arange(ids.shape[0], device=ids.device)[:, None] * module.num_embeddings + ids
    uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    sums = torch.zeros(uniq.numel(), g.shape[-1], device=g.device).index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
    return uniq // module.num_embeddings, uniq % module.num_embeddings, sums


@register_norm_sampler(nn.Embedding)
def embedding_norms(module, inputs, grad, backend):
    sample, _, sums = token_grad_sums(module, inputs, grad)
    squares = sums.double().square().sum(1)
    return torch.zeros(grad.shape[0], dtype=torch.float64, device=sums.device).index_add_(0, sample, squares)


def _conv_padding(module) -> tuple[int, ...]:
    if module.groups != 1:
        raise UnsupportedLayerError(f"{type(module).__name__} with groups={module.groups} is not supported")
    if module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
        raise UnsupportedLayerError(f"{type(module).__name__} with padding={module.padding!r}, padding_mode="
                                    f"{module.padding_mode!r} is not supported; use integer zero padding")
    return (0,) * len(module.kernel_size) if isinstance(module.padding, str) else tuple(module.padding)


def conv_as_linear(module, x: torch.Tensor, grad: torch.Tensor):
    """Unfold a convolution into a linear map over output positions: (B, L, C_in k) and (B, L, C_out)."""
    padding = _conv_padding(module)
    if isinstance(module, nn.Conv1d):
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, padding[0]), stride=(1, module.stride[0]))
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.transpose(1, 2), grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)


@register_norm_sampler(nn.Conv1d, nn.Conv2d)
def conv_norms(module, inputs, grad, backend):
    if module.in_channels >= GROUPED_CONV_MIN_CHANNELS and backend in (None, "reference"):
        return _weight_bias(module, _grouped_conv_weight_sq(module, inputs[0], grad),
                            grad.reshape(grad.shape[0], grad.shape[1], -1).float().sum(2).double().square().sum(1))
    a, g = conv_as_linear(module, inputs[0], grad)
    a, g = _common_dtype(a, g)
    res = norms_unchecked(a, g, backend=backend, with_bias=has_trainable_bias(module), out_dtype=torch.float64)
    return _weight_bias(module, res.weight, res.bias)


# With this many input channels, the per-sample weight gradients of a convolution (B x C_out x C_in x k, small
# next to the activations) are cheapest formed by the backend's own weight-gradient convolution, grouped by
# sample; with fewer, unfold + bmm is faster (measured on the bench CNN: 4.6 vs 9.8 ms at 32 channels, 4.8 vs
# 3.1 ms at 3).
GROUPED_CONV_MIN_CHANNELS = 16


def _grouped_conv_weight_sq(module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    padding = _conv_padding(module)
    batch = x.shape[0]
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    if x.dtype != grad.dtype:
        x, grad = x.float(), grad.float()
    per_sample = weight_grad(x.reshape(1, batch * x.shape[1], *x.shape[2:]),
                             (batch * module.out_channels, module.in_channels, *module.kernel_size),
                             grad.reshape(1, batch * grad.shape[1], *grad.shape[2:]), stride=module.stride,
                             padding=padding, dilation=module.dilation, groups=batch)
    return per_sample.reshape(batch, -1).double().square().sum(1)
