"""Selectors on feature geometry: random, k-center, herding, k-means."""
from __future__ import annotations

import torch

from erasus import ops
from erasus.selectors.base import FeatureSelector, Selector, resolve_k
from erasus.selectors.features import sample_count


class RandomSelector(Selector, name="random"):
    """Uniform sampling without replacement; ``seed`` makes it repeatable. Needs no model or features.

    Example:
        >>> import torch
        >>> from erasus.selectors import RandomSelector
        >>> RandomSelector(seed=0).select(torch.randn(100, 8), ratio=0.1).shape
        torch.Size([10])
    """

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def select(self, data, k=None, ratio=None, model=None):
        n = sample_count(data)
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: resolve_k(n, k, ratio)]


class KCenterSelector(FeatureSelector, name="kcenter"):
    """Greedy k-center (Sener & Savarese 2018) on the features: covers the data with k balls of least radius.

    ``init``: ``None`` (the row nearest the mean), ``"random"`` (a row drawn with ``seed``), or explicit
    indices. See :func:`erasus.ops.kcenter_greedy`.

    Example:
        >>> import torch
        >>> from erasus.selectors import KCenterSelector
        >>> KCenterSelector().select(torch.randn(100, 8), k=5).shape
        torch.Size([5])
    """

    def __init__(self, metric: str = "l2", init=None, seed: int = 0, backend: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.metric, self.init, self.seed, self.backend = metric, init, seed, backend

    def _select(self, features, k):
        init = self.init
        if isinstance(init, str) and init == "random":
            init = int(torch.randint(features.shape[0], (1,), generator=torch.Generator().manual_seed(self.seed)))
        return ops.kcenter_greedy(features, k, metric=self.metric, init=init, backend=self.backend).indices


class HerdingSelector(FeatureSelector, name="herding"):
    """Herding (Welling 2009): rows whose running mean tracks the feature mean. See :func:`erasus.ops.herding`.

    Example:
        >>> import torch
        >>> from erasus.selectors import HerdingSelector
        >>> HerdingSelector().select(torch.randn(100, 8), k=5).shape
        torch.Size([5])
    """

    def __init__(self, backend: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backend = backend

    def _select(self, features, k):
        return ops.herding(features, k, backend=self.backend)


class KMeansSelector(FeatureSelector, name="kmeans"):
    """The row nearest each of k k-means centroids. See :func:`erasus.ops.kmeans_coreset`.

    Example:
        >>> import torch
        >>> from erasus.selectors import KMeansSelector
        >>> KMeansSelector(seed=1).select(torch.randn(100, 8), k=5).shape
        torch.Size([5])
    """

    def __init__(self, niter: int = 20, seed: int = 0, init: str = "k-means++", backend: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.niter, self.seed, self.init, self.backend = niter, seed, init, backend

    def _select(self, features, k):
        return ops.kmeans_coreset(features, k, niter=self.niter, seed=self.seed, init=self.init,
                                  backend=self.backend)
