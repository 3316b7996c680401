"""Greedy k-center in Triton: one fused launch per centre (distance to the newest centre, running-min
update, block argmax), with the centre's index kept on the device so no step waits on the host."""
import torch
import triton
import triton.language as tl

from ._distance import sq_dist_to_vector


@triton.jit
def _kcenter_step(x_ptr, centres_ptr, step, min_ptr, block_max_ptr, block_arg_ptr, n, d, stride_x, scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    centre = tl.load(centres_ptr + step)
    acc = sq_dist_to_vector(x_ptr, rows, row_ok, x_ptr + centre * stride_x, d, stride_x, scale, scale,
                            BLOCK_N, BLOCK_D)
    m = tl.load(min_ptr + rows, mask=row_ok, other=-1.0)
    # -1 marks a centre: min() keeps it, so a centre is never chosen again, even among duplicates.
    m = tl.where(m < 0.0, m, tl.minimum(m, acc))
    m = tl.where(rows == centre, -1.0, m)
    tl.store(min_ptr + rows, m, mask=row_ok)
    m = tl.where(row_ok, m, -2.0)
    best = tl.max(m, axis=0)
    best_row = tl.min(tl.where(m == best, rows, n), axis=0)  # ties: lowest row
    tl.store(block_max_ptr + pid, best)
    tl.store(block_arg_ptr + pid, best_row.to(tl.int64))


def kcenter_greedy(x: torch.Tensor, init: torch.Tensor, k: int, scale: float = 1.0, block_n: int = 64,
                   block_d: int = 64):
    """x: (n, d) contiguous on a Triton device; init: int64 indices on x.device; the loop runs on x * scale
    (a power of two). Returns (centres int64 (k,), squared covering radius of x * scale as a 0-d float32
    tensor, min_dist (n,))."""
    n, d = x.shape
    centres = torch.empty(k, dtype=torch.int64, device=x.device)
    centres[: init.numel()] = init
    min_dist = torch.full((n,), float("inf"), dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(n, block_n)
    block_max = torch.empty(blocks, dtype=torch.float32, device=x.device)
    block_arg = torch.empty(blocks, dtype=torch.int64, device=x.device)
    block_d = min(block_d, triton.next_power_of_2(max(d, 1)))
    n_init = init.numel()
    for step in range(k):
        _kcenter_step[(blocks,)](x, centres, step, min_dist, block_max, block_arg, n, d, x.stride(0), scale,
                                 BLOCK_N=block_n, BLOCK_D=block_d)
        if n_init <= step + 1 < k:
            centres[step + 1] = block_arg[torch.argmax(block_max)]
    radius2 = block_max.max().clamp_min(0.0)
    return centres, radius2, min_dist
