"""The op grid (tests/ops/grid.py): every backend of every op in erasus.ops._backend.OPS against a float64
oracle, on shapes that cross every Triton block / chunk and every OpenMP split; and the guards that keep the
grid complete (an op without a grid entry fails here)."""
import pytest
import torch

import erasus.ops
from erasus.ops import _backend

import grid


@pytest.mark.parametrize("case", grid.params())
def test_backend_matches_the_float64_oracle(case):
    reason = grid.skip_reason(case)
    if reason is not None:
        pytest.skip(reason)
    grid.run(case)


def test_every_op_has_a_grid_entry():
    missing = grid.ops_without_grid_entry()
    assert not missing, (f"ops without an entry in tests/ops/grid.py GRID: {missing}; add shapes that cross "
                         "their kernels' block boundaries and a float64 oracle")


def test_grid_has_no_entry_for_an_op_that_is_gone():
    stale = sorted(set(grid.GRID) - set(_backend.OPS))
    assert not stale, f"GRID entries for ops not in erasus.ops._backend.OPS: {stale}"


def test_a_new_op_without_grid_entry_is_reported(monkeypatch):
    before = grid.ops_without_grid_entry()
    monkeypatch.setattr(_backend, "OPS", dict(_backend.OPS))
    _backend.OpTable("grid_probe_op", {"reference": lambda x: x})  # registers itself in (the copy of) OPS
    assert grid.ops_without_grid_entry() == sorted(before + ["grid_probe_op"])
    assert not [case for case in grid.cases() if case.op == "grid_probe_op"]


def test_every_backend_of_every_op_is_in_the_parametrize_list():
    """Unavailable backends are skipped, never left out: the case list is the same on every machine."""
    listed = {(case.op, case.backend) for case in grid.cases()}
    want = {(op, backend) for op, table in _backend.OPS.items() for backend in table.backends}
    assert listed == want
    for (op, backend) in want:
        dtypes = {case.dtype for case in grid.cases() if (case.op, case.backend) == (op, backend)}
        assert dtypes == {torch.float32, torch.float16, torch.bfloat16}, (op, backend)


def test_an_unavailable_backend_is_skipped_with_the_reason_from_backends(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = next(case for case in grid.cases() if case.backend == "triton")
    if torch.cuda.is_available():
        assert grid.skip_reason(case) is None
    else:
        assert grid.skip_reason(case) == f"backend triton unavailable: {erasus.ops.backends()['triton']['reason']}"


def test_the_compiled_backend_is_built():
    """The grid skips an unavailable cpp backend; a broken build must still fail the suite, here."""
    status = erasus.ops.backends()["cpp"]
    assert status["available"], status["reason"]


def test_split_cases_run_on_several_openmp_threads():
    from erasus import _C

    if not _C.openmp:
        pytest.skip("erasus._C was built without OpenMP: the kernels run on one thread")
    with grid.openmp_threads(grid.OMP_THREADS) as threads:
        assert threads == grid.OMP_THREADS
        assert len(grid.omp_ranges(grid.OMP_N, threads)) == grid.OMP_THREADS >= 2
    assert grid.OMP_N % 2 == 1 and grid.OMP_N >= 2 * grid.OMP_ROWS


def test_block_sizes_are_read_from_the_kernel_sources():
    assert {"BLOCK_N", "BLOCK_D"} <= set(grid.KCENTER_BLOCKS) and {"BLOCK_N", "BLOCK_D"} <= set(grid.HERDING_BLOCKS)
    assert {"BLOCK", "BLOCK_T", "BLOCK_K", "BLOCK_P", "BLOCK_D"} <= set(grid.NORMS_BLOCKS)
    assert {"BLOCK_P", "BLOCK_D", "BLOCK_B", "BLOCK_T"} <= set(grid.FISHER_BLOCKS)
    assert {"kTileP", "kTileD"} <= set(grid.NORMS_CPP) and {"kTileP", "kTileD"} <= set(grid.FISHER_CPP)
    assert grid.KCENTER_BLOCKS["BLOCK_N"] == __import__("inspect").signature(
        __import__("erasus.kernels.kcenter", fromlist=["x"]).kcenter_greedy).parameters["block_n"].default
