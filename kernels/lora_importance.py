"""LoRAPrune importance |G_hat * (W + s L R)| in Triton, built tile by tile from the rank-r factors.

The problem is given as a matrix W (rows x cols) with left factors L, GL (rows x r) and right factors R, GR
(r x cols): G_hat = GL R + L GR - GL GR = GL (R - GR) + L GR and the merged weight W + s L R. Each program
loads a W tile and the matching row tile of L, GL and column tile of R, GR (r in chunks of BLOCK_K), forms the
three rank-r products in registers and multiplies: neither G_hat nor L R is ever written to global memory.
The per-element kernel stores the importance tile; the sums kernel reduces tiles into row sums (AXIS = 1) or
column sums (AXIS = 0), one partial vector per split of the reduced dimension (no atomics: deterministic)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _importance_tile(w_ptr, l_ptr, gl_ptr, r_ptr, gr_ptr, rows, cols, rank, scaling, ro, co,
                     sw0, sw1, sl0, sl1, sgl0, sgl1, sr0, sr1, sgr0, sgr1,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """|G_hat * (W + s L R)| on rows ``ro`` (BLOCK_R) x columns ``co`` (BLOCK_C) in float32; 0 outside W."""
    g_hat = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    lr = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        left_mask = (ro[:, None] < rows) & (ks[None, :] < rank)
        right_mask = (ks[:, None] < rank) & (co[None, :] < cols)
        left = tl.load(l_ptr + ro[:, None] * sl0 + ks[None, :] * sl1, mask=left_mask, other=0.0).to(tl.float32)
        grad_left = tl.load(gl_ptr + ro[:, None] * sgl0 + ks[None, :] * sgl1, mask=left_mask,
                            other=0.0).to(tl.float32)
        right = tl.load(r_ptr + ks[:, None] * sr0 + co[None, :] * sr1, mask=right_mask, other=0.0).to(tl.float32)
        grad_right = tl.load(gr_ptr + ks[:, None] * sgr0 + co[None, :] * sgr1, mask=right_mask,
                             other=0.0).to(tl.float32)
        g_hat += tl.dot(grad_left, right - grad_right, input_precision="ieee")
        g_hat += tl.dot(left, grad_right, input_precision="ieee")
        lr += tl.dot(left, right, input_precision="ieee")
    w_mask = (ro[:, None] < rows) & (co[None, :] < cols)
    w = tl.load(w_ptr + ro[:, None] * sw0 + co[None, :] * sw1, mask=w_mask, other=0.0).to(tl.float32)
    return tl.abs(g_hat * (w + scaling * lr))


@triton.jit
def _importance(w_ptr, l_ptr, gl_ptr, r_ptr, gr_ptr, out_ptr, rows, cols, rank, scaling,
                sw0, sw1, sl0, sl1, sgl0, sgl1, sr0, sr1, sgr0, sgr1, so0, so1,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    ro = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = _importance_tile(w_ptr, l_ptr, gl_ptr, r_ptr, gr_ptr, rows, cols, rank, scaling, ro, co,
                            sw0, sw1, sl0, sl1, sgl0, sgl1, sr0, sr1, sgr0, sgr1, BLOCK_R, BLOCK_C, BLOCK_K)
    tl.store(out_ptr + ro[:, None] * so0 + co[None, :] * so1, tile, mask=(ro[:, None] < rows) & (co[None, :] < cols))


@triton.jit
def _sums(w_ptr, l_ptr, gl_ptr, r_ptr, gr_ptr, partial_ptr, rows, cols, rank, scaling,
          sw0, sw1, sl0, sl1, sgl0, sgl1, sr0, sr1, sgr0, sgr1, span,
          AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, s): the sums of row block i (AXIS = 1) or column block i (AXIS = 0) over the s-th ``span`` of
    the reduced dimension, stored at partial[s, block]."""
    split = tl.program_id(1)
    if AXIS == 1:
        ro = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(split * span, split * span + span, BLOCK_C):
            co = c0 + tl.arange(0, BLOCK_C)
            tile = _importance_tile(w_ptr, l_ptr, gl_ptr, r_ptr, gr_ptr, rows, cols, rank, scaling, ro, co,
                                    sw0, sw1, sl0, sl1, sgl0, sgl1, sr0, sr1, sgr0, sgr1, BLOCK_R, BLOCK_C, BLOCK_K)
            acc += tl.sum(tile, axis=1)
        tl.store(partial_ptr + split * rows + ro, acc, mask=ro < rows)
    else:
        co = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(split * span, split * span + span, BLOCK_R):
            ro = r0 + tl.arange(0, BLOCK_R)
            tile = _importance_tile(w_ptr, l_ptr, gl_ptr, r_ptr, gr_ptr, rows, cols, rank, scaling, ro, co,
                                    sw0, sw1, sl0, sl1, sgl0, sgl1, sr0, sr1, sgr0, sgr1, BLOCK_R, BLOCK_C, BLOCK_K)
            acc += tl.sum(tile, axis=0)
        tl.store(partial_ptr + split * cols + co, acc, mask=co < cols)


def lora_importance(w: torch.Tensor, left: torch.Tensor, grad_left: torch.Tensor, right: torch.Tensor,
                    grad_right: torch.Tensor, scaling: float, axis: int | None) -> torch.Tensor:
    """float32 importance of w (rows x cols; any strides, any float dtype per argument): per element
    (``axis=None``, rows x cols, contiguous), or its sums over ``axis`` (1: one per row, 0: one per column)."""
    rows, cols = w.shape
    rank = left.shape[1]
    block_r, block_c, block_k = 32, 64, 16
    block_split = 128  # rows or columns reduced by one program: a multiple of both block_r and block_c
    strides = (*w.stride(), *left.stride(), *grad_left.stride(), *right.stride(), *grad_right.stride())
    if axis is None:
        out = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        _importance[grid](w, left, grad_left, right, grad_right, out, rows, cols, rank, scaling, *strides,
                          *out.stride(), BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_K=block_k)
        return out
    kept, reduced, block = (rows, cols, block_r) if axis == 1 else (cols, rows, block_c)
    splits = triton.cdiv(reduced, block_split)
    partial = torch.empty(splits, kept, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(kept, block), splits)
    _sums[grid](w, left, grad_left, right, grad_right, partial, rows, cols, rank, scaling, *strides, block_split,
                AXIS=axis, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_K=block_k)
    return partial.sum(dim=0, dtype=torch.float64).float() if splits > 1 else partial[0]
