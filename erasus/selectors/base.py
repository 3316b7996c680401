"""The selector surface: ``select(data, k=None, ratio=None, model=None) -> indices``, and one registry."""
from __future__ import annotations

import abc
import math
import numbers
from typing import Callable, ClassVar

import torch

from erasus.errors import InvalidInputError
from erasus.selectors.features import extract_features, sample_count

SELECTORS: dict[str, type["Selector"]] = {}


def get_selector(name: str, **params) -> "Selector":
    """Build a registered selector by name, e.g. ``get_selector("kcenter", metric="cosine")``."""
    if name not in SELECTORS:
        raise InvalidInputError(f"unknown selector {name!r}; registered: {sorted(SELECTORS)}")
    return SELECTORS[name](**params)


def resolve_k(n: int, k, ratio) -> int:
    """Exactly one of ``k`` (a count, 1..n) or ``ratio`` (a fraction in (0, 1], rounded up to >= 1 row)."""
    if (k is None) == (ratio is None):
        raise InvalidInputError("pass exactly one of k (a count) or ratio (a fraction of the data)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise InvalidInputError(f"ratio must be a number in (0, 1], got {ratio!r}")
        return max(1, math.ceil(ratio * n - 1e-9))
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise InvalidInputError(f"k must be an integer with 1 <= k <= n = {n}, got {k!r}")
    return int(k)


class Selector(abc.ABC):
    """Base class. Subclasses register themselves with ``class X(Selector, name="x")`` and implement
    ``_select(features, n, k)``. A selector that needs no features sets ``needs_features = False`` and
    gets ``features=None``.

    ``data`` may be a 2-D feature tensor, or a Dataset / DataLoader (or an input tensor) together with a
    ``model`` (features = the input of the model's last ``nn.Linear``, or of ``layer``) or an ``embed``
    function (features = ``embed(batch_inputs)``). Feature extraction runs the model in eval mode under
    ``torch.no_grad()`` and restores its training mode; the model's weights are not changed.
    """

    name: ClassVar[str]
    needs_features: ClassVar[bool] = True

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is not None:
            if name in SELECTORS:
                raise InvalidInputError(f"selector name {name!r} is already registered to {SELECTORS[name]}")
            cls.name = name
            SELECTORS[name] = cls

    def __init__(self, *, embed: Callable[[object], torch.Tensor] | None = None, layer: str | None = None,
                 batch_size: int = 256):
        self.embed = embed
        self.layer = layer
        self.batch_size = batch_size

    def select(self, data, k: int | None = None, ratio: float | None = None, model=None) -> torch.Tensor:
        """Return the selected indices into ``data`` as an int64 tensor, in selection order."""
        if self.needs_features:
            features = extract_features(data, model=model, embed=self.embed, layer=self.layer,
                                        batch_size=self.batch_size)
            n = features.shape[0]
        else:
            features, n = None, sample_count(data)
        return self._select(features, n, resolve_k(n, k, ratio))

    @abc.abstractmethod
    def _select(self, features: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
        """Pick k of the n samples; ``features`` is (n, d), or None when ``needs_features`` is False."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({params})"
