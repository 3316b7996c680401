"""Dual-sensitivity pruning masks: prune the weights (or weight groups) that matter most to the forget set
relative to the retain set, S = I_forget / (I_retain + eps), with one global threshold across all layers.

Selection works on the float32 bits of S (S >= 0, so its bits order like integers), never with a full sort and
never ``torch.quantile`` (which refuses more than 2**24 elements). On large inputs it first tries ONE streaming
pass: the scores of a small random sample of blocks bracket the k-th score, [lo, hi]; the mask pass writes
``S > hi`` directly and lists the keys inside the bracket as candidates, resolved exactly on that small set. The
pass itself proves the bracket right (fewer than k keys above hi, at least k at or above lo); when it is not
(an unlucky sample, heavy ties), a radix select follows: a fused scoring + histogram pass over the top 16 bits
of every key, then the mask pass with the one bin that holds the k-th score as the bracket. A bin too full to
list (many equal scores) gets one more histogram pass over its low 16 bits first. The result is the same on
every route. See ../shared/reference/kernels.md section 6.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from erasus.errors import DTypeError, InvalidInputError, NonFiniteError, ShapeError
from erasus.ops import _backend, _cpp
from erasus.ops._threads import one_thread
from erasus.ops._validate import FLOAT_DTYPES, all_finite

LEVEL0_BINS = 32768  # key >> 16 of a non-negative float32 (the sign bit is clear)
LEVEL1_BINS = 65536  # key & 0xffff
# The most candidates the mask pass lists (12 bytes each); a fuller bin is narrowed by a second histogram.
MAX_CANDIDATES = 1 << 21
# The degenerate path (more equal scores at the threshold than MAX_CANDIDATES) marks ties in chunks this long.
TIE_CHUNK = 1 << 20
# The sampled bracket: tried from this many units up (below it the histogram pass is cheap), on this many
# blocks of this many consecutive units drawn uniformly over all layers (2**18 scores: about 2 MB read).
SAMPLED_MIN_UNITS = 1 << 22
SAMPLE_BLOCKS, SAMPLE_BLOCK = 1024, 256
# Half-width of the bracket in standard errors of the sampled count, doubled again for the correlation of
# consecutive units in a block. A miss only costs the histogram route, never a wrong mask. 4, not more: every
# listed candidate costs the pass and the marking ~30 ns (bench/masks.py, 50M units: 6 listed 235k, 4 list 157k).
BRACKET_SIGMAS = 4.0
INF_KEY = 0x7F800000  # above every valid key (the largest finite float32 is 0x7F7FFFFF)


class DualMask(NamedTuple):
    masks: object
    """bool masks, True = prune, with the structure of the inputs (a tensor, a list, or a dict with the same
    keys) and each input's shape, on the inputs' device."""
    threshold: float
    """ratio mode: the smallest pruned score (every unit with S above it is pruned, and units with S equal to it
    lowest index first until exactly k are); ``inf`` when k = 0. threshold mode: the threshold given."""
    pruned: int
    """how many units (elements, or groups where a layer has a group map) were pruned."""


def dual_sensitivity_mask(imp_forget, imp_retain, *, eps: float, ratio: float | None = None,
                          threshold: float | None = None, groups=None, out=None, backend: str | None = None
                          ) -> DualMask:
    """Masks of the weights (or groups) with the highest dual-sensitivity score S = I_f / (I_r + eps).

    Does not mutate its inputs; writes into ``out`` when given.

    Args:
        imp_forget, imp_retain: the importances on the forget and the retain set: one tensor, a list of tensors
            or a dict ``name -> tensor`` (one per layer), the same structure and pairwise the same shape and
            dtype; float32, float16 or bfloat16, non-negative and finite, all on one device. Scores are
            computed in float32: ``float32(f) / (float32(r) + float32(eps))``, IEEE-rounded on every backend.
        eps: the retain floor, > 0 (representable as a positive float32).
        ratio: prune ``k = floor(ratio * N)`` units of the N in the whole model (ratio read as its decimal
            ``repr``, so 0.29 of 100 is 29), 0 < ratio < 1: the k highest scores, one global ranking over all
            layers. Ties at the threshold: exactly k are pruned, lowest position first, positions counting
            through the layers in their order (list order, dict insertion order) and row-major within a layer.
        threshold: instead of ``ratio``: prune every unit with S > threshold (finite, >= 0). Exactly one of
            ``ratio`` and ``threshold`` is given.
        groups: optional group maps, the same structure as the importances, an entry ``None`` (that layer is
            scored per element) or an int64 tensor of the layer's shape giving each element's group id. The ids
            must tile the layer: every id in ``0 .. G-1`` used at least once (so each group is non-empty and
            each element in exactly one group). A group's importances are summed (in float64, then rounded to
            float32) before scoring; its units rank with every other unit of the model, and its mask is
            broadcast back to its elements. Heads: ``torch.arange(d_out).div(head_dim, rounding_mode="floor")``
            broadcast over the rows; channels: the row index.
        out: optional bool tensors, the structure and shapes of the masks, written in place (preallocated
            outputs save the page faults of fresh memory in repeated calls).
        backend: ``"reference"``, ``"cpp"`` or ``"triton"``; default: the fastest one for the device.

    Returns:
        :class:`DualMask` ``(masks, threshold, pruned)``.

    Example:
        >>> import torch, erasus.ops
        >>> f = [torch.tensor([4.0, 1.0, 0.0]), torch.tensor([[2.0, 2.0]])]
        >>> r = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[0.0, 0.0]])]
        >>> res = erasus.ops.dual_sensitivity_mask(f, r, eps=1.0, ratio=0.4)
        >>> [m.tolist() for m in res.masks], res.threshold, res.pruned
        ([[True, False, False], [[True, False]]], 2.0, 2)
    """
    kind, keys, forget = _layers(imp_forget, "imp_forget")
    kind_r, keys_r, retain = _layers(imp_retain, "imp_retain")
    if kind != kind_r or keys != keys_r:
        raise ShapeError("imp_forget and imp_retain must have the same structure (tensor, list of the same "
                         f"length, or dict with the same keys), got {_describe(kind, keys)} and "
                         f"{_describe(kind_r, keys_r)}")
    names = [_name(kind, key) for key in keys]
    device = _check_pairs(forget, retain, names)
    eps32 = _check_eps(eps)
    if (ratio is None) == (threshold is None):
        raise InvalidInputError("give exactly one of ratio and threshold, got "
                                f"ratio={ratio!r}, threshold={threshold!r}")
    maps = _group_maps(groups, kind, keys, forget, names, device)
    out_masks = _outputs(out, kind, keys, forget, names, device)

    unit_f, unit_r, unit_masks = [], [], []
    for f, r, gmap, mask, name in zip(forget, retain, maps, out_masks, names):
        if gmap is None:
            unit_f.append(f.detach().contiguous().reshape(-1))
            unit_r.append(r.detach().contiguous().reshape(-1))
            unit_masks.append(mask.view(-1))
        else:
            gf, gr = _group_sums(f, r, gmap, name)
            unit_f.append(gf)
            unit_r.append(gr)
            unit_masks.append(torch.empty(gf.numel(), dtype=torch.bool, device=device))
    n_units = sum(t.numel() for t in unit_f)
    k = hi_key = None
    if ratio is not None:
        k = _units_to_prune(ratio, n_units)
    else:
        hi_key = _threshold_key(threshold)

    implementation = DUAL_SENSITIVITY.select(device, backend)
    key, pruned = implementation(unit_f, unit_r, names, eps32, k, hi_key, unit_masks)
    for gmap, unit_mask, mask in zip(maps, unit_masks, out_masks):
        if gmap is not None and mask.numel():
            mask.copy_(unit_mask[gmap])  # broadcast each group's decision to its elements
    masks = out_masks[0] if kind == "tensor" else (list(out_masks) if kind == "list"
                                                      else dict(zip(keys, out_masks)))
    if ratio is not None:
        value = math.inf if key is None else _key_to_float(key)
    else:
        value = float(threshold)
    return DualMask(masks, value, int(pruned))


# ---------------------------------------------------------------------------------------------------------
# Argument checks


def _layers(imp, name: str):
    """(kind, keys, tensors) of one importance argument."""
    if isinstance(imp, torch.Tensor):
        return "tensor", [None], [imp]
    if isinstance(imp, dict):
        return "dict", list(imp.keys()), list(imp.values())
    if isinstance(imp, (list, tuple)):
        return "list", list(range(len(imp))), list(imp)
    raise InvalidInputError(f"{name} must be a tensor, a list of tensors or a dict of tensors, "
                            f"got {type(imp).__name__}")


def _describe(kind: str, keys: list) -> str:
    return {"tensor": "a tensor", "list": f"a list of {len(keys)}", "dict": f"a dict with keys {keys}"}[kind]


def _name(kind: str, key) -> str:
    return "" if kind == "tensor" else f"[{key!r}]"


def _check_pairs(forget: list, retain: list, names: list[str]) -> torch.device:
    device = None
    for f, r, name in zip(forget, retain, names):
        for t, arg in ((f, "imp_forget"), (r, "imp_retain")):
            if not isinstance(t, torch.Tensor):
                raise InvalidInputError(f"{arg}{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise DTypeError(f"{arg}{name} must be float32, float16 or bfloat16, got {t.dtype}")
            if device is None:
                device = t.device
            elif t.device != device:
                raise InvalidInputError(f"{arg}{name} is on {t.device}, other importances on {device}: the "
                                        "global ranking needs them on one device")
        if f.shape != r.shape:
            raise ShapeError(f"imp_forget{name} has shape {tuple(f.shape)} but imp_retain{name} has shape "
                             f"{tuple(r.shape)}")
        if f.dtype != r.dtype:
            raise DTypeError(f"imp_forget{name} is {f.dtype} but imp_retain{name} is {r.dtype}: give one dtype")
    return torch.device("cpu") if device is None else device


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise InvalidInputError(f"eps must be a finite number > 0, got {eps!r}")
    eps32 = float(np.float32(eps))
    if eps32 <= 0 or not math.isfinite(eps32):
        raise InvalidInputError(f"eps = {eps!r} is not a positive float32 (scores are computed in float32)")
    return eps32


def _units_to_prune(ratio, n_units: int) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio < 1:
        raise InvalidInputError(f"ratio must be a number with 0 < ratio < 1, got {ratio!r}")
    return math.floor(Fraction(repr(float(ratio))) * n_units)


def _threshold_key(threshold) -> int:
    """The largest float32 key whose value is <= threshold: S > threshold exactly when key(S) > it."""
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
            or threshold < 0):
        raise InvalidInputError(f"threshold must be a finite number >= 0, got {threshold!r}")
    t32 = np.float32(threshold)
    if float(t32) > float(threshold):
        t32 = np.nextafter(t32, np.float32(0))
    return int(np.array(t32, dtype=np.float32).view(np.int32)) & 0x7FFFFFFF


def _key_to_float(key: int) -> float:
    return float(np.array(key, dtype=np.int32).view(np.float32))


def _check_importance(t: torch.Tensor, name: str) -> None:
    """The one place that says what is wrong with an importance tensor (kernels only count bad elements)."""
    if not all_finite(t):
        raise NonFiniteError(f"{name} holds NaN or infinite values")
    if t.numel() and float(t.min()) < 0:
        raise InvalidInputError(f"{name} holds negative values; importances are magnitudes (>= 0)")


def _group_maps(groups, kind: str, keys: list, forget: list, names: list[str], device) -> list:
    if groups is None:
        return [None] * len(forget)
    g_kind, g_keys, maps = _layers(groups, "groups")
    if g_kind != kind or g_keys != keys:
        raise ShapeError(f"groups must have the structure of the importances ({_describe(kind, keys)}), got "
                         f"{_describe(g_kind, g_keys)}")
    checked = []
    for gmap, f, name in zip(maps, forget, names):
        if gmap is None:
            checked.append(None)
            continue
        if not isinstance(gmap, torch.Tensor):
            raise InvalidInputError(f"groups{name} must be None or an int64 tensor, got {type(gmap).__name__}")
        if gmap.dtype != torch.int64:
            raise DTypeError(f"groups{name} must be int64 group ids, got {gmap.dtype}")
        if gmap.shape != f.shape:
            raise ShapeError(f"groups{name} has shape {tuple(gmap.shape)}, the importances {tuple(f.shape)}: a "
                             "group map gives one id per element")
        if gmap.device != device:
            raise InvalidInputError(f"groups{name} is on {gmap.device}, the importances on {device}")
        if gmap.numel():
            low, high = (int(v) for v in torch.aminmax(gmap))
            if low < 0:
                raise InvalidInputError(f"groups{name} holds negative group ids")
            used = torch.bincount(gmap.reshape(-1), minlength=high + 1)
            if bool((used == 0).any()):
                missing = int(torch.nonzero(used == 0)[0])
                raise InvalidInputError(f"groups{name} does not tile the layer: ids must be 0 .. G-1 with every "
                                        f"id used, but group {missing} has no element (max id {high})")
        checked.append(gmap.contiguous())
    return checked


def _group_sums(f: torch.Tensor, r: torch.Tensor, gmap: torch.Tensor, name: str):
    _check_importance(f, f"imp_forget{name}")
    _check_importance(r, f"imp_retain{name}")
    n_groups = int(gmap.max()) + 1 if gmap.numel() else 0
    flat = gmap.reshape(-1)
    sums = []
    for t in (f, r):
        acc = torch.zeros(n_groups, dtype=torch.float64, device=t.device)
        acc.index_add_(0, flat, t.detach().reshape(-1).double())
        sums.append(acc.float())  # finite sums of finite floats can still exceed float32: checked below
    for t, arg in zip(sums, ("imp_forget", "imp_retain")):
        if not all_finite(t):
            raise NonFiniteError(f"{arg}{name}: a group's summed importance overflows float32")
    return sums[0], sums[1]


def _outputs(out, kind: str, keys: list, forget: list, names: list[str], device) -> list[torch.Tensor]:
    if out is None:
        return [torch.empty(f.shape, dtype=torch.bool, device=device) for f in forget]
    o_kind, o_keys, masks = _layers(out, "out")
    if o_kind != kind or o_keys != keys:
        raise ShapeError(f"out must have the structure of the importances ({_describe(kind, keys)}), got "
                         f"{_describe(o_kind, o_keys)}")
    for mask, f, name in zip(masks, forget, names):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise DTypeError(f"out{name} must be a bool tensor")
        if mask.shape != f.shape or mask.device != device or not mask.is_contiguous():
            raise ShapeError(f"out{name} must be a contiguous {tuple(f.shape)} tensor on {device}")
    return masks


# ---------------------------------------------------------------------------------------------------------
# Backends. Every implementation: (forget units, retain units, names, eps, k | None, hi_key | None, masks) ->
# (key of the smallest pruned score or None, pruned). Units are 1-D; masks 1-D bool, written in place.


def _keys(f: torch.Tensor, r: torch.Tensor, eps: float) -> torch.Tensor:
    """int32 keys of S = f / (r + eps) in float32 (IEEE: the same bits as the kernels)."""
    s = f.float() / (r.float() + eps)
    return s.view(torch.int32) & 0x7FFFFFFF


def dual_sensitivity_reference(forget, retain, names, eps, k, hi_key, masks):
    """Plain torch: scores of every unit at once, then a stable sort (ties keep the lower position)."""
    for f, r, name in zip(forget, retain, names):
        _check_importance(f, f"imp_forget{name}")
        _check_importance(r, f"imp_retain{name}")
    keys = [_keys(f, r, eps) for f, r in zip(forget, retain)]
    if hi_key is not None:
        pruned = 0
        for key, mask in zip(keys, masks):
            torch.gt(key, hi_key, out=mask)
            pruned += int(mask.sum())
        return None, pruned
    for mask in masks:
        mask.zero_()
    if k == 0:
        return None, 0
    flat = torch.cat(keys)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[order] = True
    start = 0
    for mask in masks:
        mask.copy_(chosen[start:start + mask.numel()])
        start += mask.numel()
    return int(flat[order[-1]]), k


class _CppKernels:
    #: the fused 256-bit mask loop where the CPU has it (AVX2 + F16C); False forces the portable loop (the same
    #: results; bench/masks.py times both)
    vectorized = True

    @staticmethod
    def histogram(f, r, eps, level, prefix, hist) -> int:
        return _cpp.call("dual_score_histogram", _cpp.as_numpy(f), _cpp.as_numpy(r), _cpp.elem_name(f.dtype), eps,
                         level, prefix, hist.numpy())

    @staticmethod
    def sample_keys(f, r, eps, starts: torch.Tensor, length: int) -> torch.Tensor:
        keys = torch.empty(starts.numel() * length, dtype=torch.int32)
        _cpp.call("dual_sample_keys", _cpp.as_numpy(f), _cpp.as_numpy(r), _cpp.elem_name(f.dtype), eps,
                  starts.numpy(), length, keys.numpy())
        return keys

    @staticmethod
    def sample_ranks(forget, retain, eps, layers, local_starts, lengths, ranks) -> list[int]:
        """The sample's keys and their order statistics in one call (the sample never leaves C++)."""
        return _cpp.call("dual_sample_ranks", [_cpp.as_numpy(forget[i]) for i in layers],
                         [_cpp.as_numpy(retain[i]) for i in layers], [_cpp.elem_name(forget[i].dtype) for i in layers],
                         eps, [np.ascontiguousarray(s, dtype=np.int64) for s in local_starts], lengths,
                         np.array(ranks, dtype=np.int64))

    @classmethod
    def select(cls, forget, retain, eps, lo, hi, k, masks, capacity):
        """The pass and the resolution in one call over every layer (candidates never leave C++)."""
        live = [i for i, f in enumerate(forget) if f.numel()]
        key, _, _, bad = _cpp.call(
            "dual_select", [_cpp.as_numpy(forget[i]) for i in live], [_cpp.as_numpy(retain[i]) for i in live],
            [_cpp.elem_name(forget[i].dtype) for i in live], eps, lo, hi, k,
            [masks[i].view(torch.uint8).numpy() for i in live], capacity, cls.vectorized)
        return (None if key < 0 else key), bad

    @classmethod
    def mask(cls, f, r, eps, lo, hi, mask, cand_index, cand_key) -> tuple[int, int, int]:
        return _cpp.call("dual_mask", _cpp.as_numpy(f), _cpp.as_numpy(r), _cpp.elem_name(f.dtype), eps, lo, hi,
                         mask.view(torch.uint8).numpy(), cand_index.numpy(), cand_key.numpy(), cls.vectorized)


class _TritonKernels:
    @classmethod
    def select(cls, forget, retain, eps, lo, hi, k, masks, capacity):
        return _select_listing(cls, forget, retain, eps, lo, hi, k, masks, capacity)

    @classmethod
    def sample_ranks(cls, forget, retain, eps, layers, local_starts, lengths, ranks) -> list[int]:
        return _sample_ranks_listing(cls, forget, retain, eps, layers, local_starts, lengths, ranks)

    @staticmethod
    def sample_keys(f, r, eps, starts: torch.Tensor, length: int) -> torch.Tensor:
        # whole blocks as rows of a sliding-window view: a copy of contiguous runs, no index per element
        starts = starts.to(f.device)
        return _keys(f.unfold(0, length, 1)[starts].reshape(-1), r.unfold(0, length, 1)[starts].reshape(-1), eps)

    @staticmethod
    def histogram(f, r, eps, level, prefix, hist):
        from erasus.kernels import dual_sensitivity as kernel

        return kernel.score_histogram(f, r, eps, level, prefix, hist)  # a device tensor: summed, read once

    @staticmethod
    def mask(f, r, eps, lo, hi, mask, cand_index, cand_key) -> tuple[int, int, int]:
        from erasus.kernels import dual_sensitivity as kernel

        counts = kernel.mask(f, r, eps, lo, hi, mask.view(torch.uint8), cand_index, cand_key)
        return tuple(int(c) for c in counts.tolist())


def _raise_for_bad(forget, retain, names) -> None:
    for f, r, name in zip(forget, retain, names):
        _check_importance(f, f"imp_forget{name}")
        _check_importance(r, f"imp_retain{name}")
    raise InvalidInputError("a kernel reported invalid importances that the checks do not find")


def _bin_of_kth(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest key, count of keys in higher bins)."""
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[b] = keys in bins >= b
    b = int(torch.nonzero(suffix >= k).max())
    return b, int(suffix[b] - hist[b])


def _radix_select(kern, forget, retain, names, eps, k, hi_key, masks):
    device = masks[0].device if masks else torch.device("cpu")
    live = [i for i, f in enumerate(forget) if f.numel()]
    no_index = torch.empty(0, dtype=torch.int64, device=device)
    no_key = torch.empty(0, dtype=torch.int32, device=device)
    if hi_key is not None:
        pruned = bad = 0
        for i in live:
            above, _, n_bad = kern.mask(forget[i], retain[i], eps, hi_key + 1, hi_key, masks[i], no_index, no_key)
            pruned, bad = pruned + above, bad + n_bad
        if bad:
            _raise_for_bad(forget, retain, names)
        return None, pruned

    n_units = sum(f.numel() for f in forget)
    if k and n_units >= SAMPLED_MIN_UNITS:
        bracket = _sampled_bracket(kern, forget, retain, eps, k, n_units, device)
        if bracket is not None:
            done = _select_in_bracket(kern, forget, retain, names, eps, k, masks, *bracket)
            if done is not None:
                return done

    hist = torch.zeros(LEVEL0_BINS, dtype=torch.int64, device=device)
    bad = sum(kern.histogram(forget[i], retain[i], eps, 0, 0, hist) for i in live)
    if int(bad):
        _raise_for_bad(forget, retain, names)
    if k == 0:
        for mask in masks:
            mask.zero_()
        return None, 0
    hist = hist.cpu()
    b, above = _bin_of_kth(hist, k)
    lo, hi, n_listed = b << 16, (b << 16) | 0xFFFF, int(hist[b])
    if n_listed > MAX_CANDIDATES:  # one more histogram pass, over the low 16 bits of that bin's keys
        low = torch.zeros(LEVEL1_BINS, dtype=torch.int64, device=device)
        for i in live:
            kern.histogram(forget[i], retain[i], eps, 1, b, low)
        low = low.cpu()
        bin_low, above_low = _bin_of_kth(low, k - above)
        above += above_low
        lo = hi = (b << 16) | bin_low
        n_listed = int(low[bin_low])
        if n_listed > MAX_CANDIDATES:  # equal scores beyond listing: mask S > t, then the first ties in chunks
            lo, n_listed = hi + 1, 0

    if lo > hi:
        _mask_pass(kern, forget, retain, eps, lo, hi, masks, 0)  # S > t, nothing listed
        _mark_first_ties(forget, retain, eps, hi, k - above, masks)
        return hi, k
    key, _ = kern.select(forget, retain, eps, lo, hi, k, masks, n_listed)  # the bin's count: always fits
    return key, k


def _sampled_bracket(kern, forget, retain, eps, k: int, n_units: int, device):
    """``(lo, hi, capacity)``: keys that likely hold the k-th largest, from the scores of SAMPLE_BLOCKS random
    blocks of units (seeded: the same inputs take the same route); None when the bracket would list more than
    MAX_CANDIDATES."""
    with one_thread(device):
        return _sampled_bracket_keys(kern, forget, retain, eps, k, n_units)


def _sampled_bracket_keys(kern, forget, retain, eps, k: int, n_units: int):
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, n_units, (SAMPLE_BLOCKS,), generator=g).numpy()
    sizes = np.array([f.numel() for f in forget], dtype=np.int64)
    ends = np.cumsum(sizes)
    layer_of = np.searchsorted(ends, starts, side="right")  # the layer each block starts in
    layers, local_starts, lengths = [], [], []
    for i in np.unique(layer_of).tolist():
        length = int(min(SAMPLE_BLOCK, sizes[i]))
        # a block that would run past its layer's end is moved back inside the layer
        local_starts.append(np.minimum(starts[layer_of == i] - (ends[i] - sizes[i]), sizes[i] - length))
        layers.append(i)
        lengths.append(length)
    m, p = sum(s.size * length for s, length in zip(local_starts, lengths)), k / n_units
    # population units each sampled score stands for, and the bracket's half-width in them
    weight = n_units / m
    half = 2 * BRACKET_SIGMAS * n_units * math.sqrt(p * (1 - p) / m) + 2 * weight
    if 2 * half > MAX_CANDIDATES:
        return None
    top, bottom = int((k - half) / weight), int(math.ceil((k + half) / weight))  # 0-based ranks, largest first
    ranks = [rank for rank in (top, bottom) if 0 <= rank < m]
    at = dict(zip(ranks, kern.sample_ranks(forget, retain, eps, layers, local_starts, lengths, ranks))) if ranks else {}
    hi = at.get(top, INF_KEY)
    lo = at.get(bottom, 0)
    return lo, hi, min(MAX_CANDIDATES, n_units)


def _sample_ranks_listing(kern, forget, retain, eps, layers, local_starts, lengths, ranks) -> list[int]:
    """``kern.sample_ranks`` from the kernel's sample keys: the keys of every layer's sampled blocks, then the
    values at ``ranks`` (0-based, largest first) by :func:`_largest_at`."""
    keys = [kern.sample_keys(forget[i], retain[i], eps, torch.from_numpy(s), length)
            for i, s, length in zip(layers, local_starts, lengths)]
    return _largest_at(torch.cat(keys).cpu().numpy(), ranks)


def _largest_at(values: np.ndarray, ranks: list[int]) -> list[int]:
    """The values at 0-based ranks (largest first) of ``values``, by a partition (linear), not a sort. The ranks
    the bracket needs are near the top, so the partition runs on the values above a threshold read off every
    16th value (a few percent of them); if that set turns out too small to hold the deepest rank, on all."""
    deepest = max(ranks)
    every = values[::16]
    if every.size > 64 and 2 * (deepest // 16) + 64 < every.size:
        rough = every.size - 1 - (2 * (deepest // 16) + 64)
        above = values[values >= np.partition(every, rough)[rough]]
        if above.size > deepest:  # every value down to the deepest rank is there: the same answers
            values = above
    positions = [values.size - 1 - rank for rank in ranks]  # ascending order
    return np.partition(values, positions)[positions].tolist()


def _select_in_bracket(kern, forget, retain, names, eps, k: int, masks, lo: int, hi: int, capacity: int):
    """One mask pass with the bracket [lo, hi]; ``(threshold key, k)`` when it holds the k-th largest key (the
    masks are then final), else None (the masks must be rewritten)."""
    key, bad = kern.select(forget, retain, eps, lo, hi, k, masks, capacity)
    if bad:
        _raise_for_bad(forget, retain, names)
    return None if key is None else (key, k)


def _select_listing(kern, forget, retain, eps, lo: int, hi: int, k: int, masks, capacity: int):
    """``kern.select`` from the kernel's mask pass: list the candidates, then choose and mark them here
    (``(threshold key | None, invalid units)``, as the C++ kernel's fused selection returns)."""
    listed, bad = _mask_pass(kern, forget, retain, eps, lo, hi, masks, capacity)
    if bad or listed is None:  # invalid units, or more candidates than listed: the bracket is too wide
        return None, bad
    above, positions, keys = listed
    if not above < k <= above + positions.numel():  # the k-th largest key is outside [lo, hi]
        return None, bad
    return _mark_candidates(positions, keys, k - above, masks), bad


def _mask_pass(kern, forget, retain, eps, lo: int, hi: int, masks, capacity: int):
    """One mask pass over every layer with the bracket [lo, hi]: ``((count above hi, candidate positions through
    the layers, their keys), invalid units)``, or ``(None, invalid units)`` once the candidates outgrow
    ``capacity`` (the pass stops there)."""
    device = masks[0].device
    cand_index = torch.empty(capacity, dtype=torch.int64, device=device)
    cand_key = torch.empty(capacity, dtype=torch.int32, device=device)
    positions, keys, start, offset, above, bad = [], [], 0, 0, 0, 0
    for i, f in enumerate(forget):
        if f.numel():
            n_above, n_cand, n_bad = kern.mask(f, retain[i], eps, lo, hi, masks[i], cand_index[offset:],
                                               cand_key[offset:])
            bad += n_bad
            if n_above < 0 or offset + n_cand > capacity:
                return None, bad
            positions.append(cand_index[offset:offset + n_cand] + start)
            keys.append(cand_key[offset:offset + n_cand])
            offset, above = offset + n_cand, above + n_above
        start += f.numel()
    with one_thread(device):
        return (above, torch.cat(positions), torch.cat(keys)), bad


def _mark_candidates(positions: torch.Tensor, keys: torch.Tensor, need: int, masks) -> int:
    with one_thread(positions.device):
        return _choose_and_mark(positions, keys, need, masks)


def _choose_and_mark(positions: torch.Tensor, keys: torch.Tensor, need: int, masks) -> int:
    """Set the masks of the ``need`` candidates with the largest keys, lower position first among equal keys;
    returns the smallest chosen key. Linear time: a selection of the need-th largest key, then a scan. CPU
    candidates go through numpy (its boolean indexing and scatter cost half of torch's at 10^5 candidates, a
    visible share of the whole op); other devices stay in torch."""
    if positions.numel() > 1 and not bool((positions[1:] > positions[:-1]).all()):
        order = torch.argsort(positions)  # the Triton pass lists candidates in no particular order
        positions, keys = positions[order], keys[order]
    threshold_key = _kth_largest(keys, need)
    if positions.device.type == "cpu":
        _mark_chosen_numpy(positions.numpy(), keys.numpy(), threshold_key, need, masks)
    else:
        _mark_chosen_torch(positions, keys, threshold_key, need, masks)
    return threshold_key


def _mark_chosen_numpy(positions: np.ndarray, keys: np.ndarray, threshold_key: int, need: int, masks) -> None:
    take = keys > threshold_key
    missing = need - int(np.count_nonzero(take))
    if missing:  # the first `missing` keys equal to the threshold, in position order
        take[np.flatnonzero(keys == threshold_key)[:missing]] = True
    chosen = positions[take]
    bounds = np.searchsorted(chosen, np.cumsum([0] + [mask.numel() for mask in masks]))
    start = 0
    for mask, lo_i, hi_i in zip(masks, bounds[:-1], bounds[1:]):
        if hi_i > lo_i:
            mask.view(-1).numpy()[chosen[lo_i:hi_i] - start] = True
        start += mask.numel()


def _mark_chosen_torch(positions: torch.Tensor, keys: torch.Tensor, threshold_key: int, need: int, masks) -> None:
    take = keys > threshold_key
    missing = need - int(take.sum())
    if missing:
        take[torch.nonzero(keys == threshold_key).flatten()[:missing]] = True
    chosen = positions[take]
    bounds = torch.searchsorted(chosen, torch.tensor([0] + [mask.numel() for mask in masks],
                                                     device=chosen.device).cumsum(0)).tolist()
    start = 0
    for mask, lo_i, hi_i in zip(masks, bounds[:-1], bounds[1:]):
        if hi_i > lo_i:
            mask.view(-1)[chosen[lo_i:hi_i] - start] = True
        start += mask.numel()


def _kth_largest(keys: torch.Tensor, k: int) -> int:
    """The k-th largest (1-based) of int32 keys, by a selection (numpy's introselect on CPU, faster than
    torch.kthvalue there)."""
    if keys.device.type == "cpu":
        return int(np.partition(keys.numpy(), keys.numel() - k)[keys.numel() - k])
    return int(torch.kthvalue(keys, keys.numel() - k + 1).values)


def _mark_first_ties(forget, retain, eps, t: int, need: int, masks) -> None:
    """Set the first ``need`` units whose key equals t (in position order); chunked, so memory stays small."""
    for f, r, mask in zip(forget, retain, masks):
        for begin in range(0, f.numel(), TIE_CHUNK):
            if need == 0:
                return
            end = min(begin + TIE_CHUNK, f.numel())
            ties = _keys(f[begin:end], r[begin:end], eps) == t
            take = ties & (ties.cumsum(0) <= need)
            mask[begin:end] |= take
            need -= int(take.sum())


def _dual_cpp(forget, retain, names, eps, k, hi_key, masks):
    return _radix_select(_CppKernels, forget, retain, names, eps, k, hi_key, masks)


def _dual_triton(forget, retain, names, eps, k, hi_key, masks):
    return _radix_select(_TritonKernels, forget, retain, names, eps, k, hi_key, masks)


DUAL_SENSITIVITY = _backend.OpTable("dual_sensitivity_mask", {"reference": dual_sensitivity_reference,
                                                              "cpp": _dual_cpp, "triton": _dual_triton})
BACKENDS = DUAL_SENSITIVITY.backends
