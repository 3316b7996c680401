"""Herding in Triton: one launch per step finds the unchosen row nearest the target (i+1)*mean - S_i;
the running sum S_i is updated on the device, so steps never wait on the host."""
import torch
import triton
import triton.language as tl

from ._distance import sq_dist_to_vector


@triton.jit
def _herding_step(x_ptr, target_ptr, selected_ptr, block_min_ptr, block_arg_ptr, n, d, stride_x, scale,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = sq_dist_to_vector(x_ptr, rows, row_ok, target_ptr, d, stride_x, scale, 1.0, BLOCK_N, BLOCK_D)
    chosen = tl.load(selected_ptr + rows, mask=row_ok, other=1)
    acc = tl.where(row_ok & (chosen == 0), acc, float("inf"))
    best = tl.min(acc, axis=0)
    best_row = tl.min(tl.where(acc == best, rows, n), axis=0)  # ties: lowest row
    tl.store(block_min_ptr + pid, best)
    tl.store(block_arg_ptr + pid, best_row.to(tl.int64))


def herding(x: torch.Tensor, k: int, scale: float = 1.0, block_n: int = 64, block_d: int = 64) -> torch.Tensor:
    """x: (n, d) contiguous on a Triton device; the loop runs on x * scale (a power of two). Returns the k chosen
    rows, int64, in selection order."""
    n, d = x.shape
    # float64 sums: no overflow before scaling, and the running sum of chosen rows does not drift
    mean = x.sum(dim=0, dtype=torch.float64) * (scale / n)
    chosen_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
    selected = torch.zeros(n, dtype=torch.uint8, device=x.device)
    out = torch.empty(k, dtype=torch.int64, device=x.device)
    blocks = triton.cdiv(n, block_n)
    block_min = torch.empty(blocks, dtype=torch.float32, device=x.device)
    block_arg = torch.empty(blocks, dtype=torch.int64, device=x.device)
    block_d = min(block_d, triton.next_power_of_2(max(d, 1)))
    target = torch.empty(d, dtype=torch.float32, device=x.device)
    for i in range(k):
        target.copy_(mean * (i + 1) - chosen_sum)
        _herding_step[(blocks,)](x, target, selected, block_min, block_arg, n, d, x.stride(0), scale,
                                 BLOCK_N=block_n, BLOCK_D=block_d)
        j = block_arg[torch.argmin(block_min)]
        out[i] = j
        selected[j] = 1
        chosen_sum += x[j].double() * scale
    return out
