import pytest
import torch

import erasus.ops
from erasus import errors
from erasus.ops.herding import BACKENDS
from oracles import backends_for, herding_bruteforce
from test_kcenter import case, dtypes_for, ks, shapes_for


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_every_backend_matches_the_reference_and_the_bruteforce_oracle(backend):
    for n, d in shapes_for(backend):
        for dtype in dtypes_for(backend):
            x = case(n, d, dtype, seed=7)
            for k in ks(n):
                ref = erasus.ops.herding(x, k, backend="reference")
                got = erasus.ops.herding(x, k, backend=backend)
                assert got.dtype == torch.int64 and got.shape == (k,)
                assert got.tolist() == ref.tolist(), (backend, n, d, dtype, k)
                assert got.tolist() == herding_bruteforce(x, k), (backend, n, d, dtype, k)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_selection_is_distinct_and_k_equal_n_returns_every_index(backend):
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 2.0], [2.0, 2.0], [5.0, -1.0]])
    got = erasus.ops.herding(x, 5, backend=backend)
    assert sorted(got.tolist()) == [0, 1, 2, 3, 4]
    assert got.tolist() == herding_bruteforce(x, 5)


def test_herding_mean_converges_faster_than_random():
    torch.manual_seed(0)  # fixed data, whatever ran before
    x = case(2000, 16, torch.float32, seed=8) * torch.linspace(0.1, 3, 16)
    idx = erasus.ops.herding(x, 50)
    herd_gap = float((x[idx].mean(0) - x.mean(0)).norm())
    rand_gaps = [float((x[torch.randperm(2000)[:50]].mean(0) - x.mean(0)).norm()) for _ in range(20)]
    assert herd_gap < 0.2 * min(rand_gaps)


@pytest.mark.parametrize(
    "x, k, error, match",
    [
        (torch.empty(0, 3), 1, errors.EmptyInputError, "x has no rows"),
        (torch.randn(4, 3), 0, errors.InvalidInputError, "k must satisfy"),
        (torch.randn(4, 3), 5, errors.InvalidInputError, "k must satisfy"),
        (torch.tensor([[float("nan")], [1.0]]), 1, errors.NonFiniteError, "x holds NaN"),
        (torch.randn(4), 1, errors.ShapeError, "x must be 2-D"),
        (torch.randn(4, 3, 1), 1, errors.ShapeError, "x must be 2-D"),
        (torch.ones(4, 3, dtype=torch.int32), 1, errors.DTypeError, "x must be float32"),
    ],
)
def test_bad_input_gets_a_clear_error(x, k, error, match):
    with pytest.raises(error, match=match):
        erasus.ops.herding(x, k)
