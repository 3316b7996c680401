"""k-means coresets: cluster, then keep the real row nearest each centroid."""
from __future__ import annotations

import numbers
from typing import Callable

import torch

from erasus.errors import InvalidInputError
from erasus.ops import _backend
from erasus.ops._magnitude import coreset_exponent
from erasus.ops._validate import check_k, check_matrix, max_abs


# A search function: (queries (m, d) float32 CPU/device tensor, nn) -> (squared distances, indices), each (m, nn)
Search = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


INITS = ("k-means++", "random")


def kmeans_coreset(x: torch.Tensor, k: int, *, niter: int = 20, seed: int = 0, init: str = "k-means++",
                   backend: str | None = None) -> torch.Tensor:
    """Cluster ``x`` into ``k`` groups with Lloyd's k-means and return, for each centroid, the nearest row.

    Both backends start from the same ``k`` distinct rows, drawn with ``seed`` by k-means++ seeding (Arthur &
    Vassilvitskii 2007; k passes over ``x``) or uniformly (``init="random"``, FAISS' own default), and run
    ``niter`` Lloyd iterations. ``faiss`` clusters with ``faiss.Kmeans`` (which sub-samples to 256 rows per centroid when
    n is larger) and searches with ``faiss.IndexFlatL2``; ``reference`` is plain torch and runs on any device.
    Each centroid gets a distinct row: centroids are served nearest-first, and a centroid whose nearest rows
    are taken gets the nearest free one.

    Args:
        x: (n, d) float32, float16 or bfloat16 features (FAISS computes in float32).
        k: number of rows, 1 <= k <= n.
        niter: Lloyd iterations (>= 1).
        seed: a non-negative integer; seeds the initial centroids, so equal seeds give equal coresets.
        init: ``"k-means++"`` (robust; costs k passes over ``x``) or ``"random"`` (free; may merge clusters).
        backend: ``"faiss"`` (default on CPU when installed) or ``"reference"``.

    Returns:
        int64 (k,) distinct row indices on ``x.device``, ordered by centroid.

    Example:
        >>> import torch, erasus.ops
        >>> x = torch.cat([torch.zeros(5, 2), torch.full((5, 2), 9.0)]) + torch.arange(10.0)[:, None] / 100
        >>> sorted(i // 5 for i in erasus.ops.kmeans_coreset(x, 2, backend="reference").tolist())
        [0, 1]
    """
    x = check_matrix(x, "x")
    n, d = x.shape
    k = check_k(k, n)
    if isinstance(niter, bool) or not isinstance(niter, numbers.Integral) or niter < 1:
        raise InvalidInputError(f"niter must be a positive integer, got {niter!r}")
    if init not in INITS:
        raise InvalidInputError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    implementation = KMEANS.select(x.device, backend)
    # Rescaled by a power of two (exact) when max|x| is far from 1, and centred (k-means is shift-invariant):
    # squared distances then neither overflow nor cancel, and x and c * x give the same coreset.
    xf = x.float() * 2.0 ** -coreset_exponent(max_abs(x))
    xf -= xf.mean(dim=0)
    generator = torch.Generator().manual_seed(int(seed))
    if init == "random":
        init = torch.randperm(n, generator=generator)[:k]
    else:
        init = kmeans_plus_plus(xf, k, generator)
    centroids, search = implementation(xf, init, niter, int(seed))
    return nearest_distinct_rows(centroids, n, search).to(x.device)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next row is drawn with probability proportional to its squared distance to
    the nearest row drawn so far (O(n) state, one pass per draw). Returns k distinct row indices (CPU)."""
    n = x.shape[0]
    chosen = torch.empty(k, dtype=torch.int64)
    chosen[0] = torch.randint(n, (1,), generator=generator)
    sq_norms = (x * x).sum(dim=1)
    min_dist = torch.full((n,), float("inf"), device=x.device)
    for i in range(1, k):
        c = chosen[i - 1]
        dist = torch.addmv(sq_norms + sq_norms[c], x, x[c], alpha=-2.0).clamp_(min=0.0)
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[chosen[:i].to(x.device)] = 0.0
        weights = min_dist.double().cpu()
        if float(weights.sum()) <= 0.0:  # every remaining row duplicates a chosen one: draw uniformly
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen[:i]] = 0.0
        chosen[i] = torch.multinomial(weights, 1, generator=generator)
    return chosen


def lloyd_reference(x: torch.Tensor, centroids: torch.Tensor, niter: int) -> torch.Tensor:
    """Plain-torch Lloyd iterations; an empty cluster keeps its previous centroid."""
    k = centroids.shape[0]
    centroids = centroids.clone()
    for _ in range(niter):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    return centroids


def nearest_distinct_rows(centroids: torch.Tensor, n: int, search: Search, candidates: int = 16) -> torch.Tensor:
    """For each centroid the nearest row not already given to another centroid (nearest pairs served first)."""
    k = centroids.shape[0]
    nn = min(n, candidates)
    dist, idx = search(centroids, nn)
    dist, idx = dist.cpu(), idx.cpu()
    taken = torch.zeros(n, dtype=torch.bool)
    out = torch.full((k,), -1, dtype=torch.int64)
    for c in torch.argsort(dist[:, 0], stable=True).tolist():
        for j in idx[c].tolist():
            if j >= 0 and not taken[j]:
                out[c] = j
                taken[j] = True
                break
    for c in (out < 0).nonzero().flatten().tolist():  # all its candidates were taken: widen to every row
        dist_all, idx_all = search(centroids[c : c + 1], n)
        for j in idx_all[0].tolist():
            if j >= 0 and not taken[j]:
                out[c] = j
                taken[j] = True
                break
    return out


def _kmeans_reference(x: torch.Tensor, init: torch.Tensor, niter: int, seed: int):
    """(centroids, search): Lloyd in torch; ``search(queries, nn)`` -> (squared distances, row indices)."""
    centroids = lloyd_reference(x, x[init.to(x.device)], niter)

    def search(queries, nn):
        dist = torch.cdist(queries, x).pow_(2)
        return torch.topk(dist, nn, dim=1, largest=False)

    return centroids, search


def _kmeans_faiss(x: torch.Tensor, init: torch.Tensor, niter: int, seed: int):
    """(centroids, search) by FAISS: its k-means from the same seeds, and an exact L2 index over the rows."""
    import faiss

    data = x.cpu().numpy()
    km = faiss.Kmeans(x.shape[1], init.numel(), niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
    km.train(data, init_centroids=data[init.numpy()])
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(data)

    def search(queries, nn):
        dist, idx = index.search(queries.cpu().numpy(), nn)
        return torch.from_numpy(dist), torch.from_numpy(idx)

    return torch.from_numpy(km.centroids), search


#: (centred rows, init indices, niter, seed) -> (centroids, nearest-row search)
KMEANS = _backend.OpTable("kmeans_coreset", {"reference": _kmeans_reference, "faiss": _kmeans_faiss})
BACKENDS = KMEANS.backends
