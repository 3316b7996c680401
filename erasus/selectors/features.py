"""Features for selection: a feature tensor as given, or embeddings taken from a model over a dataset.

Token features (B, T, d) -- a transformer's hidden states -- are pooled per sample over the real tokens only:
the batch's ``attention_mask`` says which those are, so padding never changes a sample's feature.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from erasus._device import model_device, to_device
from erasus.errors import EmptyInputError, InvalidInputError, ShapeError

_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
POOLINGS = ("mean", "last")


def sample_count(data) -> int:
    """Number of samples in a tensor, Dataset or DataLoader."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0] if data.dim() else 0
    elif isinstance(data, DataLoader):
        n = len(data.dataset)
    elif hasattr(data, "__len__"):
        n = len(data)
    else:
        raise InvalidInputError(f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}")
    if n == 0:
        raise EmptyInputError("data holds no samples")
    return n


def check_feature_source(*, embed: Callable | None, layer: str | None, hidden_layer, pooling: str) -> None:
    """Validate the feature options at the boundary (selector ``__init__`` and :func:`extract_features`)."""
    if pooling not in POOLINGS:
        raise InvalidInputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if hidden_layer is None:
        return
    if isinstance(hidden_layer, bool) or not isinstance(hidden_layer, numbers.Integral):
        raise InvalidInputError(f"hidden_layer must be an integer index into the model's hidden states (negative "
                                f"counts from the last), got {hidden_layer!r}")
    if layer is not None:
        raise InvalidInputError("pass either layer= (a module whose input is the feature) or hidden_layer= (an "
                                "index into the model's hidden states), not both")
    if embed is not None:
        raise InvalidInputError("pass either embed= (a function of the batch) or hidden_layer=, not both")


def extract_features(data, *, model: nn.Module | None = None, embed: Callable | None = None,
                     layer: str | None = None, hidden_layer: int | None = None, pooling: str = "mean",
                     batch_size: int = 256) -> torch.Tensor:
    """(n, d) features for ``data``.

    - a 2-D tensor with neither ``model`` nor ``embed``: the tensor itself;
    - otherwise batches of ``data`` (a tensor of inputs, a Dataset or a DataLoader, in order; a Dataset with a
      ``collate`` method is batched with it) go through ``embed(inputs)`` if given, else through ``model``,
      whose features are hidden state number ``hidden_layer`` of ``model(..., output_hidden_states=True)``
      (a transformers model, peft-wrapped or not; 0 = the embeddings, -1 = the last), or the input of
      ``layer`` (a module name), or by default the input of its last ``nn.Linear`` (the penultimate
      representation of a classifier, the final hidden state of a causal LM).

    Features with a token axis (b, T, d) are pooled over T: ``pooling="mean"`` averages the real tokens,
    ``"last"`` takes the last real one (a causal LM's summary of the whole sequence). Real tokens are those
    where the batch's ``attention_mask`` is 1 (every token when the batch has none). Other shapes are
    flattened per sample.

    Batches may be tensors, ``(inputs, labels, ...)`` tuples, or dicts (Hugging Face style), in which case the
    model is called as ``model(**batch)`` without the label keys. The model runs in eval mode under
    ``torch.no_grad()``; its training mode is restored and its weights are not changed.

    Example:
        >>> import torch
        >>> from erasus.selectors import extract_features
        >>> table = torch.arange(12.0).reshape(6, 2)              # a toy embedding of 6 token ids
        >>> items = [{"input_ids": torch.tensor([1, 2, 0]), "attention_mask": torch.tensor([1, 1, 0])}]
        >>> extract_features(items, embed=lambda batch: table[batch["input_ids"]])   # the padding is left out
        tensor([[3., 4.]])
    """
    check_feature_source(embed=embed, layer=layer, hidden_layer=hidden_layer, pooling=pooling)
    if model is None and embed is None:
        if not isinstance(data, torch.Tensor):
            raise InvalidInputError("a Dataset or DataLoader needs a model or an embed function to give features")
        if hidden_layer is not None:
            raise InvalidInputError("hidden_layer needs a model to take hidden states from")
        if data.dim() != 2:
            raise ShapeError(f"data given as features must be 2-D (n, d), got shape {tuple(data.shape)}; "
                             "pass a model or an embed function to select from raw inputs")
        sample_count(data)
        return data
    n = sample_count(data)
    loader = as_loader(data, batch_size)
    if embed is not None:
        with torch.no_grad():
            feats = [pool_tokens(embed(batch_inputs(batch)), attention_mask_of(batch), pooling) for batch in loader]
    elif hidden_layer is not None:
        feats = _hidden_state_features(model, loader, hidden_layer, pooling)
    else:
        feats = _layer_input_features(model, find_layer(model, layer), loader, pooling)
    out = torch.cat(feats)
    if out.shape[0] != n:
        raise ShapeError(f"got features for {out.shape[0]} samples but data holds {n}")
    return out


def collate_of(dataset) -> Callable | None:
    """The ``collate(items)`` method of a dataset (or of the dataset under nested Subsets), if it has one:
    token datasets pad their variable-length items with it."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    collate = getattr(dataset, "collate", None)
    return collate if callable(collate) else None


def as_loader(data, batch_size: int) -> Iterable:
    """Batches of ``data`` in order: a DataLoader as given (it must not shuffle), a tensor split in rows, a
    Dataset batched with its own ``collate`` when it has one."""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise InvalidInputError("the DataLoader shuffles (shuffle=True), so selected indices would not match "
                                    "the dataset order; pass the Dataset or a DataLoader with shuffle=False")
        return data
    if isinstance(data, torch.Tensor):
        return data.split(batch_size)
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_of(data))
    raise InvalidInputError(f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}")


def batch_inputs(batch):
    """What the model is called with: the batch without its labels."""
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def attention_mask_of(batch) -> torch.Tensor | None:
    """The (B, T) mask of real tokens of a dict batch, or None."""
    return batch.get("attention_mask") if isinstance(batch, dict) else None


def find_layer(model: nn.Module, layer: str | None) -> nn.Module:
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise InvalidInputError(f"layer {layer!r} is not a module of the model")
        return modules[layer]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InvalidInputError("the model has no nn.Linear to take features from; pass layer= or embed=")
    return linears[-1]


def pool_tokens(f: torch.Tensor, mask: torch.Tensor | None, pooling: str = "mean") -> torch.Tensor:
    """(B, d) per-sample features: (B, T, d) pooled over the real tokens of ``mask`` (B, T) -- all tokens
    when it is None -- by their mean or the last one; other shapes flattened. Half precision becomes float32
    (the selection ops work in float32)."""
    f = f.detach()
    if f.dtype in (torch.float16, torch.bfloat16):
        f = f.float()
    if f.dim() != 3:
        return f.reshape(f.shape[0], -1)
    if mask is None:
        return f.mean(dim=1) if pooling == "mean" else f[:, -1]
    if tuple(mask.shape) != tuple(f.shape[:2]):
        raise ShapeError(f"token features of shape {tuple(f.shape)} do not match the attention_mask of shape "
                         f"{tuple(mask.shape)}; take features from a layer that keeps one row per input token")
    real = mask.to(device=f.device, dtype=torch.bool)
    if pooling == "mean":
        weights = real.to(f.dtype).unsqueeze(-1)
        return (f * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    # the highest real position (right or left padding alike); a sample with no real token gets position 0
    positions = torch.arange(f.shape[1], device=f.device).expand_as(real)
    last = torch.where(real, positions, 0).amax(dim=1)
    return f[torch.arange(f.shape[0], device=f.device), last]


def forward_all(model: nn.Module, loader: Iterable, on_output: Callable, **forward_kwargs) -> None:
    """Run every batch through the model in eval mode under no_grad, inputs moved to the model's device, and
    call ``on_output(batch, output)`` after each; the model's mode is restored afterwards."""
    device = model_device(model)
    with eval_mode(model), torch.no_grad():
        for batch in loader:
            inputs = to_device(batch_inputs(batch), device)
            out = model(**inputs, **forward_kwargs) if isinstance(inputs, dict) else model(inputs, **forward_kwargs)
            on_output(batch, out)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (scores without dropout, BatchNorm on running statistics); afterwards every
    submodule gets its own training flag back, so a model with some parts deliberately in eval mode (a frozen
    base under a training adapter) is left exactly as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def capture_layer(model: nn.Module, module: nn.Module, loader: Iterable, on_batch: Callable) -> None:
    """For each batch, ``on_batch(batch, layer_input, layer_output)`` of ``module`` (detached), from one
    forward pass of ``model`` per batch (see :func:`forward_all`). The module must run once per forward."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_forward(batch, _out):
        if len(seen) != 1:
            raise InvalidInputError(f"the feature layer ran {len(seen)} times in one forward pass; it must run "
                                    "exactly once per batch (name another with layer=)")
        on_batch(batch, *seen.pop())

    def hook(_module, args, out):
        seen.append((args[0].detach(), out.detach() if isinstance(out, torch.Tensor) else out))

    handle = module.register_forward_hook(hook)
    try:
        forward_all(model, loader, after_forward)
    finally:
        handle.remove()


def _layer_input_features(model: nn.Module, module: nn.Module, loader: Iterable, pooling: str) -> list[torch.Tensor]:
    feats: list[torch.Tensor] = []
    capture_layer(model, module, loader,
                  lambda batch, inputs, _out: feats.append(pool_tokens(inputs, attention_mask_of(batch), pooling)))
    return feats


def _hidden_state_features(model: nn.Module, loader: Iterable, index: int, pooling: str) -> list[torch.Tensor]:
    feats: list[torch.Tensor] = []

    def take(batch, out):
        states = getattr(out, "hidden_states", None)
        if states is None:
            raise InvalidInputError("hidden_layer needs a model that returns hidden_states when called with "
                                    "output_hidden_states=True (a transformers model); use layer= for others")
        if not -len(states) <= index < len(states):
            raise InvalidInputError(f"hidden_layer={index} is out of range: the model returns {len(states)} hidden "
                                    f"states (the embeddings and {len(states) - 1} layers), so use "
                                    f"{-len(states)}..{len(states) - 1}")
        feats.append(pool_tokens(states[index], attention_mask_of(batch), pooling))

    try:
        forward_all(model, loader, take, output_hidden_states=True)
    except TypeError as err:
        if "output_hidden_states" not in str(err):
            raise
        raise InvalidInputError(f"hidden_layer needs a model that takes output_hidden_states=True (a transformers "
                                f"model); {type(model).__name__} does not, use layer= instead") from err
    return feats


def labels_of(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        for key in _LABEL_KEYS:
            if key in batch:
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    raise InvalidInputError("this selector needs labels: batches must be (inputs, labels, ...) or dicts with 'labels'")
