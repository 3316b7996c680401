import numpy as np
import pytest
import torch

import erasus.ops
from erasus import errors
from erasus.ops.kcenter import BACKENDS
from oracles import backends_for, kcenter_bruteforce, kcenter_default_init

# (n, d): odd sizes, n = 1, a single feature, more features than rows.
SHAPES = [(1, 1), (1, 7), (2, 3), (7, 5), (33, 17), (64, 129), (300, 33)]
TRITON_SHAPES = [(1, 1), (2, 3), (7, 5), (33, 17)]  # the interpreter runs program instances one by one
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ks(n):
    return sorted({1, n // 2 + 1, n})


def case(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + n * 31 + d)
    return torch.randn(n, d, generator=g).to(dtype)


def shapes_for(backend):
    return TRITON_SHAPES if backend == "triton" and erasus.ops._backend.interpreted() else SHAPES


def dtypes_for(backend):
    # The Triton interpreter has no bfloat16 (it computes on raw bits); real GPUs do.
    return DTYPES[:2] if backend == "triton" and erasus.ops._backend.interpreted() else DTYPES


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_every_backend_equals_the_bruteforce_oracle(backend):
    # Every dtype from the default first centre (the row nearest the mean, computed here independently);
    # float32 also from an explicit init, the last row.
    for n, d in shapes_for(backend):
        for dtype in dtypes_for(backend):
            x = case(n, d, dtype)
            inits = [None, [n - 1]] if dtype == torch.float32 else [None]
            for init in inits:
                for k in ks(n):
                    got = erasus.ops.kcenter_greedy(x, k, init=init, backend=backend)
                    want, radius = kcenter_bruteforce(x, k, init or kcenter_default_init(x))
                    assert got.indices.dtype == torch.int64 and got.indices.shape == (k,)
                    assert got.indices.tolist() == want, (backend, n, d, dtype, k, init)
                    assert float(got.radius) == pytest.approx(radius, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_multiple_init_centres_open_the_selection(backend):
    x = case(33, 17, torch.float32, seed=2)
    got = erasus.ops.kcenter_greedy(x, 6, init=[5, 0, 20], backend=backend)
    want, radius = kcenter_bruteforce(x, 6, [5, 0, 20])
    assert got.indices.tolist() == want
    assert got.indices[:3].tolist() == [5, 0, 20]
    assert float(got.radius) == pytest.approx(radius, rel=1e-5)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_duplicate_rows_and_k_equal_n_return_every_index(backend):
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 0.0], [3.0, 0.0]])
    got = erasus.ops.kcenter_greedy(x, 5, init=0, backend=backend)
    assert sorted(got.indices.tolist()) == [0, 1, 2, 3, 4]
    assert got.indices.tolist() == [0, 3, 1, 2, 4]  # after the far point, duplicates by lowest index
    assert float(got.radius) == 0.0
    two = erasus.ops.kcenter_greedy(x, 2, init=0, backend=backend)
    assert two.indices.tolist() == [0, 3] and float(two.radius) == 0.0


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_cosine_metric_matches_the_oracle_on_normalised_rows(backend):
    x = case(33, 17, torch.float32, seed=3) + 0.5
    got = erasus.ops.kcenter_greedy(x, 5, metric="cosine", init=0, backend=backend)
    unit = x / x.norm(dim=1, keepdim=True)
    want, radius_l2 = kcenter_bruteforce(unit, 5, [0])
    assert got.indices.tolist() == want
    assert float(got.radius) == pytest.approx(radius_l2**2 / 2, rel=1e-4)  # 1 - cos = ||u - v||^2 / 2
    row_scale = torch.rand(33, 1, generator=torch.Generator().manual_seed(3)) * 10
    scaled = erasus.ops.kcenter_greedy(x * row_scale, 5, metric="cosine", init=0, backend=backend)
    assert scaled.indices.tolist() == want  # cosine ignores row norms


def test_default_init_is_the_row_nearest_the_mean_and_order_free():
    x = case(50, 8, torch.float32, seed=4)
    first = int(torch.argmin(((x - x.mean(0)) ** 2).sum(1)))
    got = erasus.ops.kcenter_greedy(x, 10)
    assert int(got.indices[0]) == first
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    shuffled = erasus.ops.kcenter_greedy(x[perm], 10)
    assert perm[shuffled.indices].tolist() == got.indices.tolist()


def test_greedy_radius_is_within_twice_the_optimum():
    # Gonzalez' 2-approximation, checked against exhaustive search on a small set.
    import itertools

    x = case(12, 2, torch.float32, seed=5).double()
    dist = torch.cdist(x, x)
    best = min(float(dist[:, list(c)].min(1).values.max()) for c in itertools.combinations(range(12), 3))
    got = erasus.ops.kcenter_greedy(x.float(), 3)
    assert best - 1e-6 <= float(got.radius) <= 2 * best + 1e-6


def test_outputs_stay_on_the_input_device_and_input_is_untouched():
    x = case(20, 4, torch.float16)
    before = x.clone()
    got = erasus.ops.kcenter_greedy(x, 3)
    assert got.indices.device == x.device and got.radius.dtype == torch.float64
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_non_contiguous_input_equals_the_oracle(backend):
    x = case(40, 10, torch.float32).t().contiguous().t()  # column-major view
    assert not x.is_contiguous()
    got = erasus.ops.kcenter_greedy(x, 4, backend=backend)
    assert got.indices.tolist() == kcenter_bruteforce(x, 4, kcenter_default_init(x))[0]


@pytest.mark.parametrize(
    "x, k, kwargs, error, match",
    [
        (torch.empty(0, 4), 1, {}, errors.EmptyInputError, "x has no rows"),
        (torch.empty(4, 0), 1, {}, errors.EmptyInputError, "x has no features"),
        (case(5, 3, torch.float32), 0, {}, errors.InvalidInputError, "k must satisfy"),
        (case(5, 3, torch.float32), 6, {}, errors.InvalidInputError, "k must satisfy"),
        (case(5, 3, torch.float32), 2.0, {}, errors.InvalidInputError, "k must be an integer"),
        (case(5, 3, torch.float32), True, {}, errors.InvalidInputError, "k must be an integer"),
        (torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), 1, {}, errors.NonFiniteError, "x holds NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 0.0]]), 1, {}, errors.NonFiniteError, "x holds NaN"),
        (case(5, 1, torch.float32).flatten(), 1, {}, errors.ShapeError, "x must be 2-D"),
        (case(5, 6, torch.float32).reshape(5, 3, 2), 1, {}, errors.ShapeError, "x must be 2-D"),
        (torch.randint(0, 5, (5, 3)), 1, {}, errors.DTypeError, "x must be float32"),
        (case(5, 3, torch.float32).double(), 1, {}, errors.DTypeError, "x must be float32"),
        (np.ones((5, 3), np.float32), 1, {}, errors.InvalidInputError, "x must be a torch.Tensor"),
        (case(5, 3, torch.float32), 2, {"init": 5}, errors.InvalidInputError, "init holds indices outside"),
        (case(5, 3, torch.float32), 2, {"init": [1, 1]}, errors.InvalidInputError, "init holds repeated"),
        (case(5, 3, torch.float32), 2, {"init": [0, 1, 2]}, errors.InvalidInputError, "init holds 3 indices but k = 2"),
        (case(5, 3, torch.float32), 2, {"init": [0.5]}, errors.DTypeError, "init must hold integers"),
        (case(5, 3, torch.float32), 2, {"init": []}, errors.EmptyInputError, "init is empty"),
        (case(5, 3, torch.float32), 2, {"metric": "l1"}, errors.InvalidInputError, "metric must be one of"),
        (torch.zeros(5, 3), 2, {"metric": "cosine"}, errors.InvalidInputError, "all-zero row"),
        (case(5, 3, torch.float32), 2, {"backend": "cuda"}, errors.InvalidInputError, "backend must be one of"),
    ],
)
def test_bad_input_gets_a_clear_error(x, k, kwargs, error, match):
    with pytest.raises(errors.ErasusError, match=match) as raised:
        erasus.ops.kcenter_greedy(x, k, **kwargs)
    assert type(raised.value) is error


@pytest.mark.parametrize("data", ["clusters", "gaussian", "duplicates"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triangle_pruning_keeps_the_selection_exactly(data, dtype):
    """The C++ op skips rows the triangle inequality rules out; the indices and the radius are those of the same
    kernel reading every row (and of the brute-force oracle), on clustered data (where most rows are skipped),
    Gaussian data (where none are), duplicate-heavy rows and 16-bit storage."""
    from erasus.ops import _cpp

    g = torch.Generator().manual_seed(7)
    n, d, k = 1500, 24, 60
    if data == "clusters":
        x = (torch.randn(12, d, generator=g) * 6)[torch.randint(0, 12, (n,), generator=g)] + \
            torch.randn(n, d, generator=g)
    elif data == "gaussian":
        x = torch.randn(n, d, generator=g)
    else:
        x = torch.randn(40, d, generator=g)[torch.randint(0, 40, (n,), generator=g)]
    x = x.to(dtype).contiguous()
    results = []
    for prune in (True, False):
        out, min_dist = torch.empty(k, dtype=torch.int64), torch.empty(n)
        r2 = _cpp.call("kcenter_greedy", _cpp.as_numpy(x), _cpp.elem_name(dtype), torch.tensor([3]).numpy(),
                       out.numpy(), min_dist.numpy(), 1.0, prune)
        results.append((out, r2, min_dist))
    (pruned, r_pruned, _), (plain, r_plain, _) = results
    assert torch.equal(pruned, plain) and r_pruned == r_plain
    if data != "duplicates":  # past the 40 distinct rows every distance is 0: the oracle breaks those ties its way
        want, _ = kcenter_bruteforce(x.float(), k, [3])
        assert pruned.tolist() == list(want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 2.0**30, 2.0**-30])
def test_default_init_is_the_row_nearest_the_mean_in_small_chunks(dtype, magnitude, monkeypatch):
    """The default first centre, in C++ (the CPU path) and in torch row chunks through one small buffer (the
    path without the extension, and CUDA's; never a widened copy of x): with chunks of a few rows it is still
    the row nearest the mean, for 16-bit rows and for rows far outside [2**-20, 2**20] (rescaled by a power of
    two); a NaN anywhere is still refused."""
    from erasus.ops import kcenter as kc

    if dtype == torch.float16 and magnitude != 1.0:
        pytest.skip("float16 holds neither 2**30 nor 2**-30 times these rows")
    monkeypatch.setattr(kc, "_INIT_CHUNK_BYTES", 3 * 4 * 24)  # 3 rows per chunk
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 24, generator=g) * 3
    x[57] = x.mean(dim=0)  # nearest the mean by far
    x = (x * magnitude).to(dtype)
    assert erasus.ops.kcenter_greedy(x, 1, backend="reference").indices.tolist() == [57]
    exponent = kc.coreset_exponent(kc.max_abs(x))
    assert kc._default_init_torch(x, 2.0 ** -exponent).tolist() == [57]
    assert kc._default_init(x, 2.0 ** -exponent).tolist() == [57]
    bad = x.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(errors.NonFiniteError, match="NaN or infinite"):
        erasus.ops.kcenter_greedy(bad, 1)
