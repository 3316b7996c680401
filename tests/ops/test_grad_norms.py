import pytest
import torch

import erasus.ops
from erasus import errors
from erasus.ops.linear_grads import GRAD_NORMS, choose_path
from oracles import backends_for

BACKENDS = GRAD_NORMS.backends

# (B, T, d, p): T = 1, B = 1, odd sizes, both sides of the ghost/materialise crossover, T beyond one tile.
SHAPES = [(1, 1, 1, 1), (5, 1, 7, 3), (1, 4, 9, 5), (3, 2, 33, 17), (4, 7, 3, 2), (2, 19, 20, 6),
          (3, 40, 8, 70)]
TRITON_SHAPES = [(1, 1, 1, 1), (2, 1, 7, 3), (1, 4, 9, 5), (2, 19, 20, 6)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-3, 1e-3)}


def per_sample_loop(a, g):
    """The definition: build each sample's gradient, then take its norm (float64)."""
    w = torch.stack([(g[i].double().T @ a[i].double()).square().sum() for i in range(a.shape[0])])
    b = g.double().sum(dim=1).square().sum(dim=1)
    return w, b


def case(batch, steps, d, p, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed + 7 * batch + 11 * steps + d * p)
    return (torch.randn(batch, steps, d, generator=gen).to(dtype), torch.randn(batch, steps, p, generator=gen).to(dtype))


def is_interpreted(backend):
    return backend == "triton" and erasus.ops._backend.interpreted()


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
@pytest.mark.parametrize("path", ["auto", "ghost", "materialize"])
def test_every_backend_and_path_matches_the_per_sample_loop(backend, path):
    shapes = TRITON_SHAPES if is_interpreted(backend) else SHAPES
    dtypes = DTYPES[:2] if is_interpreted(backend) else DTYPES
    for batch, steps, d, p in shapes:
        for dtype in dtypes:
            a, g = case(batch, steps, d, p, dtype)
            got = erasus.ops.per_sample_grad_norms(a, g, path=path, backend=backend)
            want_w, want_b = per_sample_loop(a, g)
            rtol, atol = TOL[dtype]
            assert got.weight.dtype == torch.float32 and got.weight.shape == (batch,)
            torch.testing.assert_close(got.weight.double(), want_w, rtol=rtol, atol=atol)
            torch.testing.assert_close(got.bias.double(), want_b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_two_dimensional_inputs_are_one_step_per_sample(backend):
    gen = torch.Generator().manual_seed(1)
    a, g = torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)
    got = erasus.ops.per_sample_grad_norms(a, g, backend=backend)
    torch.testing.assert_close(got.weight, a.square().sum(1) * g.square().sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.bias, g.square().sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_empty_batch_and_zero_steps(backend):
    out = erasus.ops.per_sample_grad_norms(torch.empty(0, 3, 4), torch.empty(0, 3, 2), backend=backend)
    assert out.weight.shape == (0,) and out.bias.shape == (0,)
    out = erasus.ops.per_sample_grad_norms(torch.empty(2, 0, 4), torch.empty(2, 0, 2), backend=backend)
    assert out.weight.tolist() == [0.0, 0.0] and out.bias.tolist() == [0.0, 0.0]


def test_linear_layer_autograd_agrees():
    torch.manual_seed(0)
    layer = torch.nn.Linear(10, 4)
    x = torch.randn(3, 6, 10)
    captured = {}
    layer.register_forward_hook(lambda m, args, out: captured.update(a=args[0].detach()))
    out = layer(x)
    out.register_hook(lambda grad: captured.update(g=grad.detach()))
    target = torch.randn(3, 6, 4)
    ((out - target) ** 2).sum().backward()
    got = erasus.ops.per_sample_grad_norms(captured["a"], captured["g"])
    for i in range(3):
        layer.zero_grad()
        ((layer(x[i : i + 1]) - target[i : i + 1]) ** 2).sum().backward()
        assert float(got.weight[i]) == pytest.approx(float(layer.weight.grad.square().sum()), rel=1e-4)
        assert float(got.bias[i]) == pytest.approx(float(layer.bias.grad.square().sum()), rel=1e-4)


def test_path_rule_follows_the_flop_count():
    assert choose_path(1, 768, 3072) == "outer"
    assert choose_path(128, 768, 3072) == "ghost"      # 128 * 3840 < 768 * 3072
    assert choose_path(1024, 768, 3072) == "materialize"
    assert choose_path(512, 4096, 8) == "materialize"   # LoRA factor: one side of size r


def seeded(*shape):
    """Values for the error table: fixed, so no case depends on the global generator's state."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


@pytest.mark.parametrize(
    "a, g, kwargs, error, match",
    [
        (seeded(2, 3, 4), seeded(2, 4, 5), {}, errors.ShapeError, "agree on"),
        (seeded(2, 3, 4), seeded(3, 3, 5), {}, errors.ShapeError, "agree on"),
        (seeded(2, 3, 4), seeded(2, 5), {}, errors.ShapeError, "same number of dimensions"),
        (seeded(4), seeded(4), {}, errors.ShapeError, "a must be"),
        (seeded(2, 3, 4, 1), seeded(2, 3, 4, 1), {}, errors.ShapeError, "a must be"),
        (seeded(2, 3), seeded(2, 3).half(), {}, errors.DTypeError, "share a dtype"),
        (seeded(2, 3).double(), seeded(2, 3).double(), {}, errors.DTypeError, "a must be float32"),
        (seeded(2, 3), torch.full((2, 3), float("nan")), {}, errors.NonFiniteError, "g holds NaN"),
        (seeded(2, 3, 4), seeded(2, 3, 2), {"path": "outer"}, errors.InvalidInputError, "T = 1"),
        (seeded(2, 3, 4), seeded(2, 3, 2), {"path": "fast"}, errors.InvalidInputError, "path must"),
        ([1.0], seeded(2, 3), {}, errors.InvalidInputError, "a must be a torch.Tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(a, g, kwargs, error, match):
    with pytest.raises(errors.ErasusError, match=match) as raised:
        erasus.ops.per_sample_grad_norms(a, g, **kwargs)
    assert type(raised.value) is error
