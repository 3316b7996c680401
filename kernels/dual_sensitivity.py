"""Dual-sensitivity scores S = f / (r + eps) in Triton: a fused scoring + histogram pass over the float bits of
S, and a mask pass that lists the keys of one histogram bin as candidates. The selection logic (which bin,
which candidates) is erasus.ops.dual_sensitivity's; these launchers know tensors only."""
import torch
import triton
import triton.language as tl

LEVEL0_BINS = 32768  # key >> 16 of a non-negative float32
LEVEL1_BINS = 65536  # key & 0xffff


@triton.jit
def _score_key(f_ptr, r_ptr, offs, ok, eps):
    f = tl.load(f_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # IEEE division (div_rn): the default `/` is approximate on GPUs and the keys must match the other backends
    s = tl.math.div_rn(f, r + eps)
    key = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    good = ok & (f >= 0.0) & (f <= 3.4028234663852886e38) & (r >= 0.0) & (r <= 3.4028234663852886e38)
    return key, good


@triton.jit
def _histogram_kernel(f_ptr, r_ptr, n, eps, prefix, hist_ptr, bad_ptr, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    key, good = _score_key(f_ptr, r_ptr, offs, ok, eps)
    if LEVEL == 0:
        take = good
        bins = key >> 16
    else:
        take = good & ((key >> 16) == prefix)
        bins = key & 0xFFFF
    tl.atomic_add(hist_ptr + bins, tl.where(take, 1, 0).to(tl.int64), mask=take)
    n_bad = tl.sum(tl.where(ok & ~good, 1, 0), axis=0)
    tl.atomic_add(bad_ptr, n_bad.to(tl.int64))


@triton.jit
def _mask_kernel(f_ptr, r_ptr, n, eps, lo, hi, mask_ptr, counts_ptr, cand_index_ptr, cand_key_ptr, cap,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    key, good = _score_key(f_ptr, r_ptr, offs, ok, eps)
    tl.atomic_add(counts_ptr + 2, tl.sum(tl.where(ok & ~good, 1, 0), axis=0).to(tl.int64))
    over = ok & (key > hi)
    tl.store(mask_ptr + offs, over.to(tl.int8), mask=ok)
    tl.atomic_add(counts_ptr, tl.sum(over.to(tl.int64), axis=0))
    cand = ok & (key >= lo) & (key <= hi)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    if n_cand > 0:
        # one reservation per program; the candidates' order is restored by the caller's sort
        base = tl.atomic_add(counts_ptr + 1, n_cand.to(tl.int64))
        slot = base + tl.cumsum(cand.to(tl.int64), axis=0) - 1
        fits = cand & (slot < cap)  # past the buffers' end nothing is written; the count tells the caller
        tl.store(cand_index_ptr + slot, offs, mask=fits)
        tl.store(cand_key_ptr + slot, key, mask=fits)


def score_histogram(f: torch.Tensor, r: torch.Tensor, eps: float, level: int, prefix: int, hist: torch.Tensor,
                    block: int = 1024) -> torch.Tensor:
    """Add the key bins of S = f / (r + eps) (1-D, same length, one device) to ``hist`` (int64, 32768 bins at
    level 0, 65536 at level 1 restricted to keys >> 16 == prefix). Returns the number of invalid elements
    (negative, NaN or infinite f or r) as a 1-element int64 tensor on the device."""
    n = f.numel()
    bad = torch.zeros(1, dtype=torch.int64, device=f.device)
    if n:
        _histogram_kernel[(triton.cdiv(n, block),)](f, r, n, eps, prefix, hist, bad, LEVEL=level, BLOCK=block)
    return bad


def mask(f: torch.Tensor, r: torch.Tensor, eps: float, lo: int, hi: int, out: torch.Tensor,
         cand_index: torch.Tensor, cand_key: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """out[i] = key_i > hi (out: uint8 view of a bool mask); keys in [lo, hi] are written, in no particular
    order, to the int64 / int32 candidate buffers, as many as they hold. Returns (count above hi, candidates,
    invalid elements) as a 3-element int64 tensor on the device; more candidates than the buffers hold means
    the listing is incomplete (the caller checks)."""
    n = f.numel()
    counts = torch.zeros(3, dtype=torch.int64, device=f.device)
    if n:
        _mask_kernel[(triton.cdiv(n, block),)](f, r, n, eps, lo, hi, out, counts, cand_index, cand_key,
                                                 cand_index.numel(), BLOCK=block)
    return counts
