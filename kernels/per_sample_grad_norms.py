"""Per-sample squared gradient norms of a linear map in Triton, from inputs A (B x T x d) and output
gradients G (B x T x p), never writing the B x p x d per-sample gradients.

Each program writes one partial sum to its own slot and the wrapper adds the slots, so results do not depend
on the order programs finish in (no atomics).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _gram_tile(x_ptr, steps, width, rs, rt, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # rows rs x rows rt of X X^T for one sample's (steps x width) row-major X, in float32
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    for k0 in range(0, width, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xs = tl.load(x_ptr + rs[:, None] * width + cols[None, :],
                     mask=(rs[:, None] < steps) & (cols[None, :] < width), other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + rt[:, None] * width + cols[None, :],
                     mask=(rt[:, None] < steps) & (cols[None, :] < width), other=0.0).to(tl.float32)
        acc += tl.dot(xs, tl.trans(xt), input_precision="ieee")
    return acc


@triton.jit
def _ghost_tile(a_ptr, g_ptr, part_ptr, steps, d, p, n_tiles,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # One (s-tile, t-tile) block of <A A^T, G G^T> for one sample; the lower triangle counts twice.
    b = tl.program_id(0)
    pair = tl.program_id(1)
    ts = pair // n_tiles
    tt = pair % n_tiles
    if tt <= ts:
        rs = ts * BLOCK_T + tl.arange(0, BLOCK_T)
        rt = tt * BLOCK_T + tl.arange(0, BLOCK_T)
        aa = _gram_tile(a_ptr + b * steps * d, steps, d, rs, rt, BLOCK_T, BLOCK_K)
        gg = _gram_tile(g_ptr + b * steps * p, steps, p, rs, rt, BLOCK_T, BLOCK_K)
        total = tl.sum(tl.sum(aa * gg, axis=1), axis=0)
        weight = tl.where(tt == ts, 1.0, 2.0)
        tl.store(part_ptr + b * n_tiles * n_tiles + pair, total * weight)
    else:
        tl.store(part_ptr + b * n_tiles * n_tiles + pair, 0.0)


@triton.jit
def _materialize_tile(a_ptr, g_ptr, part_ptr, steps, d, p, n_p_tiles, n_d_tiles,
                      BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    # One (p-tile, d-tile) block of G_i^T A_i, accumulated over T in registers, then squared and summed.
    b = tl.program_id(0)
    tile = tl.program_id(1)
    po = (tile // n_d_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    dj = (tile % n_d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for t0 in range(0, steps, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        gt = tl.load(g_ptr + b * steps * p + rt[None, :] * p + po[:, None],
                     mask=(rt[None, :] < steps) & (po[:, None] < p), other=0.0).to(tl.float32)  # BLOCK_P x BLOCK_T
        at = tl.load(a_ptr + b * steps * d + rt[:, None] * d + dj[None, :],
                     mask=(rt[:, None] < steps) & (dj[None, :] < d), other=0.0).to(tl.float32)  # BLOCK_T x BLOCK_D
        acc += tl.dot(gt, at, input_precision="ieee")
    tl.store(part_ptr + b * n_p_tiles * n_d_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _outer_rows(a_ptr, g_ptr, out_ptr, d, p, BLOCK: tl.constexpr):
    # T == 1: ||a_i||^2 * ||g_i||^2.
    b = tl.program_id(0)
    sa = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, d, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(a_ptr + b * d + cols, mask=cols < d, other=0.0).to(tl.float32)
        sa += x * x
    sg = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, p, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        y = tl.load(g_ptr + b * p + cols, mask=cols < p, other=0.0).to(tl.float32)
        sg += y * y
    tl.store(out_ptr + b, tl.sum(sa, axis=0) * tl.sum(sg, axis=0))


def weight_norms(a: torch.Tensor, g: torch.Tensor, path: str) -> torch.Tensor:
    """a: (B, T, d), g: (B, T, p), contiguous, same dtype. Returns float32 (B,) squared weight-gradient norms."""
    batch, steps, d = a.shape
    p = g.shape[2]
    if path == "outer":
        out = torch.empty(batch, dtype=torch.float32, device=a.device)
        _outer_rows[(batch,)](a, g, out, d, p, BLOCK=128)
        return out
    if path == "ghost":
        block_t = 16
        n_tiles = triton.cdiv(steps, block_t)
        part = torch.empty(batch, n_tiles * n_tiles, dtype=torch.float32, device=a.device)
        _ghost_tile[(batch, n_tiles * n_tiles)](a, g, part, steps, d, p, n_tiles, BLOCK_T=block_t, BLOCK_K=32)
        return part.sum(dim=1)
    block_p, block_d = 32, 32
    n_p, n_d = triton.cdiv(p, block_p), triton.cdiv(d, block_d)
    part = torch.empty(batch, n_p * n_d, dtype=torch.float32, device=a.device)
    _materialize_tile[(batch, n_p * n_d)](a, g, part, steps, d, p, n_p, n_d, BLOCK_P=block_p, BLOCK_D=block_d,
                                          BLOCK_T=16)
    return part.sum(dim=1)
