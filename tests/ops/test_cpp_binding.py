"""What reaches the compiled extension: zero-copy views, and a clear error for anything else."""
import numpy as np
import pytest
import torch

from erasus import errors
from erasus.ops import _cpp


def args(n=6, d=4, k=2, dtype=np.float32):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(dtype)
    return x, np.array([0], np.int64), np.empty(k, np.int64), np.empty(n, np.float32)


def test_float32_runs_in_place_on_torch_memory():
    torch.manual_seed(0)  # fixed data, whatever ran before
    x = torch.randn(6, 4)
    out = torch.empty(2, dtype=torch.int64)
    min_dist = torch.empty(6)
    _cpp.call("kcenter_greedy", _cpp.as_numpy(x), "float32", np.array([0]), out.numpy(), min_dist.numpy())
    assert int(out[0]) == 0 and float(min_dist[0]) == -1.0  # written through the views
    assert _cpp.as_numpy(x).ctypes.data == x.data_ptr()


def test_bfloat16_crosses_as_an_int16_view_without_copying():
    torch.manual_seed(0)  # fixed data, whatever ran before
    x = torch.randn(6, 4).bfloat16()
    view = _cpp.as_numpy(x)
    assert view.dtype == np.int16 and view.ctypes.data == x.data_ptr()


def test_non_contiguous_array_is_refused():
    x, init, out, md = args()
    with pytest.raises(errors.LayoutError, match="x must be C-contiguous"):
        _cpp.call("kcenter_greedy", np.asfortranarray(x), "float32", init, out, md)
    with pytest.raises(errors.LayoutError, match="x must be C-contiguous"):
        _cpp.call("herding", x[:, ::2], "float32", out, np.empty(6, np.uint8))


def test_wrong_dtype_is_refused_not_converted():
    x, init, out, md = args(dtype=np.float64)
    with pytest.raises(errors.DTypeError, match="does not hold the declared element type"):
        _cpp.call("kcenter_greedy", x, "float32", init, out, md)
    x, init, out, md = args()
    with pytest.raises(errors.DTypeError, match="does not hold the declared element type"):
        _cpp.call("kcenter_greedy", x, "bfloat16", init, out, md)
    with pytest.raises(errors.DTypeError, match="init has numpy dtype"):
        _cpp.call("kcenter_greedy", x, "float32", init.astype(np.int32), out, md)
    with pytest.raises(errors.DTypeError, match="element type must be"):
        _cpp.call("kcenter_greedy", x, "float64", init, out, md)
    with pytest.raises(errors.DTypeError):
        _cpp.call("kcenter_greedy", x.tolist(), "float32", init, out, md)  # not an array: no conversion


def test_bad_shapes_and_read_only_outputs_are_refused():
    x, init, out, md = args()
    with pytest.raises(errors.ShapeError, match="x must be 2-D"):
        _cpp.call("kcenter_greedy", x[0], "float32", init, out, md)
    with pytest.raises(errors.ShapeError, match="min_dist must be 1-D of length 6"):
        _cpp.call("kcenter_greedy", x, "float32", init, out, md[:3])
    with pytest.raises(errors.ShapeError, match="init holds an index outside"):
        _cpp.call("kcenter_greedy", x, "float32", np.array([6]), out, md)
    with pytest.raises(errors.ShapeError, match="out must be 1-D"):
        _cpp.call("kcenter_greedy", x, "float32", init, np.empty(7, np.int64), md)
    out.flags.writeable = False
    with pytest.raises(errors.LayoutError, match="out must be writeable"):
        _cpp.call("kcenter_greedy", x, "float32", init, out, md)
    with pytest.raises(errors.ShapeError, match="x must have at least one row"):
        _cpp.call("herding", np.empty((0, 3), np.float32), "float32", np.empty(1, np.int64), np.empty(0, np.uint8))


def test_layer_kernels_refuse_mismatched_or_strided_arrays():
    a = np.zeros((2, 3, 4), np.float32)
    g = np.zeros((2, 3, 5), np.float32)
    w, b = np.empty(2, np.float32), np.empty(2, np.float32)
    with pytest.raises(errors.ShapeError, match="a and g must agree"):
        _cpp.call("per_sample_grad_norms", a, g[:, :2].copy(), "float32", 1, w, b)
    with pytest.raises(errors.LayoutError, match="g must be C-contiguous"):
        _cpp.call("per_sample_grad_norms", a, np.zeros((2, 5, 3), np.float32).transpose(0, 2, 1), "float32", 1, w, b)
    with pytest.raises(errors.ShapeError, match="needs steps == 1"):
        _cpp.call("per_sample_grad_norms", a, g, "float32", 0, w, b)
    with pytest.raises(errors.DTypeError, match="a has numpy dtype"):
        _cpp.call("squared_grad_sum", a.astype(np.float64), g, "float32", np.zeros((5, 4), np.float32), b[:1])
    with pytest.raises(errors.ShapeError, match="weight_out must have shape"):
        _cpp.call("squared_grad_sum", a, g, "float32", np.zeros((4, 5), np.float32), np.zeros(5, np.float32))


@pytest.mark.parametrize("scale", [3.0, 0.0, -1.0, float("inf"), float("nan"), 2.0**-130, 2.0**130])
def test_a_scale_that_is_not_an_exact_float32_power_of_two_is_refused(scale):
    x, init, out, md = args()
    with pytest.raises(errors.ShapeError, match="scale must be a power of two"):
        _cpp.call("kcenter_greedy", x, "float32", init, out, md, scale)
    with pytest.raises(errors.ShapeError, match="scale must be a power of two"):
        _cpp.call("herding", x, "float32", out, np.empty(6, np.uint8), scale)


def test_the_scale_multiplies_the_rows_exactly():
    x, init, out, md = args(n=9, d=3)
    r2 = _cpp.call("kcenter_greedy", x, "float32", init, out, md)
    out_scaled = np.empty_like(out)
    r2_scaled = _cpp.call("kcenter_greedy", x * np.float32(2.0**40), "float32", init, out_scaled, md, 2.0**-40)
    assert out_scaled.tolist() == out.tolist() and r2_scaled == r2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_non_negative_half_widens_exactly(dtype):
    """Every finite non-negative 16-bit pattern (normals, subnormals, zero) widened by the C++ kernels (F16C
    where the CPU has it, else the portable shift) equals torch's conversion: read back as the float32 keys
    the dual-sensitivity mask pass lists (S = f / (0 + 1) = f exactly)."""
    bits = torch.arange(0, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32).to(torch.int16)
    f = bits.view(dtype)
    zeros = torch.zeros_like(f)
    n = f.numel()
    index, keys = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int32)
    above, listed, bad = _cpp.call("dual_mask", _cpp.as_numpy(f), _cpp.as_numpy(zeros), _cpp.elem_name(dtype), 1.0,
                                   0, 0x7F7FFFFF, torch.empty(n, dtype=torch.uint8).numpy(), index.numpy(),
                                   keys.numpy())
    assert (above, listed, bad) == (0, n, 0)
    assert torch.equal(index, torch.arange(n))
    assert torch.equal(keys, f.float().view(torch.int32))
