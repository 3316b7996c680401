"""Shared Triton device function: squared Euclidean distance from a block of rows to one vector."""
import triton
import triton.language as tl


@triton.jit
def sq_dist_to_vector(x_ptr, rows, row_ok, vec_ptr, d, stride_x, scale_x, scale_v,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_j (scale_x x[row, j] - scale_v vec[j])^2 for each row of the block, accumulated in float32 over d in
    BLOCK_D chunks. The scales are powers of two that bring the largest |x| near 1 (exact), so the sum cannot
    overflow whatever the magnitude of x."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        xv = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32) * scale_x
        vv = tl.load(vec_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * scale_v
        diff = xv - vv[None, :]
        acc += tl.sum(diff * diff, axis=1)
    return acc
