"""The selector surface: ``select(data, k=None, ratio=None, model=None) -> indices``, and one registry."""
from __future__ import annotations

import abc
import math
import numbers
from typing import Callable, ClassVar

import torch

from erasus import registry
from erasus.errors import InvalidInputError
from erasus.selectors.features import check_feature_source, extract_features

SELECTORS: dict[str, type["Selector"]] = {}


def get_selector(name: str, **params) -> "Selector":
    """Build a registered selector by name, e.g. ``get_selector("kcenter", metric="cosine")``."""
    return registry.build(SELECTORS, "selector", name, params)


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
    """Base class of every selector: ``select(data, k=None, ratio=None, model=None) -> indices``.

    Subclasses register themselves with ``class X(Selector, name="x")``. Parameters go to ``__init__``; the
    shared ones say where features come from: ``embed`` (a function of the batch inputs), ``layer`` (the
    module whose input is the feature; default: the model's last ``nn.Linear``) and ``batch_size``.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        registry.register(SELECTORS, "selector", cls, name)

    def __init__(self, *, embed: Callable[[object], torch.Tensor] | None = None, layer: str | None = None,
                 batch_size: int = 256):
        self.embed = embed
        self.layer = layer
        self.batch_size = batch_size

    @abc.abstractmethod
    def select(self, data, k: int | None = None, ratio: float | None = None, model=None) -> torch.Tensor:
        """The selected indices into ``data``, int64, in selection order. Pass exactly one of ``k``/``ratio``."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None and not k.endswith("_"))
        return f"{type(self).__name__}({params})"


class FeatureSelector(Selector):
    """A selector on feature geometry. ``data`` may be a 2-D feature tensor, or a Dataset / DataLoader (or an
    input tensor) together with a ``model`` or an ``embed`` function. The model's features are the input of its
    last ``nn.Linear`` (a classifier's penultimate layer, a causal LM's final hidden state), or of ``layer``, or
    hidden state number ``hidden_layer`` of a transformers model (0 = embeddings, -1 = last; through a peft
    wrapper too). Token features are pooled over the real tokens (the batch's ``attention_mask``) by
    ``pooling``: ``"mean"`` or ``"last"`` (see :func:`erasus.selectors.extract_features`). Extraction runs the
    model in eval mode under ``torch.no_grad()`` and restores its training mode; the model's weights are not
    changed. Subclasses implement ``_select(features, k)``.
    """

    def __init__(self, *, hidden_layer: int | None = None, pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        check_feature_source(embed=self.embed, layer=self.layer, hidden_layer=hidden_layer, pooling=pooling)
        self.hidden_layer, self.pooling = hidden_layer, pooling

    def select(self, data, k: int | None = None, ratio: float | None = None, model=None) -> torch.Tensor:
        features = extract_features(data, model=model, embed=self.embed, layer=self.layer,
                                    hidden_layer=self.hidden_layer, pooling=self.pooling,
                                    batch_size=self.batch_size)
        return self._select(features, resolve_k(features.shape[0], k, ratio))

    @abc.abstractmethod
    def _select(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """Pick k rows of the (n, d) features."""
