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


# --- harder scenarios for the coreset study (bench/adaptive_coreset.py): a shared cause and memorised noise

TRIGGER_LABEL = 0  # the backdoor's target class


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    """A copy of (n, 64) digit images with a 2x2 white patch in the bottom-right corner (the backdoor trigger)."""
    x = x.clone().view(-1, 8, 8)
    x[:, 6:, 6:] = 1.0
    return x.view(-1, 64)


def backdoor_scenario(seed: int = 0, fraction: float = 0.05) -> dict:
    """Digits with a backdoor: ``fraction`` of the training images (of classes other than 0) carry the trigger
    and are relabelled 0; the forget set is exactly those. Returns forget / retain / test (clean) /
    ``triggered`` (the test images of classes 1-9 with the trigger, true labels: the attack succeeds when the
    model says 0) and the original (trained on the poisoned set) and retrained (on retain) MLPs, cached."""
    train, test = load_digits_data(seed)
    x, y = (t.clone() for t in train.tensors)
    candidates = (y != TRIGGER_LABEL).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    poisoned = candidates[order[: max(1, int(round(fraction * len(y))))]].sort().values
    x[poisoned] = add_trigger(x[poisoned])
    y[poisoned] = TRIGGER_LABEL
    data = TensorDataset(x, y)
    rest = sorted(set(range(len(y))) - set(poisoned.tolist()))
    forget, retain = Subset(data, poisoned.tolist()), Subset(data, rest)
    tx, ty = test.tensors
    keep = ty != TRIGGER_LABEL
    triggered = TensorDataset(add_trigger(tx[keep]), ty[keep])
    key = f"backdoor{fraction}-split{seed}"
    return {"forget": forget, "retain": retain, "test": test, "triggered": triggered,
            "original": cached_model(f"digits-mlp-{key}-s{seed}", lambda: digits_mlp(seed),
                                     lambda m: train_classifier(m, data, epochs=30, seed=seed)),
            "retrained": retrained_model(retain, key, seed)}


def attack_success_rate(model: nn.Module, triggered) -> float:
    """The fraction of triggered images (true class not 0) that the model classifies as the trigger's label."""
    from erasus.metrics.accuracy import predict_logits

    logits, _ = predict_logits(model, triggered)
    return float((logits.argmax(dim=1) == TRIGGER_LABEL).float().mean())


def memorising_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def mislabel_scenario(seed: int = 0, fraction: float = 0.05, epochs: int = 100) -> dict:
    """Digits with ``fraction`` of the training labels flipped to another class, and a wider MLP trained long
    enough to memorise them (~100% train accuracy): the idiosyncratic regime, where each forget sample may
    have to be touched. The forget set is the flipped samples; forget / retain / test and the original and
    retrained models (cached)."""
    train, test = load_digits_data(seed)
    x, y = (t.clone() for t in train.tensors)
    g = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(y), generator=g)[: max(1, int(round(fraction * len(y))))].sort().values
    y[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10  # never the true class
    data = TensorDataset(x, y)
    rest = sorted(set(range(len(y))) - set(flipped.tolist()))
    forget, retain = Subset(data, flipped.tolist()), Subset(data, rest)
    key = f"mislabel{fraction}-split{seed}-e{epochs}"
    return {"forget": forget, "retain": retain, "test": test,
            "original": cached_model(f"digits-wide-{key}-s{seed}", lambda: memorising_mlp(seed),
                                     lambda m: train_classifier(m, data, epochs=epochs, seed=seed)),
            "retrained": cached_model(f"digits-wide-retrain-{key}-s{seed}", lambda: memorising_mlp(seed + 1000),
                                      lambda m: train_classifier(m, retain, epochs=epochs, seed=seed + 1000))}
