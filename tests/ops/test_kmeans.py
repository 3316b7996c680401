import pytest
import torch

import erasus.ops
from erasus import errors
from erasus.ops.kmeans import BACKENDS, lloyd_reference, nearest_distinct_rows
from oracles import backends_for


def blobs(k, per, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 20
    x = centres.repeat_interleave(per, 0) + torch.randn(k * per, d, generator=g)
    return x.to(dtype), torch.arange(k).repeat_interleave(per)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_row_per_blob_and_backends_agree(backend, dtype):
    x, label = blobs(6, 25, 5, dtype=dtype)
    got = erasus.ops.kmeans_coreset(x, 6, backend=backend, seed=3)
    assert sorted(label[got].tolist()) == list(range(6))
    ref = erasus.ops.kmeans_coreset(x, 6, backend="reference", seed=3)
    assert sorted(got.tolist()) == sorted(ref.tolist())


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_rows_are_the_ones_nearest_the_centroids(backend):
    x, _ = blobs(4, 30, 3, seed=1)
    got = erasus.ops.kmeans_coreset(x, 4, backend=backend)
    xd = x.double()
    for i in got.tolist():
        blob = (torch.cdist(xd, xd[i : i + 1]).squeeze(1) < 10).nonzero().flatten()
        centroid = xd[blob].mean(0)
        assert i == int(blob[torch.cdist(xd[blob], centroid[None]).squeeze(1).argmin()])


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_k_equal_n_and_n_equal_one_return_every_row(backend):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen)
    assert sorted(erasus.ops.kmeans_coreset(x, 9, backend=backend).tolist()) == list(range(9))
    assert erasus.ops.kmeans_coreset(torch.randn(1, 3, generator=gen), 1, backend=backend).tolist() == [0]


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_seed_makes_it_repeatable(init):
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(4))
    a = erasus.ops.kmeans_coreset(x, 10, seed=5, init=init)
    assert torch.equal(a, erasus.ops.kmeans_coreset(x, 10, seed=5, init=init))
    assert a.unique().numel() == 10


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fewer_distinct_rows_than_k_still_gives_k_distinct_rows(backend, seed):
    # Three values, each on 3 rows, k = 5: k-means++ seeding picks one row of each value first (a new value
    # always has positive weight), then every remaining row duplicates a chosen one, all weights are 0, and it
    # draws among the unchosen rows uniformly. Each value keeps at least one centroid, each centroid its own row.
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-3.0, 1.0]]).repeat(3, 1)
    got = erasus.ops.kmeans_coreset(x, 5, seed=seed, backend=backend)
    assert got.unique().numel() == 5 and int(got.min()) >= 0 and int(got.max()) < 9
    assert set(x[got, 0].tolist()) == {0.0, 5.0, -3.0}
    assert torch.equal(got, erasus.ops.kmeans_coreset(x, 5, seed=seed, backend=backend))


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_all_rows_identical(backend):
    x = torch.full((5, 3), 2.5)
    for k in (1, 3, 5):
        got = erasus.ops.kmeans_coreset(x, k, seed=7, backend=backend)
        assert got.shape == (k,) and got.unique().numel() == k and int(got.max()) < 5


def test_centroids_sharing_a_nearest_row_get_distinct_rows():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    centroids = torch.tensor([[0.1], [0.2], [0.3]])

    def search(q, nn):
        return torch.topk(torch.cdist(q, x) ** 2, nn, dim=1, largest=False)

    assert nearest_distinct_rows(centroids, 4, search, candidates=1).tolist() == [0, 1, 2]


def test_lloyd_reference_keeps_an_empty_cluster_in_place():
    x = torch.tensor([[0.0], [1.0]])
    out = lloyd_reference(x, torch.tensor([[0.5], [100.0]]), 3)
    assert out.tolist() == [[0.5], [100.0]]


@pytest.mark.parametrize(
    "x, k, kwargs, error, match",
    [
        (torch.empty(0, 3), 1, {}, errors.EmptyInputError, "x has no rows"),
        (torch.randn(4, 3), 5, {}, errors.InvalidInputError, "k must satisfy"),
        (torch.randn(4, 3), 2, {"niter": 0}, errors.InvalidInputError, "niter must be"),
        (torch.tensor([[float("inf")], [1.0]]), 1, {}, errors.NonFiniteError, "x holds NaN"),
        (torch.randn(4, 3), 2, {"init": "kmeans++"}, errors.InvalidInputError, "init must be one of"),
        (torch.randn(4, 3), 2, {"backend": "cpp"}, errors.InvalidInputError, "backend must be one of"),
    ],
)
def test_bad_input_gets_a_clear_error(x, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        erasus.ops.kmeans_coreset(x, k, **kwargs)
