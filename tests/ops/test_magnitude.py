"""Issue 9, item 4: the ops give the same answer over the whole float32 range, or say that the result overflowed
(never a wrong finite number, never "the input holds NaN/inf" for a finite input)."""
import pytest
import torch
from torch import nn

import erasus.ops
from erasus import errors
from oracles import backends_for, herding_bruteforce, kcenter_bruteforce
from test_fisher import loop_fisher
from test_model_grad_norms import ce, loop_norms, mlp

# The Triton interpreter computes with numpy, which warns when a float32 fast path overflows; the op then
# recomputes in float64 (that fallback is what these tests check).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
CORESET_BACKENDS = backends_for(("reference", "cpp", "triton"))
SCALES = [1e20, 1e-25, 3e37 / 4, 1e-38, -1e30]


def features(n=40, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", CORESET_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coreset_selections_do_not_change_with_the_scale(backend, dtype):
    if backend == "triton" and erasus.ops._backend.interpreted() and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")
    x = features().to(dtype)
    base = erasus.ops.kcenter_greedy(x, 6, init=0, backend=backend)
    want, radius = kcenter_bruteforce(x, 6, [0])
    assert base.indices.tolist() == want
    assert erasus.ops.herding(x, 6, backend=backend).tolist() == herding_bruteforce(x, 6)
    for c in SCALES:
        y = (x.double() * c).to(dtype)  # what the dtype can hold of c * x (bfloat16 rounds near 1e-38)
        want_y, radius_y = kcenter_bruteforce(y, 6, [0])
        assert want_y == want or c == 1e-38, c  # rounding aside, the scale changes nothing
        got = erasus.ops.kcenter_greedy(y, 6, init=0, backend=backend)
        assert got.indices.tolist() == want_y, c
        assert float(got.radius) == pytest.approx(radius_y, rel=1e-4), c
        assert float(got.radius) == pytest.approx(radius * abs(c), rel=2e-2), c
        assert erasus.ops.herding(y, 6, backend=backend).tolist() == herding_bruteforce(y, 6), c


@pytest.mark.parametrize("backend", CORESET_BACKENDS)
def test_huge_finite_features_are_not_called_infinite(backend):
    got = erasus.ops.kcenter_greedy(torch.full((10, 4), 1e38), 2, backend=backend)
    assert got.indices.tolist() == [0, 1] and float(got.radius) == 0.0
    # the covering radius of finite rows can exceed float32: it is returned in float64
    x = torch.tensor([[-3e38, 3e38], [3e38, -3e38], [0.0, 0.0]])
    got = erasus.ops.kcenter_greedy(x, 2, init=0, backend=backend)
    assert got.indices.tolist() == [0, 1]
    assert float(got.radius) == pytest.approx(3e38 * 2**0.5, rel=1e-5) and got.radius.dtype == torch.float64


@pytest.mark.parametrize("backend", backends_for(("reference", "faiss")))
def test_kmeans_coreset_does_not_change_with_the_scale(backend):
    x = features(60, 3, seed=1)
    want = erasus.ops.kmeans_coreset(x, 5, backend=backend).tolist()
    for e in (-90, -40, 40, 60):
        assert erasus.ops.kmeans_coreset(x * 2.0**e, 5, backend=backend).tolist() == want, e
    for c in (1e20, 1e-25):  # not a power of two: rounding may move a centroid, never to nonsense
        got = erasus.ops.kmeans_coreset(x * c, 5, backend=backend)
        assert len(set(got.tolist())) == 5


def norms_loop(a, g):
    return (torch.stack([(g[i].double().T @ a[i].double()).square().sum() for i in range(a.shape[0])]),
            g.double().sum(1).square().sum(1))


@pytest.mark.parametrize("backend", backends_for(("reference", "cpp", "triton")))
@pytest.mark.parametrize("path", ["ghost", "materialize"])
def test_per_sample_grad_norms_are_exact_when_squares_leave_float32(backend, path):
    gen = torch.Generator().manual_seed(2)
    a, g = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 2, generator=gen)
    for ca, cg in [(1e-25, 1e15), (1e25, 1e-25), (1e-20, 1.0), (1e-30, 1e-5)]:
        got = erasus.ops.per_sample_grad_norms(a * ca, g * cg, path=path, backend=backend)
        want_w, want_b = norms_loop(a * ca, g * cg)
        torch.testing.assert_close(got.weight.double(), want_w, rtol=1e-5, atol=1e-44)
        torch.testing.assert_close(got.bias.double(), want_b, rtol=1e-5, atol=1e-44)
    tiny_sample = a.clone()
    tiny_sample[1] *= 1e-30  # one sample far smaller than the others, with large gradients
    grads = g.clone()
    grads[1] *= 1e15
    got = erasus.ops.per_sample_grad_norms(tiny_sample, grads, path=path, backend=backend)
    torch.testing.assert_close(got.weight.double(), norms_loop(tiny_sample, grads)[0], rtol=1e-5, atol=0.0)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        erasus.ops.per_sample_grad_norms(a * 1e15, g * 1e15, path=path, backend=backend)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):  # finite: not "holds NaN or inf"
        erasus.ops.per_sample_grad_norms(torch.full((2, 1, 3), 3e38), torch.ones(2, 1, 1), backend=backend)


@pytest.mark.parametrize("backend", backends_for(("reference", "cpp", "triton")))
@pytest.mark.parametrize("steps", [1, 3])
def test_squared_grad_sum_is_exact_when_squares_leave_float32(backend, steps):
    gen = torch.Generator().manual_seed(3)
    a, g = torch.randn(4, steps, 5, generator=gen), torch.randn(4, steps, 3, generator=gen)
    for ca, cg in [(1e-25, 1e15), (1e25, 1e-25), (1e-15, 1e-3)]:
        got = erasus.ops.squared_grad_sum(a * ca, g * cg, backend=backend)
        a64, g64 = (a * ca).double(), (g * cg).double()
        want = sum((g64[i].T @ a64[i]).square() for i in range(4))
        torch.testing.assert_close(got.weight.double(), want, rtol=1e-5, atol=1e-44)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        erasus.ops.squared_grad_sum(a * 1e15, g * 1e10, backend=backend)


def test_last_layer_gram_is_exact_when_squares_leave_float32():
    gen = torch.Generator().manual_seed(4)
    e, h = torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen)
    for ce_, ch in [(1e-25, 1e20), (1e15, 1e-25), (1e-20, 1.0)]:
        ed, hd = (e * ce_).double(), (h * ch).double()
        want = (ed @ ed.T) * (hd @ hd.T + 1)
        torch.testing.assert_close(erasus.ops.last_layer_grad_gram(e * ce_, h * ch).double(), want,
                                   rtol=1e-5, atol=1e-44)
        torch.testing.assert_close(erasus.ops.last_layer_grad_sq_norms(e * ce_, h * ch).double(), want.diagonal(),
                                   rtol=1e-5, atol=1e-44)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        erasus.ops.last_layer_grad_gram(e * 1e20, h)


def test_model_norms_and_fisher_follow_the_loss_scale_or_report_overflow():
    model = mlp()
    batch = (torch.randn(6, 12), torch.randint(0, 5, (6,)))
    for c in (1e-30, 1e-12, 1e15, 1e25):  # at 1e-30 and 1e25 the squared norms leave float32, the norms do not
        def scaled_loss(m, b, c=c):
            return ce(m, b) * c
        torch.testing.assert_close(erasus.ops.grad_norms(model, scaled_loss, batch).double(),
                                   loop_norms(model, scaled_loss, batch), rtol=1e-4, atol=0.0)
    small = lambda m, b: ce(m, b) * 1e-12  # noqa: E731
    got = erasus.ops.fisher_diagonal(model, [batch], loss_fn=small)
    for name, value in loop_fisher(model, small, [batch]).items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-4, atol=1e-40)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        erasus.ops.grad_norms(model, lambda m, b: ce(m, b) * 1e25, batch, squared=True)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        erasus.ops.fisher_diagonal(model, [batch], loss_fn=lambda m, b: ce(m, b) * 1e25)
    huge_features = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.full((2, 3), 1e30), torch.tensor([0, 1])
    torch.testing.assert_close(erasus.ops.grad_norms(huge_features, ce, (x, y)).double(),
                               loop_norms(huge_features, ce, (x, y)), rtol=1e-4, atol=0.0)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        erasus.ops.grad_norms(huge_features, ce, (x, y), squared=True)
