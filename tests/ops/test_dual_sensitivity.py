"""dual_sensitivity_mask: every backend against a sort-based float64 oracle (odd sizes, several layers, groups,
ties at the threshold, every dtype, empty layers, n = 1), the radix select's rare paths (a bin too full to
list, more equal scores than can be listed), and the refusals."""
import math

import numpy as np
import pytest
import torch

import erasus.ops
from erasus import errors
from erasus.ops import dual_sensitivity as ds
from erasus.ops.dual_sensitivity import BACKENDS
from oracles import backends_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-3


def interpreted(backend):
    return backend == "triton" and erasus.ops._backend.interpreted()


def dtypes_for(backend):
    return DTYPES[:2] if interpreted(backend) else DTYPES  # the Triton interpreter has no bfloat16


def device_for(backend):
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def oracle(forget, retain, eps, ratio=None, threshold=None, groups=None):
    """From the definition, in float64: S = f / (r + eps) rounded once to float32 (double rounding of a float32
    sum or quotient through float64 is exact), then a full sort by (-S, position). Returns (masks as lists of
    bools, threshold, pruned)."""
    eps32 = float(np.float32(eps))
    units = []  # (score, position, layer, unit)
    per_layer = []
    for layer, (f, r) in enumerate(zip(forget, retain)):
        fd, rd = f.double().cpu().reshape(-1), r.double().cpu().reshape(-1)
        gmap = None if groups is None or groups[layer] is None else groups[layer].cpu().reshape(-1)
        if gmap is not None:
            n_groups = int(gmap.max()) + 1 if gmap.numel() else 0
            fd = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gmap, fd).float().double()
            rd = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, gmap, rd).float().double()
        denom = (rd + eps32).float().double()
        scores = (fd / denom).float().double().tolist()
        per_layer.append((len(scores), gmap, f.shape))
        units.extend((s, len(units), layer, j) for j, s in enumerate(scores))
    chosen = set()
    if ratio is not None:
        k = round(ratio * 10**9) * len(units) // 10**9  # ratio as a decimal, in integers
        ranked = sorted(units, key=lambda u: (-u[0], u[1]))[:k]
        chosen = {(u[2], u[3]) for u in ranked}
        value = ranked[-1][0] if ranked else math.inf
    else:
        chosen = {(u[2], u[3]) for u in units if u[0] > threshold}
        value = threshold
    masks = []
    for layer, (n_units, gmap, shape) in enumerate(per_layer):
        unit_mask = torch.tensor([(layer, j) in chosen for j in range(n_units)], dtype=torch.bool)
        masks.append((unit_mask[gmap] if gmap is not None else unit_mask).reshape(shape))
    return masks, value, len(chosen)


def layers(sizes, dtype, seed, tie_value=None):
    """Random importances of the given shapes; with tie_value, a third of the forget entries equal it and the
    matching retain entries equal 1, so many units share one score (exact in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    forget, retain = [], []
    for shape in sizes:
        f = torch.rand(shape, generator=g, dtype=torch.float64) * 4
        r = torch.rand(shape, generator=g, dtype=torch.float64) ** 2
        if tie_value is not None and f.numel():
            flat_f, flat_r = f.view(-1), r.view(-1)
            flat_f[::3], flat_r[::3] = tie_value, 1.0
        forget.append(f.to(dtype))
        retain.append(r.to(dtype))
    return forget, retain


def run(backend, forget, retain, **kw):
    device = device_for(backend)
    forget = [t.to(device) for t in forget]
    retain = [t.to(device) for t in retain]
    if kw.get("groups") is not None:
        kw["groups"] = [None if gm is None else gm.to(device) for gm in kw["groups"]]
    return erasus.ops.dual_sensitivity_mask(forget, retain, eps=EPS, backend=backend, **kw)


def assert_matches(got, want):
    masks, value, pruned = want
    assert got.pruned == pruned
    assert got.threshold == value
    assert len(got.masks) == len(masks)
    for layer, (g, w) in enumerate(zip(got.masks, masks)):
        assert g.dtype == torch.bool and g.shape == w.shape, layer
        assert torch.equal(g.cpu(), w), f"layer {layer}: {g.cpu().reshape(-1).tolist()} != {w.reshape(-1).tolist()}"


def sizes_for(backend):
    if interpreted(backend):
        return [(1,), (0,), (5, 3), (37,)]
    # odd sizes across OpenMP splits and vector tails; an empty layer in the middle
    return [(1,), (257, 3), (0, 4), (1031,), (3, 5, 7)]


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_every_backend_equals_the_sort_oracle(backend):
    for dtype in dtypes_for(backend):
        for tie in (None, 1.5):
            forget, retain = layers(sizes_for(backend), dtype, seed=3, tie_value=tie)
            for ratio in (0.001, 0.2, 0.5, 0.97):
                assert_matches(run(backend, forget, retain, ratio=ratio), oracle(forget, retain, EPS, ratio=ratio))
            for threshold in (0.0, 1.5 / (1 + float(np.float32(EPS))), 3.0):
                assert_matches(run(backend, forget, retain, threshold=threshold),
                               oracle(forget, retain, EPS, threshold=threshold))


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_ties_at_the_threshold_go_lowest_position_first_across_layers(backend):
    # every score equal: exactly k pruned, the first k positions through the layers in order
    forget = [torch.ones(3), torch.ones(0), torch.ones(2, 2)]
    retain = [torch.zeros(3), torch.zeros(0), torch.zeros(2, 2)]
    got = run(backend, forget, retain, ratio=0.6)  # k = floor(0.6 * 7) = 4
    assert got.pruned == 4 and got.threshold == float(np.float32(1 / np.float32(EPS)))
    assert got.masks[0].tolist() == [True, True, True] and got.masks[2].tolist() == [[True, False], [False, False]]
    assert_matches(got, oracle(forget, retain, EPS, ratio=0.6))


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_groups_rank_group_sums_and_broadcast_the_mask(backend):
    g = torch.Generator().manual_seed(5)
    forget = [torch.rand(6, 4, generator=g), torch.rand(5, generator=g), torch.rand(3, 3, generator=g)]
    retain = [torch.rand(6, 4, generator=g), torch.rand(5, generator=g), torch.rand(3, 3, generator=g)]
    heads = torch.arange(4).div(2, rounding_mode="floor").expand(6, 4).contiguous()  # column groups ("heads")
    rows = torch.arange(3).repeat_interleave(3).reshape(3, 3)  # row groups ("channels")
    groups = [heads, None, rows]  # the middle layer per element
    for ratio in (0.1, 0.4, 0.8):
        got = run(backend, forget, retain, ratio=ratio, groups=groups)
        assert_matches(got, oracle(forget, retain, EPS, ratio=ratio, groups=groups))
    got = run(backend, forget, retain, threshold=1.0, groups=groups)
    assert_matches(got, oracle(forget, retain, EPS, threshold=1.0, groups=groups))


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_single_element_and_all_empty(backend):
    one = run(backend, [torch.tensor([2.0])], [torch.tensor([0.0])], ratio=0.5)  # k = floor(0.5) = 0
    assert one.pruned == 0 and one.threshold == math.inf and one.masks[0].tolist() == [False]
    one = run(backend, [torch.tensor([2.0])], [torch.tensor([0.0])], threshold=0.5)
    assert one.pruned == 1 and one.masks[0].tolist() == [True]
    empty = run(backend, [torch.zeros(0, 3)], [torch.zeros(0, 3)], ratio=0.5)
    assert empty.pruned == 0 and empty.masks[0].shape == (0, 3)


@pytest.mark.parametrize("backend", [b for b in backends_for(BACKENDS) if b != "reference"])
def test_radix_select_rare_paths(backend, monkeypatch):
    """A bin too full to list (second histogram over its low 16 bits) and more equal scores than can be listed
    (masked S > t, then the first ties in chunks): forced with tiny limits, the same answer as the oracle, and
    each path is shown to run."""
    sizes = [(9,), (0,), (13, 3)] if interpreted(backend) else [(300,), (0,), (257, 5)]
    forget, retain = layers(sizes, torch.float32, seed=11, tie_value=8.0)
    scores = torch.cat([(f / (r + EPS)).reshape(-1) for f, r in zip(forget, retain)])
    above_ties = float((scores > 8.0 / (1 + EPS) * (1 + 1e-6)).double().mean())
    ran = {"level1": 0, "ties": 0}
    kernels = ds._CppKernels if backend == "cpp" else ds._TritonKernels
    histogram, mark_ties = kernels.histogram, ds._mark_first_ties

    def counting_histogram(f, r, eps, level, prefix, hist):
        ran["level1"] += level == 1
        return histogram(f, r, eps, level, prefix, hist)

    def counting_ties(*args):
        ran["ties"] += 1
        return mark_ties(*args)

    monkeypatch.setattr(kernels, "histogram", staticmethod(counting_histogram))
    monkeypatch.setattr(ds, "_mark_first_ties", counting_ties)
    monkeypatch.setattr(ds, "TIE_CHUNK", 7)
    for cap in (64, 2):
        monkeypatch.setattr(ds, "MAX_CANDIDATES", cap)
        for ratio in (0.05, round(above_ties + 0.1, 3), round(above_ties + 0.3, 3)):
            assert_matches(run(backend, forget, retain, ratio=ratio), oracle(forget, retain, EPS, ratio=ratio))
    assert ran["level1"] and ran["ties"], ran


@pytest.mark.parametrize("backend", [b for b in backends_for(BACKENDS) if b != "reference"])
def test_sampled_bracket_route_equals_the_oracle_and_falls_back_when_it_misses(backend, monkeypatch):
    """The one-pass route (a sampled bracket, checked by the mask pass) forced on small inputs: right when the
    bracket holds the k-th score, and still right (through the histogram route) when the pass finds it does
    not: more candidates than listed (ties, a small MAX_CANDIDATES), or a bracket that misses the k-th score
    (sampled for another k)."""
    outcomes = {True: 0, False: 0}
    select, bracket = ds._select_in_bracket, ds._sampled_bracket

    def recording_select(*args):
        result = select(*args)
        outcomes[result is not None] += 1
        return result

    monkeypatch.setattr(ds, "_select_in_bracket", recording_select)
    monkeypatch.setattr(ds, "SAMPLED_MIN_UNITS", 0)
    monkeypatch.setattr(ds, "SAMPLE_BLOCKS", 16)
    monkeypatch.setattr(ds, "SAMPLE_BLOCK", 5)
    wrong_k = staticmethod(lambda kern, forget, retain, eps, k, n, device: bracket(kern, forget, retain, eps,
                                                                                  max(1, k // 4), n, device))
    for cap, sample in ((1 << 21, bracket), (300, bracket), (1 << 21, wrong_k)):
        monkeypatch.setattr(ds, "MAX_CANDIDATES", cap)
        monkeypatch.setattr(ds, "_sampled_bracket", sample)
        for dtype in dtypes_for(backend):
            for tie in (None, 1.5):
                forget, retain = layers(sizes_for(backend), dtype, seed=4, tie_value=tie)
                for ratio in (0.001, 0.2, 0.5, 0.97):
                    assert_matches(run(backend, forget, retain, ratio=ratio),
                                   oracle(forget, retain, EPS, ratio=ratio))
    assert outcomes[True] and outcomes[False], outcomes


def test_structures_and_out_are_kept():
    f = {"a.weight": torch.tensor([[3.0, 0.0]]), "b.weight": torch.tensor([1.0])}
    r = {"a.weight": torch.tensor([[0.0, 0.0]]), "b.weight": torch.tensor([0.0])}
    out = {"a.weight": torch.ones(1, 2, dtype=torch.bool), "b.weight": torch.ones(1, dtype=torch.bool)}
    got = erasus.ops.dual_sensitivity_mask(f, r, eps=1.0, ratio=0.34, out=out, backend="cpp")
    assert list(got.masks) == ["a.weight", "b.weight"] and got.masks["a.weight"] is out["a.weight"]
    assert out["a.weight"].tolist() == [[True, False]] and out["b.weight"].tolist() == [False]
    single = erasus.ops.dual_sensitivity_mask(torch.tensor([1.0, 5.0]), torch.tensor([1.0, 1.0]), eps=1.0,
                                              threshold=1.0)
    assert isinstance(single, erasus.ops.DualMask) and single.masks.tolist() == [False, True]


def test_ratio_counts_units_by_its_decimal_value():
    f, r = torch.arange(100.0), torch.zeros(100)
    got = erasus.ops.dual_sensitivity_mask(f, r, eps=1.0, ratio=0.29, backend="cpp")  # 0.29 * 100 < 29 in binary
    assert got.pruned == 29 and got.masks[71:].all() and not got.masks[:71].any()


@pytest.mark.parametrize("backend", backends_for(BACKENDS))
def test_invalid_importances_are_named(backend):
    for bad, error, what in ((float("nan"), errors.NonFiniteError, "NaN"),
                             (float("inf"), errors.NonFiniteError, "NaN or infinite"),
                             (-1.0, errors.InvalidInputError, "negative")):
        f = [torch.ones(4), torch.ones(3)]
        r = [torch.ones(4), torch.ones(3)]
        r[1][2] = bad
        for kw in ({"ratio": 0.5}, {"threshold": 0.5}, {"ratio": 0.5, "groups": [None, torch.tensor([0, 0, 1])]}):
            with pytest.raises(error, match=rf"imp_retain\[1\].*{what}"):
                run(backend, f, r, **kw)


def test_bad_arguments_are_refused_by_name():
    f, r = [torch.ones(3)], [torch.ones(3)]
    call = erasus.ops.dual_sensitivity_mask
    with pytest.raises(errors.ShapeError, match=r"imp_forget\[0\] has shape \(3,\) but imp_retain\[0\]"):
        call(f, [torch.ones(4)], eps=1.0, ratio=0.5)
    with pytest.raises(errors.ShapeError, match="same structure"):
        call(f, r + r, eps=1.0, ratio=0.5)
    with pytest.raises(errors.DTypeError, match=r"imp_forget\[0\] must be float32"):
        call([torch.ones(3, dtype=torch.int32)], r, eps=1.0, ratio=0.5)
    with pytest.raises(errors.DTypeError, match="give one dtype"):
        call([torch.ones(3, dtype=torch.float16)], r, eps=1.0, ratio=0.5)
    for eps in (0.0, -1.0, float("nan"), 1e-50):
        with pytest.raises(errors.InvalidInputError, match="eps"):
            call(f, r, eps=eps, ratio=0.5)
    for ratio in (0.0, 1.0, -0.1, 1.5, True):
        with pytest.raises(errors.InvalidInputError, match="ratio must be"):
            call(f, r, eps=1.0, ratio=ratio)
    with pytest.raises(errors.InvalidInputError, match="exactly one of ratio and threshold"):
        call(f, r, eps=1.0)
    with pytest.raises(errors.InvalidInputError, match="exactly one of ratio and threshold"):
        call(f, r, eps=1.0, ratio=0.5, threshold=1.0)
    for threshold in (-1.0, float("inf")):
        with pytest.raises(errors.InvalidInputError, match="threshold must be"):
            call(f, r, eps=1.0, threshold=threshold)
    with pytest.raises(errors.InvalidInputError, match=r"groups\[0\] does not tile the layer.*group 1"):
        call(f, r, eps=1.0, ratio=0.5, groups=[torch.tensor([0, 2, 2])])
    with pytest.raises(errors.InvalidInputError, match=r"groups\[0\] holds negative"):
        call(f, r, eps=1.0, ratio=0.5, groups=[torch.tensor([0, -1, 1])])
    with pytest.raises(errors.ShapeError, match=r"groups\[0\] has shape \(2,\)"):
        call(f, r, eps=1.0, ratio=0.5, groups=[torch.tensor([0, 1])])
    with pytest.raises(errors.DTypeError, match=r"groups\[0\] must be int64"):
        call(f, r, eps=1.0, ratio=0.5, groups=[torch.tensor([0, 1, 1], dtype=torch.int32)])
    with pytest.raises(errors.DTypeError, match=r"out\[0\] must be a bool tensor"):
        call(f, r, eps=1.0, ratio=0.5, out=[torch.zeros(3)])
    with pytest.raises(errors.InvalidInputError, match="imp_forget must be a tensor"):
        call("weights", r, eps=1.0, ratio=0.5)


def test_cpp_binding_checks_its_arrays():
    from erasus.ops import _cpp

    f = torch.ones(5)
    hist = torch.zeros(100, dtype=torch.int64)
    with pytest.raises(errors.ShapeError, match="hist must be 1-D of length 32768"):
        _cpp.call("dual_score_histogram", f.numpy(), f.numpy(), "float32", 1.0, 0, 0, hist.numpy())
    with pytest.raises(errors.ShapeError, match="same length"):
        _cpp.call("dual_score_histogram", f.numpy(), torch.ones(4).numpy(), "float32", 1.0, 0, 0,
                  torch.zeros(32768, dtype=torch.int64).numpy())
    with pytest.raises(errors.DTypeError):
        _cpp.call("dual_score_histogram", f.double().numpy(), f.numpy(), "float32", 1.0, 0, 0,
                  torch.zeros(32768, dtype=torch.int64).numpy())
    small = torch.empty(1, dtype=torch.int64), torch.empty(1, dtype=torch.int32)
    # every key is a candidate, more than the buffers hold: above = -1, a count beyond the capacity (the pass
    # stops listing there), nothing written to the buffers
    small[0].fill_(-7), small[1].fill_(-7)
    above, listed, bad = _cpp.call("dual_mask", f.numpy(), f.numpy(), "float32", 1.0, 0, 0x7F7FFFFF,
                                   torch.empty(5, dtype=torch.uint8).numpy(), small[0].numpy(), small[1].numpy())
    assert (above, bad) == (-1, 0) and 1 < listed <= 5 and int(small[0]) == int(small[1]) == -7


def _binding_mask(f, r, lo, hi, vectorized, offset):
    """The C++ mask pass on a mask buffer starting ``offset`` bytes into an allocation (so the fused loop's
    scalar head and tail run): ``(above, n_candidates, n_bad, mask, candidate positions, candidate keys)``."""
    from erasus.ops import _cpp

    n = f.numel()
    mask = torch.zeros(n + 64, dtype=torch.uint8)[offset:offset + n]
    index, key = torch.zeros(n + 1, dtype=torch.int64), torch.zeros(n + 1, dtype=torch.int32)
    above, listed, bad = _cpp.call("dual_mask", _cpp.as_numpy(f), _cpp.as_numpy(r), _cpp.elem_name(f.dtype), 0.5,
                                   lo, hi, mask.numpy(), index.numpy(), key.numpy(), vectorized)
    return above, listed, bad, mask.clone(), index[:listed].clone(), key[:listed].clone()


@pytest.mark.skipif("cpp" not in backends_for(BACKENDS), reason="compiled extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpp_fused_mask_loop_equals_the_portable_loop(dtype):
    """The 256-bit mask loop (AVX2 + F16C, chosen at run time) against the portable one, bit for bit: odd
    lengths around its 32-element step, mask buffers off 32-byte alignment, brackets at and beyond the key
    range (hi above every key, lo above hi, lo = 0), exact ties, and invalid values (counted the same)."""
    from erasus import _C

    if not _C.dual_mask_vectorized_available():
        pytest.skip("this CPU has no AVX2 + F16C: only the portable loop exists here")
    g = torch.Generator().manual_seed(3)
    for n in (0, 1, 33, 95, 1031):
        for kind in ("uniform", "ties", "invalid"):
            if kind == "ties":
                f, r = (torch.randint(0, 3, (n,), generator=g).to(dtype) for _ in range(2))
            else:
                f, r = (torch.rand(n, generator=g).to(dtype) for _ in range(2))
            if kind == "invalid" and n:
                # -0.0 is valid, but its bits send the fused loop's iteration through the exact count
                f[torch.randint(0, n, (max(1, n // 40),), generator=g)] = torch.tensor(
                    [-1.0, math.nan, math.inf, -0.0])[torch.randint(0, 4, (max(1, n // 40),), generator=g)].to(dtype)
            keys = ds._keys(f, r, 0.5)
            bounds = [0, 0x3F800000, 0x7F7FFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
            bounds += [int(keys[n // 3]), int(keys[(2 * n) // 3])] if n else []
            for lo in bounds:
                for hi in bounds:
                    for offset in (0, 7):
                        fused = _binding_mask(f, r, lo, hi, True, offset)
                        portable = _binding_mask(f, r, lo, hi, False, offset)
                        context = (n, kind, hex(lo), hex(hi), offset)
                        assert fused[:3] == portable[:3], context
                        if fused[2] == 0:  # with invalid values the call fails; only the counts matter then
                            for a, b in zip(fused[3:], portable[3:]):
                                assert torch.equal(a, b), context


@pytest.mark.skipif("cpp" not in backends_for(BACKENDS), reason="compiled extension not built")
def test_cpp_fused_mask_loop_streams_long_layers_to_the_same_mask():
    """Layers of 2^22 units and more get their mask through non-temporal stores: the same mask and lists."""
    from erasus import _C

    if not _C.dual_mask_vectorized_available():
        pytest.skip("this CPU has no AVX2 + F16C: only the portable loop exists here")
    g = torch.Generator().manual_seed(4)
    n = (1 << 22) + 37
    f, r = torch.rand(n, generator=g), torch.rand(n, generator=g)
    keys = ds._keys(f[:4096], r[:4096], 0.5)
    lo, hi = int(keys.kthvalue(4000).values), int(keys.kthvalue(4090).values)
    fused, portable = _binding_mask(f, r, lo, hi, True, 3), _binding_mask(f, r, lo, hi, False, 3)
    assert fused[:3] == portable[:3] and fused[1] > 0 and fused[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(fused[3:], portable[3:]))


def test_candidate_marking_is_the_same_in_numpy_and_torch():
    """CPU candidates are marked through numpy, those of other devices through torch: the same masks (ties at
    the threshold lowest position first, across layer boundaries, none missing)."""
    g = torch.Generator().manual_seed(5)
    sizes = [7, 1, 40, 13]
    for need in (1, 5, 17, 30):
        positions = torch.sort(torch.randperm(sum(sizes), generator=g)[:31]).values
        keys = torch.randint(3, 6, (31,), generator=g, dtype=torch.int32)
        threshold = ds._kth_largest(keys, need)
        numpy_masks = [torch.zeros(s, dtype=torch.bool) for s in sizes]
        torch_masks = [torch.zeros(s, dtype=torch.bool) for s in sizes]
        ds._mark_chosen_numpy(positions.numpy(), keys.numpy(), threshold, need, numpy_masks)
        ds._mark_chosen_torch(positions, keys, threshold, need, torch_masks)
        flat = torch.cat(numpy_masks)
        want = torch.zeros(sum(sizes), dtype=torch.bool)
        order = sorted(range(31), key=lambda i: (-int(keys[i]), int(positions[i])))[:need]
        want[positions[order]] = True
        assert torch.equal(flat, want) and torch.equal(torch.cat(torch_masks), want), need


def test_small_cpu_work_runs_on_one_thread_and_restores_the_count():
    from erasus.ops._threads import SMALL_WORK_BYTES, one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread(torch.device("cpu"), SMALL_WORK_BYTES):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_thread(torch.device("cpu"), SMALL_WORK_BYTES + 1):  # large work keeps every thread
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), one_thread(torch.device("cpu")):
            raise RuntimeError("the count comes back even when the body fails")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_keys_of_every_kernel_equal_the_reference_keys(dtype):
    """The sampled bracket's scores: the C++ kernel reads its runs in place, the generic path copies them from a
    sliding-window view; both equal the reference keys of the same runs (a run may end at the last element)."""
    g = torch.Generator().manual_seed(6)
    f, r = (torch.rand(1000, generator=g).to(dtype) for _ in range(2))
    starts, length, eps = torch.tensor([0, 3, 990, 500, 3]), 10, 0.5  # eps: as the op passes it, a float32 value
    want = torch.cat([ds._keys(f[s:s + length], r[s:s + length], eps) for s in starts.tolist()])
    kernels = [ds._TritonKernels] + ([ds._CppKernels] if "cpp" in backends_for(BACKENDS) else [])
    for kern in kernels:
        assert torch.equal(kern.sample_keys(f, r, eps, starts, length), want), kern
    if "cpp" in backends_for(BACKENDS):
        with pytest.raises(errors.ShapeError, match=r"starts\[0\] = 991 puts its block outside"):
            ds._CppKernels.sample_keys(f, r, eps, torch.tensor([991]), length)


def test_largest_at_equals_a_sort_with_and_without_its_shortcut():
    rng = np.random.default_rng(7)
    for values in (rng.integers(0, 50, 100_000).astype(np.int32), rng.integers(0, 1 << 30, 300).astype(np.int32),
                   np.full(5000, 3, dtype=np.int32), rng.integers(0, 1 << 30, 70_000).astype(np.int32)):
        ranked = np.sort(values)[::-1]
        for ranks in ([0], [10, 299], [values.size - 1], [values.size // 2, 5]):
            assert ds._largest_at(values.copy(), ranks) == [int(ranked[r]) for r in ranks], (values.size, ranks)


@pytest.mark.skipif("cpp" not in backends_for(BACKENDS), reason="compiled extension not built")
def test_cpp_one_call_selection_equals_listing_and_marking_in_python():
    """The C++ selection (mask pass, candidates and their resolution in one call over every layer) against the
    same pass with the candidates listed and chosen in Python: the same threshold key and masks, or both
    unresolved, for brackets that hold the k-th key, miss it on either side, list more than the capacity, span
    the whole key range (a wide histogram of candidate keys) or one key (ties); layers of mixed dtypes, empty
    ones among them."""
    eps = float(np.float32(EPS))  # the float32 eps the op passes to its kernels
    resolved = {True: 0, False: 0}
    sizes, dtypes = [(0,), (1,), (1031,), (257, 3), (5003,)], [torch.float32, torch.float16, torch.float32,
                                                              torch.bfloat16, torch.float32]
    for tie in (None, 1.5):
        forget, retain = layers(sizes, torch.float64, seed=7, tie_value=tie)
        forget = [f.to(dt).reshape(-1) for f, dt in zip(forget, dtypes)]
        retain = [r.to(dt).reshape(-1) for r, dt in zip(retain, dtypes)]
        keys = torch.cat([ds._keys(f, r, eps) for f, r in zip(forget, retain)]).sort(descending=True).values
        n = keys.numel()
        for k in (1, 2, 17, n // 3, n - 1, n):
            brackets = [(0, ds.INF_KEY), (int(keys[k - 1]), int(keys[k - 1]))]
            for wide in (3, 40, 700):
                brackets.append((int(keys[min(n - 1, k - 1 + wide)]), int(keys[max(0, k - 1 - wide)])))
            brackets += [(int(keys[max(0, k - 3)]), ds.INF_KEY), (0, int(keys[min(n - 1, k)])) if k < n else (0, 0)]
            brackets.append((int(keys[k - 1]) + 1, int(keys[k - 1]) + 5))  # above the k-th key: a miss
            for lo, hi in brackets:
                for cap in (n, 50, 1):
                    got = [torch.zeros(f.numel(), dtype=torch.bool) for f in forget]
                    want = [torch.zeros(f.numel(), dtype=torch.bool) for f in forget]
                    key_c, bad_c = ds._CppKernels.select(forget, retain, eps, lo, hi, k, got, cap)
                    key_p, bad_p = ds._select_listing(ds._CppKernels, forget, retain, eps, lo, hi, k, want, cap)
                    context = (tie, k, hex(lo), hex(hi), cap)
                    assert (key_c, bad_c) == (key_p, bad_p), context
                    resolved[key_c is not None] += 1
                    if key_c is not None:
                        assert all(torch.equal(a, b) for a, b in zip(got, want)), context
                        assert sum(int(m.sum()) for m in got) == k and key_c == int(keys[k - 1]), context
    assert resolved[True] > 50 and resolved[False] > 50, resolved
    with pytest.raises(errors.ShapeError, match="k must be at least 1"):
        ds._CppKernels.select(forget, retain, eps, 0, 1, 0, want, 10)


@pytest.mark.skipif("cpp" not in backends_for(BACKENDS), reason="compiled extension not built")
def test_cpp_sampled_order_statistics_equal_a_sort():
    """The C++ sample (every layer's blocks scored and ranked in one call, with its shortcut through the keys
    above a rough threshold, and without it) against a sort of the same keys: ranks at the top, the bottom,
    deep ones and ties; layers of mixed dtypes."""
    g = torch.Generator().manual_seed(8)
    eps = float(np.float32(EPS))
    for tie in (None, 2.0):
        forget, retain = layers([(3001,), (2000,), (4099,)], torch.float64, seed=9, tie_value=tie)
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        forget = [t.to(dt) for t, dt in zip(forget, dtypes)]
        retain = [t.to(dt) for t, dt in zip(retain, dtypes)]
        lengths = [37, 1, 256]
        starts = [torch.randint(0, f.numel() - length + 1, (n_blocks,), generator=g).numpy()
                  for f, length, n_blocks in zip(forget, lengths, (50, 9, 30))]
        keys = torch.cat([ds._keys(f.unfold(0, length, 1)[torch.from_numpy(s)].reshape(-1),
                                   r.unfold(0, length, 1)[torch.from_numpy(s)].reshape(-1), eps)
                          for f, r, s, length in zip(forget, retain, starts, lengths)])
        ordered = keys.sort(descending=True).values.tolist()
        m = len(ordered)
        for ranks in ([0], [m - 1], [3, 70], [400, 150], [m // 2, m - 2], [5, 5]):
            got = ds._CppKernels.sample_ranks(forget, retain, eps, [0, 1, 2], starts, lengths, ranks)
            assert got == [ordered[q] for q in ranks], (tie, ranks)
    with pytest.raises(errors.ShapeError, match="ranks must lie"):
        ds._CppKernels.sample_ranks(forget, retain, eps, [0, 1, 2], starts, lengths, [m])
