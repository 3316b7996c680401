"""The embedded default: scikit-learn's bundled digits (1,797 real 8x8 images, no download), a small MLP
trained in seconds, and the two standard scenarios (forget one class; forget a random 10%)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Subset, TensorDataset

from erasus.errors import InvalidInputError
from erasus.training import train_classifier

SCENARIOS = ("class", "random")


def load_digits_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) TensorDatasets of float32 (n, 64) images in [0, 1] and int64 labels; a stratified 80/20
    split fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=seed)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def digits_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def split_scenario(train: TensorDataset, scenario: str, *, forget_class: int = 3, forget_fraction: float = 0.1,
                   seed: int = 0) -> tuple[Subset, Subset]:
    """(forget, retain) subsets of ``train``: one whole class, or a random ``forget_fraction``."""
    labels = train.tensors[1]
    n = len(labels)
    if scenario == "class":
        mask = labels == forget_class
    elif scenario == "random":
        if isinstance(forget_fraction, bool) or not isinstance(forget_fraction, (int, float)) or \
                not 0 < forget_fraction < 1:
            raise InvalidInputError(f"forget_fraction must be a number in (0, 1), got {forget_fraction!r}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[perm[: max(1, int(round(forget_fraction * n)))]] = True
    else:
        raise InvalidInputError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    idx = torch.arange(n)
    return Subset(train, idx[mask].tolist()), Subset(train, idx[~mask].tolist())


def cache_dir() -> Path:
    path = Path(os.environ.get("ERASUS_CACHE", Path.home() / ".cache" / "erasus"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_model(key: str, build, train_fn) -> nn.Module:
    """Build the model and load its weights from the cache (safetensors), or train and cache them."""
    model = build()
    path = cache_dir() / f"{key}.safetensors"
    if path.exists():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception as exc:  # a truncated or foreign file: rebuild it rather than fail every later run
            warnings.warn(f"erasus: cached model {path} could not be loaded ({type(exc).__name__}); retraining it",
                          stacklevel=2)
            model = build()
    train_fn(model)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)  # atomic: a run killed mid-write leaves no truncated cache
    return model.eval()


def original_model(train: TensorDataset, seed: int = 0, epochs: int = 30) -> nn.Module:
    return cached_model(f"digits-mlp-original-s{seed}-e{epochs}", lambda: digits_mlp(seed),
                        lambda m: train_classifier(m, train, epochs=epochs, seed=seed))


def retrained_model(retain, key: str, seed: int = 0, epochs: int = 30) -> nn.Module:
    """A model trained from scratch on ``retain`` (the gold standard). ``key`` must name the retain set (the
    scenario and its split), since the weights are cached under it and ``seed``."""
    return cached_model(f"digits-mlp-retrain-{key}-s{seed}-e{epochs}", lambda: digits_mlp(seed + 1000),
                        lambda m: train_classifier(m, retain, epochs=epochs, seed=seed + 1000))
