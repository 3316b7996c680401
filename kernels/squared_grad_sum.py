"""Diagonal empirical Fisher of a linear map in Triton: sum_i (G_i^T A_i)^2 per weight, one output tile per
program. With T = 1 the squares are taken as the tiles load (a GEMM of squares, no squared copies of A and
G); with T > 1 each sample's tile of G_i^T A_i is built in registers and squared there (no B x p x d buffer)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _squared_grad_sum(a_ptr, g_ptr, w_ptr, batch, steps, d, p, n_d_tiles,
                      BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_T: tl.constexpr, ONE_STEP: tl.constexpr):
    tile = tl.program_id(0)
    po = (tile // n_d_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    dj = (tile % n_d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    fisher = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    if ONE_STEP:
        for b0 in range(0, batch, BLOCK_B):
            rb = b0 + tl.arange(0, BLOCK_B)
            gt = tl.load(g_ptr + rb[None, :] * p + po[:, None], mask=(rb[None, :] < batch) & (po[:, None] < p),
                         other=0.0).to(tl.float32)
            at = tl.load(a_ptr + rb[:, None] * d + dj[None, :], mask=(rb[:, None] < batch) & (dj[None, :] < d),
                         other=0.0).to(tl.float32)
            fisher += tl.dot(gt * gt, at * at, input_precision="ieee")
    else:
        for i in range(0, batch):
            acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
            for t0 in range(0, steps, BLOCK_T):
                rt = t0 + tl.arange(0, BLOCK_T)
                gt = tl.load(g_ptr + i * steps * p + rt[None, :] * p + po[:, None],
                             mask=(rt[None, :] < steps) & (po[:, None] < p), other=0.0).to(tl.float32)
                at = tl.load(a_ptr + i * steps * d + rt[:, None] * d + dj[None, :],
                             mask=(rt[:, None] < steps) & (dj[None, :] < d), other=0.0).to(tl.float32)
                acc += tl.dot(gt, at, input_precision="ieee")
            fisher += acc * acc
    out = w_ptr + po[:, None] * d + dj[None, :]
    mask = (po[:, None] < p) & (dj[None, :] < d)
    tl.store(out, tl.load(out, mask=mask, other=0.0) + fisher, mask=mask)


def squared_grad_sum_(a: torch.Tensor, g: torch.Tensor, weight_out: torch.Tensor) -> None:
    """Accumulate sum_i (G_i^T A_i)^2 into weight_out (p x d, float32). a: (B, T, d), g: (B, T, p), contiguous."""
    batch, steps, d = a.shape
    p = g.shape[2]
    block_p, block_d = 32, 32
    n_d = triton.cdiv(d, block_d)
    grid = (triton.cdiv(p, block_p) * n_d,)
    _squared_grad_sum[grid](a, g, weight_out, batch, steps, d, p, n_d, BLOCK_P=block_p, BLOCK_D=block_d,
                            BLOCK_B=16, BLOCK_T=16, ONE_STEP=steps == 1)
