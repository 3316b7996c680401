"""Property-based tests over the erasus.ops boundary (issue 9).

Every generated input -- shapes (n = 1, k = n, d = 1, odd sizes), dtypes, layouts (transposed, sliced,
stride-0 expanded), magnitudes (scalings from 1e-30 to 1e30), NaN/inf, bad k -- must either give the answer of
a float64 oracle written from the definition, or raise an ErasusError: never a raw torch / numpy / pybind11
exception, never a wrong answer. The oracles allow for float32 rounding (near-ties may go either way) but not
for overflow or underflow: the ops promise exactness over the whole float32 range.

Bounded for CI: ``ERASUS_PROPERTY_EXAMPLES`` (default 50) examples per test and backend; raise it to search
harder (the Triton interpreter runs a quarter of that, on tiny shapes).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import erasus.ops
from erasus import errors
from erasus.ops._backend import interpreted
from oracles import backends_for

# The Triton interpreter computes with numpy, which warns when a float32 fast path overflows; the op then
# recomputes in float64 (that fallback is what these tests check).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
EXAMPLES = int(os.environ.get("ERASUS_PROPERTY_EXAMPLES", "50"))
FLT_MAX = torch.finfo(torch.float32).max
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
CORESET_BACKENDS = backends_for(("reference", "cpp", "triton"))


def bounded(examples: int):
    return settings(max_examples=max(1, examples), deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def slow(backend: str) -> bool:
    return backend == "triton" and interpreted()


def examples_for(backend: str) -> int:
    return EXAMPLES // 4 if slow(backend) else EXAMPLES


def dtypes_for(backend: str) -> list:
    return FLOATS[:2] if slow(backend) else FLOATS  # the Triton interpreter has no bfloat16


def ok_or_erasus_error(fn):
    """fn()'s result, or None when it raised an ErasusError; any other exception fails the test."""
    try:
        return fn()
    except errors.ErasusError:
        return None
    except Exception as exc:  # noqa: BLE001 -- the property: nothing but ErasusError escapes
        pytest.fail(f"raw {type(exc).__module__}.{type(exc).__name__} escaped: {exc}")


def expect_erasus_error(fn, kind=errors.ErasusError):
    try:
        fn()
    except kind as exc:
        return exc
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"expected {kind.__name__}, got {type(exc).__module__}.{type(exc).__name__}: {exc}")
    pytest.fail(f"expected {kind.__name__}, nothing was raised")


# ---------------------------------------------------------------------------------------------- inputs


@st.composite
def scalings(draw):
    """A factor c: a power of two, or +-10**u with u in [-30, 30]."""
    if draw(st.booleans()):
        return 2.0 ** draw(st.integers(-100, 100))
    return draw(st.sampled_from([1.0, -1.0])) * 10.0 ** draw(st.floats(-30, 30))


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if how == "transposed":
        return x.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def base_values(kind: str, shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "integers":  # many exact ties
        return torch.randint(-2, 3, shape, generator=gen).double()
    if kind == "offset":  # far from the origin
        return 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64) + 1000.0
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def scaled(values: torch.Tensor, c: float, dtype: torch.dtype) -> torch.Tensor:
    """c * values rounded to dtype (float64 product first: the float32 range ends where the dtype's does)."""
    return (values * c).to(dtype)


@st.composite
def feature_matrices(draw, dtypes, max_n=12, max_d=6):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(["normal", "integers", "offset"]))
    values = base_values(kind, (n, d), draw(st.integers(0, 2**16)))
    how = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if how == "expanded":  # stride 0: every row the same
        values = values[:1].expand(n, d)
    x = scaled(values, draw(scalings()), dtype)
    return layout(x, how) if how != "expanded" else x[:1].expand(n, d)


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.double()).all())


# ----------------------------------------------------------------------------------------- coresets


def kcenter_oracle_check(x: torch.Tensor, k: int, metric: str, got) -> None:
    """got must be a farthest-first traversal of x (float64), each step within rounding of the best."""
    xd = x.double()
    n = xd.shape[0]
    idx = got.indices.tolist()
    assert got.indices.dtype == torch.int64 and len(idx) == k and len(set(idx)) == k
    assert all(0 <= i < n for i in idx)
    if metric == "cosine":
        xd = xd / torch.linalg.vector_norm(xd, dim=1, keepdim=True)
    centred = xd - xd.mean(dim=0)
    unit = float((centred * centred).sum(1).max())  # distances are measured against this scale
    tol = 1e-4 * unit + 1e-300
    if metric == "cosine":  # the unit rows are rounded to x's dtype before the loop
        eps = torch.finfo(x.dtype).eps
        tol += 8 * eps * math.sqrt(xd.shape[1] * unit) + 4 * xd.shape[1] * eps**2
    sq = (centred * centred).sum(1)
    assert float(sq[idx[0]]) <= float(sq.min()) + tol, "the first centre is not the row nearest the mean"
    nearest = ((xd - xd[idx[0]]) ** 2).sum(1)
    for step in range(1, k):
        free = nearest.clone()
        free[idx[:step]] = -1.0
        assert float(free[idx[step]]) >= float(free.max()) - tol, f"step {step} did not take the farthest row"
        nearest = torch.minimum(nearest, ((xd - xd[idx[step]]) ** 2).sum(1))
    nearest[idx] = 0.0
    radius2 = float(nearest.max())
    got_radius2 = float(got.radius) ** 2 if metric == "l2" else 2.0 * float(got.radius)
    assert got.radius.dtype == torch.float64 and math.isfinite(float(got.radius))
    assert abs(got_radius2 - radius2) <= 4 * tol + 1e-6 * radius2, (got_radius2, radius2)


def herding_oracle_check(x: torch.Tensor, k: int, got: torch.Tensor) -> None:
    xd = x.double()
    n, d = xd.shape
    idx = got.tolist()
    assert got.dtype == torch.int64 and len(idx) == k and len(set(idx)) == k and all(0 <= i < n for i in idx)
    mean = xd.mean(dim=0)
    spread = float(((xd - mean) ** 2).sum(1).max()) + float(xd.abs().max()) ** 2
    tol = 1e-5 * (k + 1) ** 2 * d * spread + 1e-300
    chosen_sum = torch.zeros(d, dtype=torch.float64)
    for i, j in enumerate(idx):
        dist = ((xd - ((i + 1) * mean - chosen_sum)) ** 2).sum(1)
        dist[idx[:i]] = math.inf
        assert float(dist[j]) <= float(dist.min()) + tol, f"step {i} did not take the row nearest the target"
        chosen_sum += xd[j]


@pytest.mark.parametrize("backend", CORESET_BACKENDS)
def test_kcenter_matches_the_farthest_first_oracle_or_refuses(backend):
    @bounded(examples_for(backend))
    @given(x=feature_matrices(dtypes_for(backend), max_n=6 if slow(backend) else 12), data=st.data(),
           metric=st.sampled_from(["l2", "cosine"]))
    def run(x, data, metric):
        k = data.draw(st.integers(1, x.shape[0]))
        got = ok_or_erasus_error(lambda: erasus.ops.kcenter_greedy(x, k, metric=metric, backend=backend))
        if got is None:  # refused: only for a non-finite input or a zero row under the cosine metric
            zero_row = metric == "cosine" and bool((x.double().abs().sum(1) == 0).any())
            assert not finite(x) or zero_row
            return
        assert finite(x)
        kcenter_oracle_check(x, k, metric, got)

    run()


@pytest.mark.parametrize("backend", CORESET_BACKENDS)
def test_herding_matches_its_definition_or_refuses(backend):
    @bounded(examples_for(backend))
    @given(x=feature_matrices(dtypes_for(backend), max_n=6 if slow(backend) else 12), data=st.data())
    def run(x, data):
        k = data.draw(st.integers(1, x.shape[0]))
        got = ok_or_erasus_error(lambda: erasus.ops.herding(x, k, backend=backend))
        if got is None:
            assert not finite(x)
            return
        herding_oracle_check(x, k, got)

    run()


@pytest.mark.parametrize("backend", CORESET_BACKENDS)
def test_coresets_do_not_depend_on_a_power_of_two_scale(backend):
    """x and 2**e x hold the same bits but for the exponent: the selections must be identical and the radius
    must scale by exactly 2**e, anywhere in the float32 range."""
    @bounded(examples_for(backend))
    @given(x=feature_matrices([torch.float32]), e=st.integers(-120, 120), data=st.data())
    def run(x, e, data):
        assume(finite(x) and float(x.abs().max()) > 0)
        y = x * 2.0**e
        exact = finite(y) and bool((y[x != 0] != 0).all())
        tiny = x[x != 0].abs().min()
        assume(exact and float(tiny) * 2.0**e >= 2.0**-126 and float(tiny) >= 2.0**-126)  # no subnormals
        k = data.draw(st.integers(1, x.shape[0]))
        a = erasus.ops.kcenter_greedy(x, k, backend=backend)
        b = erasus.ops.kcenter_greedy(y, k, backend=backend)
        assert a.indices.tolist() == b.indices.tolist()
        assert float(b.radius) == float(a.radius) * 2.0**e
        assert erasus.ops.herding(x, k, backend=backend).tolist() == erasus.ops.herding(y, k, backend=backend).tolist()

    run()


@pytest.mark.parametrize("backend", backends_for(("reference", "faiss")))
def test_kmeans_coreset_finds_separated_clusters_at_any_scale(backend):
    """k well-separated clusters: the coreset must hold one row of each, whatever the scale; and the same seed
    gives the same coreset for x and 2**e x."""
    @bounded(EXAMPLES)
    @given(k=st.integers(1, 5), per=st.integers(1, 4), d=st.integers(1, 4), seed=st.integers(0, 2**16),
           c=scalings(), dtype=st.sampled_from(FLOATS), e=st.integers(-60, 60))
    def run(k, per, d, seed, c, dtype, e):
        gen = torch.Generator().manual_seed(seed)
        centres = torch.arange(k, dtype=torch.float64)[:, None] * torch.ones(d, dtype=torch.float64)
        centres = centres + 0.01 * torch.randn(k, d, generator=gen, dtype=torch.float64)
        labels = torch.arange(k).repeat_interleave(per)
        values = centres[labels] + 1e-4 * torch.randn(k * per, d, generator=gen, dtype=torch.float64)
        x = scaled(values, c, dtype)
        got = ok_or_erasus_error(lambda: erasus.ops.kmeans_coreset(x, k, seed=seed, backend=backend))
        if got is None:
            assert not finite(x)
            return
        assert got.dtype == torch.int64 and got.shape == (k,) and len(set(got.tolist())) == k
        xd = x.double()
        spread = max(float((xd[labels == j] - xd[labels == j].mean(0)).abs().max()) for j in range(k))
        gap = min((float(torch.linalg.vector_norm(xd[labels == i].mean(0) - xd[labels == j].mean(0)))
                   for i in range(k) for j in range(i)), default=math.inf)
        if gap > 1000 * spread:  # the clusters survived rounding to the dtype: one row of each
            assert sorted(labels[got].tolist()) == list(range(k))
        y = x * 2.0**e
        normal = torch.finfo(x.dtype).tiny  # below it the dtype itself rounds: the scaling would not be exact
        nonzero = x[x != 0].double().abs()
        if finite(y) and (nonzero.numel() == 0 or float(nonzero.min()) * min(1.0, 2.0**e) >= normal):
            assert erasus.ops.kmeans_coreset(y, k, seed=seed, backend=backend).tolist() == got.tolist()

    run()


# -------------------------------------------------------------------------------- gradient kernels


@st.composite
def layer_pairs(draw, dtypes, max_batch=4, max_steps=4, max_features=6, two_d=True):
    """(a, g): (B, T, d) inputs and (B, T, p) output gradients, each scaled by its own factor, some samples
    by another, in a random layout; sometimes 2-D (B, features)."""
    batch = draw(st.integers(0, max_batch))
    steps = draw(st.integers(1, max_steps))
    d, p = draw(st.integers(1, max_features)), draw(st.integers(1, max_features))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, steps, d, generator=gen, dtype=torch.float64) * draw(scalings())
    g = torch.randn(batch, steps, p, generator=gen, dtype=torch.float64) * draw(scalings())
    if batch and draw(st.booleans()):  # samples of very different magnitudes in one batch
        a[0] *= draw(scalings())
        g[-1] *= draw(scalings())
    a, g = a.to(dtype), g.to(dtype)
    how = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    if how == "transposed":
        a, g = a.transpose(1, 2).contiguous().transpose(1, 2), g.transpose(1, 2).contiguous().transpose(1, 2)
    elif how == "expanded" and batch:
        a, g = a[:1].expand_as(a), g[:1].expand_as(g)
    if two_d and steps == 1 and draw(st.booleans()):
        a, g = a[:, 0], g[:, 0]
    return a, g


def as3d(t: torch.Tensor) -> torch.Tensor:
    return (t[:, None, :] if t.dim() == 2 else t).double()


def norms_oracle(a, g):
    """Float64 per-sample squared norms and their tolerances (float32 rounding of the terms, plus the
    subnormal floor of a float32 result)."""
    a3, g3 = as3d(a), as3d(g)
    weight = torch.stack([(g3[i].T @ a3[i]).square().sum() for i in range(a3.shape[0])]) if a3.shape[0] else \
        torch.zeros(0, dtype=torch.float64)
    bias = g3.sum(1).square().sum(1)
    scale_w = (torch.linalg.vector_norm(a3, dim=2) * torch.linalg.vector_norm(g3, dim=2)).sum(1).square()
    scale_b = torch.linalg.vector_norm(g3, dim=2).sum(1).square()
    return weight, bias, 1e-5 * scale_w + 1e-37, 1e-5 * scale_b + 1e-37


def assert_within(got: torch.Tensor, want: torch.Tensor, atol: torch.Tensor, what: str):
    got = got.double()
    assert got.shape == want.shape and bool(torch.isfinite(got).all()), what
    bad = (got - want).abs() > atol + 1e-5 * want.abs()
    assert not bool(bad.any()), f"{what}: got {got[bad].tolist()}, want {want[bad].tolist()}"


def overflow_expected(*values: torch.Tensor):
    """True / False when the float32 result must / must not overflow; None near the boundary."""
    largest = max((float(v.abs().max()) for v in values if v.numel()), default=0.0)
    if largest > FLT_MAX * (1 + 1e-4):
        return True
    if largest < FLT_MAX * (1 - 1e-4):
        return False
    return None


@pytest.mark.parametrize("backend", backends_for(("reference", "cpp", "triton")))
def test_per_sample_grad_norms_match_the_float64_loop_or_report_overflow(backend):
    @bounded(examples_for(backend))
    @given(pair=layer_pairs(dtypes_for(backend), max_batch=2 if slow(backend) else 4),
           path=st.sampled_from(["auto", "outer", "ghost", "materialize"]))
    def run(pair, path):
        a, g = pair
        steps = 1 if a.dim() == 2 else a.shape[1]
        if path == "outer" and steps != 1:
            expect_erasus_error(lambda: erasus.ops.per_sample_grad_norms(a, g, path=path, backend=backend),
                                errors.InvalidInputError)
            return
        weight, bias, atol_w, atol_b = norms_oracle(a, g)
        overflow = overflow_expected(weight, bias)
        got = ok_or_erasus_error(lambda: erasus.ops.per_sample_grad_norms(a, g, path=path, backend=backend))
        if got is None:
            assert overflow is not False, "refused a result that fits in float32"
            expect_erasus_error(lambda: erasus.ops.per_sample_grad_norms(a, g, path=path, backend=backend),
                                errors.NonFiniteError)
            return
        assert overflow is not True, "returned a result that does not fit in float32"
        assert got.weight.dtype == torch.float32 and got.weight.device == a.device
        assert_within(got.weight, weight, atol_w, "weight")
        assert_within(got.bias, bias, atol_b, "bias")

    run()


def fisher_oracle(a, g):
    a3, g3 = as3d(a), as3d(g)
    batch, _, d = a3.shape
    p = g3.shape[2]
    weight = sum(((g3[i].T @ a3[i]).square() for i in range(batch)), torch.zeros(p, d, dtype=torch.float64))
    bias = g3.sum(1).square().sum(0)
    scale = sum(((g3[i].abs().T @ a3[i].abs()).square() for i in range(batch)), torch.zeros(p, d, dtype=torch.float64))
    # A T = 1 float32 kernel squares a and g separately; within its range (2**+-30) a lost square costs
    # at most 2**-126 max(|a|, |g|)^2 per sample.
    largest = max(float(a3.abs().max()) if a3.numel() else 0.0, float(g3.abs().max()) if g3.numel() else 0.0)
    floor = batch * 2.0**-120 * largest**2 + 1e-37
    return weight, bias, 1e-5 * scale + floor, 1e-5 * g3.abs().sum(1).square().sum(0) + 1e-37


@pytest.mark.parametrize("backend", backends_for(("reference", "cpp", "triton")))
def test_squared_grad_sum_matches_the_float64_loop_or_reports_overflow(backend):
    @bounded(examples_for(backend))
    @given(pair=layer_pairs(dtypes_for(backend), max_batch=2 if slow(backend) else 4))
    def run(pair):
        a, g = pair
        weight, bias, atol_w, atol_b = fisher_oracle(a, g)
        overflow = overflow_expected(weight, bias)
        got = ok_or_erasus_error(lambda: erasus.ops.squared_grad_sum(a, g, backend=backend))
        if got is None:
            assert overflow is not False, "refused a result that fits in float32"
            expect_erasus_error(lambda: erasus.ops.squared_grad_sum(a, g, backend=backend), errors.NonFiniteError)
            return
        assert overflow is not True, "returned a result that does not fit in float32"
        assert got.weight.dtype == torch.float32 and got.weight.shape == weight.shape
        assert_within(got.weight, weight, atol_w, "weight")
        assert_within(got.bias, bias, atol_b, "bias")

    run()


@bounded(EXAMPLES)
@given(pair=layer_pairs(FLOATS, max_batch=5, max_steps=1, two_d=False))
def test_last_layer_gram_and_norms_match_the_float64_definition_or_report_overflow(pair):
    e, h = pair[1][:, 0], pair[0][:, 0]  # errors (n, C), features (n, d)
    if e.shape[0] == 0:
        expect_erasus_error(lambda: erasus.ops.last_layer_grad_gram(e, h), errors.EmptyInputError)
        return
    ed, hd = e.double(), h.double()
    gram = (ed @ ed.T) * (hd @ hd.T + 1)
    ne, nh = torch.linalg.vector_norm(ed, dim=1), torch.linalg.vector_norm(hd, dim=1)
    largest = max(float(ed.abs().max()), float(hd.abs().max()))
    atol = 1e-5 * (ne[:, None] * ne[None, :]) * (nh[:, None] * nh[None, :] + 1) + 2.0**-120 * largest**2 + 1e-37
    overflow = overflow_expected(gram)
    for op, want, tol in ((erasus.ops.last_layer_grad_gram, gram, atol),
                          (erasus.ops.last_layer_grad_sq_norms, gram.diagonal(), atol.diagonal())):
        got = ok_or_erasus_error(lambda: op(e, h))
        if got is None:
            assert overflow is not False, f"{op.__name__} refused a result that fits in float32"
            expect_erasus_error(lambda: op(e, h), errors.NonFiniteError)
            continue
        if op is erasus.ops.last_layer_grad_gram:
            assert overflow is not True, "returned a result that does not fit in float32"
        if float(want.abs().max()) < FLT_MAX:
            assert_within(got, want, tol, op.__name__)


# ------------------------------------------------------------------------------------------ bad input


BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.float64, torch.uint8]
BAD_K = [0, -1, 1.5, True, False, "2", None, 2.0]


def bad_matrix(kind: str, n: int, d: int):
    if kind == "dtype":
        return torch.ones(n, d).to(BAD_DTYPES[(n + d) % len(BAD_DTYPES)])
    if kind == "nan":
        x = torch.randn(n, d)
        x[n // 2, d // 2] = float("nan")
        return x
    if kind == "inf":
        x = torch.randn(n, d).half()
        x[n - 1, 0] = -float("inf")
        return x
    if kind == "1-D":
        return torch.randn(n)
    if kind == "3-D":
        return torch.randn(n, d, 2)
    if kind == "no rows":
        return torch.randn(0, d)
    if kind == "no features":
        return torch.randn(n, 0)
    if kind == "list":
        return [[1.0] * d] * n
    return torch.randn(n, d).numpy()


@bounded(EXAMPLES)
@given(kind=st.sampled_from(["dtype", "nan", "inf", "1-D", "3-D", "no rows", "no features", "list", "numpy"]),
       n=st.integers(1, 6), d=st.integers(1, 4), backend=st.sampled_from(["reference", "cpp", None]),
       op=st.sampled_from(["kcenter_greedy", "herding", "kmeans_coreset"]))
def test_bad_feature_matrices_raise_erasus_errors(kind, n, d, backend, op):
    fn = getattr(erasus.ops, op)
    if op == "kmeans_coreset" and backend == "cpp":
        backend = None
    expect_erasus_error(lambda: fn(bad_matrix(kind, n, d), 1, backend=backend))


@bounded(EXAMPLES)
@given(n=st.integers(1, 6), k=st.sampled_from(BAD_K + ["n+1", "-n"]), backend=st.sampled_from(["reference", "cpp"]),
       op=st.sampled_from(["kcenter_greedy", "herding", "kmeans_coreset"]))
def test_bad_k_raises_an_erasus_error(n, k, backend, op):
    torch.manual_seed(0)  # fixed data, whatever ran before
    k = n + 1 if k == "n+1" else -n if k == "-n" else k
    fn = getattr(erasus.ops, op)
    backend = "reference" if op == "kmeans_coreset" else backend
    expect_erasus_error(lambda: fn(torch.randn(n, 3), k, backend=backend), errors.InvalidInputError)


@bounded(EXAMPLES)
@given(case=st.sampled_from(["a dtype", "g dtype", "mixed dtypes", "B mismatch", "T mismatch", "1-D", "4-D",
                             "ndim mismatch", "nan", "inf", "path", "outer with T > 1", "not a tensor"]),
       backend=st.sampled_from(["reference", "cpp", None]),
       op=st.sampled_from(["per_sample_grad_norms", "squared_grad_sum"]))
def test_bad_layer_pairs_raise_erasus_errors(case, backend, op):
    torch.manual_seed(0)  # fixed data, whatever ran before
    a, g = torch.randn(3, 2, 4), torch.randn(3, 2, 5)
    kwargs = {"backend": backend}
    if case == "a dtype":
        a = a.to(torch.int64)
    elif case == "g dtype":
        g = g.to(torch.complex64)
    elif case == "mixed dtypes":
        g = g.half()
    elif case == "B mismatch":
        g = g[:2]
    elif case == "T mismatch":
        g = g[:, :1]
    elif case == "1-D":
        a = a[0, 0]
    elif case == "4-D":
        a = a[..., None]
    elif case == "ndim mismatch":
        g = g[:, 0]
    elif case == "nan":
        a[1, 1, 1] = float("nan")
    elif case == "inf":
        g[2, 0, 3] = float("inf")
    elif case == "path":
        kwargs["path"] = "fastest"
    elif case == "outer with T > 1":
        kwargs["path"] = "outer"
    else:
        a = a.tolist()
    if op == "squared_grad_sum":
        kwargs.pop("path", None)
        if case in ("path", "outer with T > 1"):
            return
    expect_erasus_error(lambda: getattr(erasus.ops, op)(a, g, **kwargs))


@bounded(EXAMPLES)
@given(case=st.sampled_from(["rows", "dtype", "nan", "1-D", "empty"]),
       op=st.sampled_from(["last_layer_grad_gram", "last_layer_grad_sq_norms"]))
def test_bad_last_layer_inputs_raise_erasus_errors(case, op):
    torch.manual_seed(0)  # fixed data, whatever ran before
    e, h = torch.randn(4, 3), torch.randn(4, 5)
    if case == "rows":
        h = h[:3]
    elif case == "dtype":
        e = e.double()
    elif case == "nan":
        h[0, 0] = float("nan")
    elif case == "1-D":
        e = e[0]
    else:
        e, h = e[:0], h[:0]
    expect_erasus_error(lambda: getattr(erasus.ops, op)(e, h))
