"""The C++ coreset loops' code paths: teams of any size (threads), the AVX2 / portable distance loops, and 16-bit
rows widened in registers. Every path must give bit for bit the same selection as the one-thread float32 loop."""
import multiprocessing
import threading

import numpy as np
import pytest
import torch

from erasus import errors
from erasus.ops import _cpp
from oracles import herding_bruteforce, kcenter_bruteforce

# (n, d): n = 0 is refused, n = 1 the smallest; d around the kernels' 8- and 32-element blocks.
SHAPES = [(1, 1), (5, 7), (40, 9), (300, 31), (300, 32), (301, 33), (700, 40), (1100, 65)]
HALF_DTYPES = [torch.float16, torch.bfloat16]
# One thread; teams of 2 and 3 threads whatever the size (more threads than cores too); the automatic choice.
TEAMS = [{"threads": 1, "fixed_team": True}, {"threads": 2, "fixed_team": True},
         {"threads": 3, "fixed_team": True}, {"threads": 0}]


def rows(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + d)
    return torch.randn(n, d, generator=g).to(dtype).contiguous()


def kcenter(x, k, init=0, scale=1.0, prune=True, **options):
    """(indices, squared radius, per-row squared distances) from the C++ loop."""
    out, min_dist = torch.empty(k, dtype=torch.int64), torch.empty(x.shape[0])
    r2 = _cpp.call("kcenter_greedy", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), torch.tensor([init]).numpy(),
                   out.numpy(), min_dist.numpy(), scale, prune, *_options(**options))
    return out.tolist(), r2, min_dist


def herding(x, k, scale=1.0, **options):
    out = torch.empty(k, dtype=torch.int64)
    _cpp.call("herding", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), out.numpy(),
              np.empty(x.shape[0], np.uint8), scale, *_options(**options))
    return out.tolist()


def _options(threads=0, fixed_team=False, vectorized=True):
    return threads, fixed_team, vectorized


def same_kcenter(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_every_team_selects_bit_for_bit_what_one_thread_selects(dtype):
    """Chunks are claimed by whichever thread comes first and merged in row order, so the indices, the radius
    and every running minimum are those of the one-thread loop, with and without pruning; herding's mean is
    summed by row parts fixed by the shape, added in part order, so its selection does not depend on the team
    either."""
    for n, d in SHAPES + [(3000, 24)]:  # 3000 x 24: many chunks
        x = rows(n, d, dtype)
        k = min(n, 25)
        for prune in (True, False):
            alone = kcenter(x, k, prune=prune, threads=1, fixed_team=True)
            for team in TEAMS[1:]:
                assert same_kcenter(kcenter(x, k, prune=prune, **team), alone), (n, d, prune, team)
        alone = herding(x, k, threads=1, fixed_team=True)
        for team in TEAMS[1:]:
            assert herding(x, k, **team) == alone, (n, d, team)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_16bit_rows_give_exactly_the_result_of_their_float32_widening(dtype, vectorized):
    """The fused loop widens 16-bit rows in registers (vcvtph2ps for fp16, a 16-bit shift for bf16) and then does
    the float32 loop's arithmetic in the same order, on both code paths: odd d (the 8- and 32-element blocks and
    their tails), one row, and against the brute-force oracle."""
    for n, d in SHAPES:
        x = rows(n, d, dtype, seed=1)
        wide = x.float()
        k = min(n, 13)
        for team in (TEAMS[0], TEAMS[1]):
            options = dict(team, vectorized=vectorized)
            got = kcenter(x, k, **options)
            assert same_kcenter(got, kcenter(wide, k, **options)), (n, d, team)
            assert herding(x, k, **options) == herding(wide, k, **options), (n, d, team)
        if n <= 301:  # the float64 oracles, on the sizes where they are quick
            assert got[0] == kcenter_bruteforce(wide, k, [0])[0]
            assert herding(x, k, vectorized=vectorized) == herding_bruteforce(wide, k)


@pytest.mark.parametrize("vectorized", [True, False])
def test_16bit_rows_on_the_scaled_path_match_their_widening(vectorized):
    """Rows far from 1 are read times a power of two (the scaled loop): bf16 values near 2^100 scaled by 2^-100
    select exactly what the widened float32 rows select, and what the unscaled rows near 1 select."""
    base = rows(257, 37, torch.bfloat16, seed=2)
    big = (base.float() * 2.0**100).bfloat16()  # exact: a power of two
    got = kcenter(big, 20, scale=2.0**-100, vectorized=vectorized)
    assert same_kcenter(got, kcenter(big.float(), 20, scale=2.0**-100, vectorized=vectorized))
    assert same_kcenter(got, kcenter(base, 20, vectorized=vectorized))
    got = herding(big, 20, scale=2.0**-100, vectorized=vectorized)
    assert got == herding(big.float(), 20, scale=2.0**-100, vectorized=vectorized)
    assert got == herding(base, 20, vectorized=vectorized)


def test_the_vector_and_portable_loops_agree():
    """On a CPU with AVX2 + FMA + F16C the kernels use an intrinsics loop, elsewhere the portable loop; the two
    follow one arithmetic order (bit for bit where the build fuses multiply-adds, as -march=native does on such a
    CPU), so they select the same rows."""
    for dtype in (torch.float32, *HALF_DTYPES):
        x = rows(900, 45, dtype, seed=3)
        vector, portable = kcenter(x, 30), kcenter(x, 30, vectorized=False)
        assert vector[0] == portable[0]
        assert vector[1] == pytest.approx(portable[1], rel=1e-6)
        torch.testing.assert_close(vector[2], portable[2], rtol=1e-6, atol=0.0)
        assert herding(x, 30) == herding(x, 30, vectorized=False)


def test_loops_on_several_threads_at_once_share_the_helpers_safely():
    """The helper threads serve one loop at a time; loops started meanwhile on other threads (the GIL is
    released) run on their calling thread. All get the one-thread answer."""
    xs = [rows(4000, 64, seed=s) for s in range(4)]
    want = [kcenter(x, 40, threads=1, fixed_team=True) for x in xs]
    got = [None] * len(xs)

    def select(i):
        got[i] = kcenter(xs[i], 40, threads=2, fixed_team=True)

    workers = [threading.Thread(target=select, args=(i,)) for i in range(len(xs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(same_kcenter(g, w) for g, w in zip(got, want))


def _select_in_child(queue):
    queue.put(kcenter(rows(3000, 32), 30, threads=2, fixed_team=True)[0])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_starts_its_own_helpers():
    """A child forked after the parent used the helpers (as DataLoader workers are) has none of the parent's
    threads: its loops must neither wait for them nor hang."""
    want = kcenter(rows(3000, 32), 30, threads=2, fixed_team=True)[0]  # the parent's helpers now exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_select_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == want


def row_nearest_mean(x, scale=1.0, **options):
    return _cpp.call("row_nearest_mean", _cpp.as_numpy(x), _cpp.elem_name(x.dtype), scale, *_options(**options))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_row_nearest_the_mean_equals_the_float64_oracle_on_every_team_and_loop(dtype):
    """k-center's default first centre in C++: the mean summed in double by row parts (fewer parts when d is
    large: 13 at d = 40000), rows 8 at a time and column blocks of 16 with scalar tails; the same index as a
    float64 argmin, on every team, on both loops, and on rows scaled by a power of two."""
    for n, d in SHAPES + [(3000, 24), (30, 40000)]:
        x = rows(n, d, dtype, seed=4)
        xd = x.double()
        want = int(torch.argmin(((xd - xd.mean(dim=0)) ** 2).sum(dim=1)))
        for team in TEAMS:
            for vectorized in (True, False):
                assert row_nearest_mean(x, **team, vectorized=vectorized) == want, (n, d, team, vectorized)
        if dtype == torch.bfloat16:  # bf16 holds 2**100 times these rows exactly
            big = (x.float() * 2.0**100).bfloat16()
            assert row_nearest_mean(big, scale=2.0**-100) == want
    with pytest.raises(errors.ShapeError, match="at least one row"):
        row_nearest_mean(torch.empty(0, 5, dtype=dtype))
    with pytest.raises(errors.ShapeError, match="scale must be"):
        row_nearest_mean(rows(4, 3, dtype), scale=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_row_distances_are_the_selection_loops_distances_bit_for_bit(dtype):
    """row_distances (erasus.distributed's per-step kernel on CPU) against float64 (rtol 1e-5), and bitwise
    against k-center's running minima after its first centre (every row's distance to that centre), on every
    team, both loops and the scaled path; a (0, d) shard gives nothing; bad arguments are refused by name."""
    for n, d in SHAPES + [(3000, 24)]:
        x = rows(n, d, dtype, seed=5)
        centre = x[n // 2].float()
        want = ((x.double() - centre.double()) ** 2).sum(dim=1)
        _, _, first = kcenter(x, 1, init=n // 2, prune=False, threads=1, fixed_team=True)
        first[n // 2] = 0.0  # the centre itself is marked -1 there
        for team in TEAMS:
            for vectorized in (True, False):
                out = torch.full((n,), float("nan"))
                _cpp.call("row_distances", _cpp.as_numpy(x), _cpp.elem_name(dtype), centre.numpy(), out.numpy(),
                          1.0, *_options(**team, vectorized=vectorized))
                torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
                if vectorized:
                    assert torch.equal(out, first), (n, d, team)
        scaled = torch.empty(n)
        _cpp.call("row_distances", _cpp.as_numpy(x), _cpp.elem_name(dtype), (centre * 0.25).numpy(), scaled.numpy(),
                  0.25, 1, True, True)
        assert torch.equal(scaled * 16, first)  # x / 4 and c / 4: every square / 16, exactly
    empty = torch.empty(0)
    _cpp.call("row_distances", _cpp.as_numpy(torch.empty(0, 5, dtype=dtype)), _cpp.elem_name(dtype),
              torch.zeros(5).numpy(), empty.numpy(), 1.0, 0, False, True)
    with pytest.raises(errors.ShapeError, match="centre must be 1-D of length 3"):
        _cpp.call("row_distances", _cpp.as_numpy(rows(4, 3, dtype)), _cpp.elem_name(dtype), torch.zeros(4).numpy(),
                  torch.empty(4).numpy(), 1.0, 0, False, True)
    with pytest.raises(errors.ShapeError, match="out must be 1-D of length 4"):
        _cpp.call("row_distances", _cpp.as_numpy(rows(4, 3, dtype)), _cpp.elem_name(dtype), torch.zeros(3).numpy(),
                  torch.empty(5).numpy(), 1.0, 0, False, True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_an_x_larger_than_the_last_level_cache_gives_the_cached_loops_distances(dtype):
    """16-bit rows of an X larger than the last-level cache are prefetched with the non-temporal hint, those of a
    smaller one with the L1 hint: the prefetch changes the time only. The large X's distances equal bit for bit
    those of a cached slice of it (the first 300 rows) and those of its float32 widening (every row; float32 rows
    keep the hardware prefetcher), on every team and the scaled path; k-center and herding (whose mean's column
    sums prefetch alike) on the large X select what they select on its float32 widening."""
    cache = _cpp.call("last_level_cache_bytes")
    assert cache > 0
    if cache > 64 << 20:
        pytest.skip(f"a last-level cache of {cache >> 20} MiB: X would be too large for a quick test")
    d = 1000  # 31 blocks of 32, a block of 8
    n = cache // (d * torch.empty((), dtype=dtype).element_size()) + 64
    x = rows(n, d, dtype, seed=11)
    centre = x[7].float()
    small = 300  # 300 rows: a cached X
    wide = x.float()
    for scale in (1.0, 0.5):
        want, want_wide = torch.empty(small), torch.empty(n)
        _cpp.call("row_distances", _cpp.as_numpy(x[:small]), _cpp.elem_name(dtype), (centre * scale).numpy(),
                  want.numpy(), scale, 1, True, True)
        _cpp.call("row_distances", _cpp.as_numpy(wide), "float32", (centre * scale).numpy(), want_wide.numpy(),
                  scale, 1, True, True)
        for team in TEAMS:
            got = torch.empty(n)
            _cpp.call("row_distances", _cpp.as_numpy(x), _cpp.elem_name(dtype), (centre * scale).numpy(),
                      got.numpy(), scale, *_options(**team))
            assert torch.equal(got[:small], want), (scale, team)
            assert torch.equal(got, want_wide), (scale, team)
    assert same_kcenter(kcenter(x, 4, threads=2, fixed_team=True), kcenter(wide, 4, threads=2, fixed_team=True))
    assert herding(x, 3, threads=2, fixed_team=True) == herding(wide, 3, threads=2, fixed_team=True)


def kcenter_by_steps(x, k, init=0, prune=True, **options):
    """kcenter_greedy driven one _C.kcenter_step at a time, as erasus.distributed drives it on one rank."""
    n, elem = x.shape[0], _cpp.elem_name(x.dtype)
    min_dist = torch.full((n,), float("inf"))
    owner = torch.full((n,), -1, dtype=torch.int32) if prune else None
    to_centre = torch.empty(k)
    centres = torch.empty(k, x.shape[1])
    out, value = [init], None
    for step in range(k):
        centres[step] = x[out[step]].float()
        min_dist[out[step]] = -1.0
        if prune and step:
            _cpp.call("row_distances", centres[:step].numpy(), "float32", centres[step].numpy(),
                      to_centre[:step].numpy(), 1.0, 1, True, True)
        index, value = _cpp.call("kcenter_step", _cpp.as_numpy(x), elem, centres[step].numpy(), step,
                                 min_dist.numpy(), owner.numpy() if prune else None,
                                 to_centre[:step].numpy() if prune else None, 1.0, *_options(**options))
        if step + 1 < k:
            out.append(index)
    return out, max(value, 0.0), min_dist


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_one_step_at_a_time_selects_bit_for_bit_what_the_whole_loop_selects(dtype):
    """_C.kcenter_step and _C.herding_step (erasus.distributed's per-rank steps) driven from Python give the
    whole loops' indices, radius and running minima bit for bit, with and without pruning, on every team."""
    for n, d in SHAPES + [(3000, 24)]:
        x = rows(n, d, dtype, seed=6)
        k = min(n, 25)
        for prune in (True, False):
            want = kcenter(x, k, prune=prune, threads=1, fixed_team=True)
            for team in TEAMS:
                assert same_kcenter(kcenter_by_steps(x, k, prune=prune, **team), want), (n, d, prune, team)
        selected = torch.zeros(n, dtype=torch.uint8)
        xd = x.double()
        mean, chosen_sum, got = xd.sum(dim=0) / n, torch.zeros(d, dtype=torch.float64), []
        for i in range(k):
            target = ((i + 1) * mean - chosen_sum).float()
            index, value = _cpp.call("herding_step", _cpp.as_numpy(x), _cpp.elem_name(dtype), target.numpy(),
                                     selected.numpy(), 1.0, 2, True, True)
            if i == 0:  # the value returned is the kernel's distance of that row
                every = torch.empty(n)
                _cpp.call("row_distances", _cpp.as_numpy(x), _cpp.elem_name(dtype), target.numpy(), every.numpy(),
                          1.0, 1, True, True)
                assert value == float(every[index])
            got.append(index)
            selected[index] = 1
            chosen_sum += xd[index]
        assert got == herding(x, k), (n, d)
    everything = torch.ones(3, dtype=torch.uint8)
    assert _cpp.call("herding_step", _cpp.as_numpy(rows(3, 2, dtype)), _cpp.elem_name(dtype), torch.zeros(2).numpy(),
                     everything.numpy(), 1.0, 1, True, True) == (-1, float("inf"))


def test_step_arguments_are_checked_by_name():
    x, elem = rows(6, 3), "float32"
    centre, min_dist = torch.zeros(3), torch.full((6,), float("inf"))
    owner, to_centre = torch.full((6,), -1, dtype=torch.int32), torch.zeros(2)

    def step(**changes):
        args = dict(centre=centre.numpy(), step=2, min_dist=min_dist.numpy(), owner=owner.numpy(),
                    to_centre=to_centre.numpy())
        args.update(changes)
        return _cpp.call("kcenter_step", _cpp.as_numpy(x), elem, args["centre"], args["step"], args["min_dist"],
                         args["owner"], args["to_centre"], 1.0, 1, True, True)

    assert step()[0] == int((x.double() ** 2).sum(dim=1).argmax())  # the centre is 0: the longest row is farthest
    with pytest.raises(errors.ShapeError, match="centre must be 1-D of length 3"):
        step(centre=torch.zeros(4).numpy())
    with pytest.raises(errors.ShapeError, match="step must be in"):
        step(step=-1)
    with pytest.raises(errors.ShapeError, match="owner and to_centre go together"):
        step(owner=None)
    bad_owner = owner.clone()
    bad_owner[4] = 2  # to_centre holds 2 earlier centres: steps 0 and 1
    with pytest.raises(errors.ShapeError, match="owner holds a step outside"):
        step(owner=bad_owner.numpy())
    with pytest.raises(errors.DTypeError, match="owner"):
        step(owner=owner.long().numpy())
    with pytest.raises(errors.ShapeError, match="min_dist must be 1-D of length 6"):
        step(min_dist=torch.zeros(5).numpy())
    with pytest.raises(errors.ShapeError, match="selected must be 1-D of length 6"):
        _cpp.call("herding_step", _cpp.as_numpy(x), elem, centre.numpy(), torch.zeros(5, dtype=torch.uint8).numpy(),
                  1.0, 1, True, True)


@pytest.mark.parametrize("threads, fixed_team", [(-1, False), (0, True), (-2, True)])
def test_bad_thread_counts_are_refused_by_name(threads, fixed_team):
    x = rows(10, 3)
    with pytest.raises(errors.ShapeError, match="threads must be"):
        kcenter(x, 2, threads=threads, fixed_team=fixed_team)
    with pytest.raises(errors.ShapeError, match="threads must be"):
        herding(x, 2, threads=threads, fixed_team=fixed_team)


def test_no_rows_is_refused():
    with pytest.raises(errors.ShapeError, match="at least one row"):
        kcenter(torch.empty(0, 5), 1)
    with pytest.raises(errors.ShapeError, match="at least one row"):
        herding(torch.empty(0, 5, dtype=torch.float16), 1)
