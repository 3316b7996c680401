"""Features for selection: a feature tensor as given, or embeddings taken from a model over a dataset."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from erasus._device import model_device, to_device
from erasus.errors import EmptyInputError, InvalidInputError, ShapeError

_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


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


def extract_features(data, *, model: nn.Module | None = None, embed: Callable | None = None,
                     layer: str | None = None, batch_size: int = 256) -> torch.Tensor:
    """(n, d) features for ``data``.

    - a 2-D tensor with neither ``model`` nor ``embed``: the tensor itself;
    - otherwise batches of ``data`` (a tensor of inputs, a Dataset or a DataLoader, in order) go through
      ``embed(inputs)`` if given, else through ``model``, whose features are the input of ``layer`` (a
      module name) or of its last ``nn.Linear`` (the penultimate representation of a classifier). Features
      with a token axis (b, T, d) are mean-pooled over T; other shapes are flattened per sample.

    Batches may be tensors, ``(inputs, labels, ...)`` tuples, or dicts (Hugging Face style), in which case the
    model is called as ``model(**batch)`` without the label keys.
    """
    if model is None and embed is None:
        if not isinstance(data, torch.Tensor):
            raise InvalidInputError("a Dataset or DataLoader needs a model or an embed function to give features")
        if data.dim() != 2:
            raise ShapeError(f"data given as features must be 2-D (n, d), got shape {tuple(data.shape)}; "
                             "pass a model or an embed function to select from raw inputs")
        sample_count(data)
        return data
    n = sample_count(data)
    loader = _as_loader(data, batch_size)
    if embed is not None:
        with torch.no_grad():
            feats = [_pool(embed(_inputs(batch))) for batch in loader]
    else:
        feats = _run_with_hook(model, _find_layer(model, layer), loader)
    out = torch.cat(feats)
    if out.shape[0] != n:
        raise ShapeError(f"got features for {out.shape[0]} samples but data holds {n}")
    return out


def _as_loader(data, batch_size: int) -> Iterable:
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise InvalidInputError("the DataLoader shuffles (shuffle=True), so selected indices would not match "
                                    "the dataset order; pass the Dataset or a DataLoader with shuffle=False")
        return data
    if isinstance(data, torch.Tensor):
        return data.split(batch_size)
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    raise InvalidInputError(f"data must be a tensor, a Dataset or a DataLoader, got {type(data).__name__}")


def _inputs(batch):
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _find_layer(model: nn.Module, layer: str | None) -> nn.Module:
    if layer is not None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise InvalidInputError(f"layer {layer!r} is not a module of the model")
        return modules[layer]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InvalidInputError("the model has no nn.Linear to take features from; pass layer= or embed=")
    return linears[-1]


def _pool(f: torch.Tensor) -> torch.Tensor:
    f = f.detach()
    if f.dim() == 3:
        return f.mean(dim=1)
    return f.reshape(f.shape[0], -1)


def _run_with_hook(model: nn.Module, module: nn.Module, loader: Iterable) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: captured.append(_pool(args[0])))
    try:
        _forward_all(model, loader)
    finally:
        handle.remove()
    return captured


def _forward_all(model: nn.Module, loader: Iterable, on_batch: Callable | None = None) -> None:
    """Run every batch through the model in eval mode under no_grad, inputs moved to the model's device;
    the model's mode is restored afterwards."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if on_batch is not None:
                    on_batch(batch)
                inputs = to_device(_inputs(batch), device)
                if isinstance(inputs, dict):
                    model(**inputs)
                else:
                    model(inputs)
    finally:
        model.train(was_training)


def labels_of(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        for key in _LABEL_KEYS:
            if key in batch:
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    raise InvalidInputError("this selector needs labels: batches must be (inputs, labels, ...) or dicts with 'labels'")


def extract_head(data, model: nn.Module, *, layer: str | None = None, batch_size: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``h`` (n, d) and outputs ``z`` (n, C) of the model's last ``nn.Linear`` (or ``layer``), with the
    labels ``y`` (n,), from one forward pass over ``data`` in eval mode. The model is not changed."""
    if model is None:
        raise InvalidInputError("this selector needs a model")
    n = sample_count(data)
    loader = _as_loader(data, batch_size)
    module = _find_layer(model, layer)
    feats, logits, labels = [], [], []
    handle = module.register_forward_hook(lambda _m, args, out: (feats.append(args[0].detach()),
                                                                  logits.append(out.detach())))
    try:
        _forward_all(model, loader, on_batch=lambda batch: labels.append(labels_of(batch)))
    finally:
        handle.remove()
    h, z = torch.cat(feats), torch.cat(logits)
    y = torch.cat(labels).to(h.device)
    if h.dim() != 2 or z.dim() != 2:
        raise ShapeError(f"the last layer must map (B, d) features to (B, C) logits, got {tuple(h.shape)} -> "
                         f"{tuple(z.shape)}; pass layer= for a classifier head")
    if h.shape[0] != n or y.shape != (n,):
        raise ShapeError(f"got {h.shape[0]} feature rows and labels of shape {tuple(y.shape)} for {n} samples")
    return h, z, y
