"""erasus.distributed on 2 gloo processes (CPU): sharded scoring and distributed k-center / herding equal the
single-process ops. Process start-up dominates, so each spawn runs a whole battery of checks."""
import faulthandler
import pathlib
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import erasus.ops
from erasus.distributed import (RankFailedError, distributed_herding, distributed_kcenter, gather_rows,
                                shard_range, sharded_features, sharded_fisher_diagonal, sharded_grad_norms)
from erasus.errors import (BackendUnavailableError, DTypeError, InvalidInputError, NonFiniteError, ShapeError)
from erasus.selectors.features import as_loader, extract_features
from erasus.selectors.gradient import default_loss

WORLD = 2


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (read from /proc on Linux; elsewhere none are listed)."""
    tasks = pathlib.Path("/proc/self/task")
    names = []
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended while we listed it
            continue
        if "gloo" in name:
            names.append(name)
    return names


def _entry(rank, worker, init_method, args):
    faulthandler.enable(all_threads=True)  # an abort in a worker prints every thread's Python stack (CI diagnosis)
    torch.set_num_threads(1)  # 2 processes on 2 cores; and every rank scores with the threads of the oracle
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
        print(f"[rank {rank}] worker body passed", file=sys.stderr, flush=True)  # shown if the test fails
    finally:
        dist.destroy_process_group()
    # A process group that outlives destroy_process_group (something still holds it) keeps its threads, and one
    # that drops a collective's tensors while the interpreter shuts down aborts the process ("terminate called
    # without an active exception"; see the note in erasus/distributed.py): fail here, every time, instead.
    left = _gloo_threads()
    assert not left, f"rank {rank}: gloo threads {left} outlived destroy_process_group"


def _spawn(worker, tmp_path, *args):
    """Run ``worker(rank, *args)`` on WORLD gloo processes; a failed assertion on any rank fails the test."""
    mp.spawn(_entry, args=(worker, f"file://{tmp_path / 'rendezvous'}", args), nprocs=WORLD, join=True)


def _rows(x, rank, first):
    """Rank 0 holds the first ``first`` rows, rank 1 the rest (uneven on purpose; 0 rows allowed)."""
    return x[:first] if rank == 0 else x[first:]


# ------------------------------------------------------------------------------------------- k-center, herding

def _coreset_cases():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=g) * 10
    clustered = centres[torch.randint(0, 20, (1201,), generator=g)] + 0.01 * torch.randn(1201, 16, generator=g)
    distinct = torch.randn(40, 33, generator=g)  # odd width: rows start at every alignment
    duplicates = distinct[torch.randint(0, 40, (401,), generator=g)]  # every row repeated ~10 times
    return {
        "gaussian": (torch.randn(1001, 33, generator=g), 60, 333),
        "clustered": (clustered, 100, 600),
        "duplicates": (duplicates, 401, 150),  # k = n: the last 361 picks are exact ties at distance 0
        "k_equals_n": (torch.randn(37, 5, generator=g), 37, 20),
        "fp16": (torch.randn(501, 24, generator=g).half(), 40, 101),
        "bf16": (torch.randn(501, 24, generator=g).bfloat16(), 40, 400),
        "huge": (torch.randn(301, 12, generator=g) * 2.0**40, 30, 77),  # rescaled by a power of two
        "rank0_empty": (torch.randn(99, 7, generator=g), 20, 0),
    }


def _coreset_worker(rank):
    for name, (x, k, first) in _coreset_cases().items():
        shard = _rows(x, rank, first)
        got = distributed_kcenter(shard, k)
        want = erasus.ops.kcenter_greedy(x, k)
        assert got.indices.tolist() == want.indices.tolist(), f"kcenter {name}"
        torch.testing.assert_close(got.radius, want.radius, rtol=1e-6, atol=0, msg=f"kcenter radius {name}")
        assert distributed_herding(shard, k).tolist() == erasus.ops.herding(x, k).tolist(), f"herding {name}"
    x, _, first = _coreset_cases()["gaussian"]
    got = distributed_kcenter(_rows(x, rank, first), 50, metric="cosine", init=[5, 700])
    want = erasus.ops.kcenter_greedy(x, 50, metric="cosine", init=[5, 700])
    assert got.indices.tolist() == want.indices.tolist() and got.indices[:2].tolist() == [5, 700]
    torch.testing.assert_close(got.radius, want.radius, rtol=1e-6, atol=0)

    # errors: every rank raises (nobody is left waiting in a collective), and the group stays usable after
    x = torch.randn(10, 4)
    with pytest.raises(ShapeError, match="number of features"):
        distributed_kcenter(torch.randn(5, 3 + rank), 2)
    with pytest.raises(DTypeError, match="dtype"):
        distributed_herding(x[:5].half() if rank else x[:5], 2)
    with pytest.raises(InvalidInputError, match="k must satisfy"):
        distributed_kcenter(x[5 * rank:5 * rank + 5], 11)
    with pytest.raises(InvalidInputError, match="init differs"):
        distributed_kcenter(x[5 * rank:5 * rank + 5], 3, init=rank)
    with pytest.raises(NonFiniteError if rank == 1 else RankFailedError):
        distributed_kcenter(torch.full((5, 4), float("nan")) if rank == 1 else x[:5], 2)
    with pytest.raises(InvalidInputError, match="metric"):
        distributed_kcenter(x[:5], 2, metric="manhattan")
    assert distributed_kcenter(x[5 * rank:5 * rank + 5], 10).indices.sort().values.tolist() == list(range(10))

    # variable-length gathers, zero rows included; a trailing-shape mismatch is refused on every rank
    local = torch.arange(6.0).reshape(3, 2) + 10 * rank if rank == 0 else torch.empty(0)
    assert torch.equal(gather_rows(local), torch.arange(6.0).reshape(3, 2))
    assert gather_rows(torch.tensor([True, False] * (rank + 1))).tolist() == [True, False] * 3
    with pytest.raises(ShapeError, match="trailing shapes"):
        gather_rows(torch.zeros(2, 2 + rank))
    with pytest.raises(InvalidInputError, match="on rank 1 it is not a torch.Tensor"):
        gather_rows([1.0] if rank else torch.zeros(1))


def test_kcenter_and_herding_equal_the_single_process_ops(tmp_path):
    _spawn(_coreset_worker, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_ranks_distances_in_torch_equal_the_compiled_kernel_up_to_rounding(dtype):
    """A rank's per-step distances: on CPU the compiled kernel (what the 2-process test above runs), elsewhere
    torch in row blocks (CUDA; CPU without erasus._C): the same float32 direct differences, so they agree to
    float32 summation order, and both give exactly 0 for a duplicate of the vector; scaled rows too."""
    from erasus.distributed import _compiled_steps_here, _Distances
    from erasus.ops import _cpp

    assert _compiled_steps_here(torch.zeros(1, 1))  # CPU with erasus._C: the compiled steps

    g = torch.Generator().manual_seed(3)
    cases = [(0, 5, 1.0), (1, 1, 1.0), (301, 33, 1.0), (5000, 70, 0.25)]
    for n, d, scale in cases + ([(2, 600, 2.0**-40)] if dtype != torch.float16 else []):  # fp16 holds no 2**40
        x = (torch.randn(n, d, generator=g) * (1.0 if scale >= 0.25 else 2.0**40)).to(dtype)
        v = (x[n // 2].float() * scale) if n else torch.zeros(d)
        got = torch.empty(n)
        _cpp.call("row_distances", _cpp.as_numpy(x), _cpp.elem_name(dtype), v.numpy(), got.numpy(), scale, 0, False,
                  True)
        want = _Distances(x, scale).to_vector(v)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if n:
            assert got[n // 2] == 0.0 == want[n // 2]


# ------------------------------------------------------------------------------------------------- scoring

def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=101, n_positions=16, bos_token_id=100,
                        eos_token_id=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


class _TokenData(torch.utils.data.Dataset):
    """Variable-length token sequences, right-padded by ``collate`` (labels -100 on padding)."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.items = [torch.randint(1, 101, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, items):
        t = max(len(s) for s in items)
        ids = torch.zeros(len(items), t, dtype=torch.int64)
        mask = torch.zeros(len(items), t, dtype=torch.int64)
        for row, s in enumerate(items):
            ids[row, : len(s)], mask[row, : len(s)] = s, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _single_process_norms(model, data, batch_size, squared=False):
    return torch.cat([erasus.ops.grad_norms(model, default_loss, b, squared=squared)
                      for b in as_loader(data, batch_size)])


def _scoring_worker(rank):
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(53, 10, generator=g), torch.randint(0, 4, (53,), generator=g))
    mlp = _mlp()
    # per-sample values: bitwise (each sample in the same batch of 8 as in one process: 3 batches vs 4)
    assert torch.equal(sharded_grad_norms(mlp, data, batch_size=8), _single_process_norms(mlp, data, 8))
    loader = DataLoader(data, batch_size=5)  # a DataLoader's own batch size is used
    assert torch.equal(sharded_grad_norms(mlp, loader, squared=True), _single_process_norms(mlp, data, 5, True))
    features = sharded_features(data, model=mlp, batch_size=8)
    assert torch.equal(features, extract_features(data, model=mlp, batch_size=8))
    begin, end = shard_range(53, rank, WORLD, 8)
    assert torch.equal(sharded_features(data, model=mlp, batch_size=8, gather=False), features[begin:end])
    # one sample: rank 0 holds nothing, scores nothing, and still returns every row
    one = Subset(data, [7])
    assert torch.equal(sharded_grad_norms(mlp, one, batch_size=8), _single_process_norms(mlp, one, 8))
    assert sharded_features(one, model=mlp, gather=False).shape == ((0, 32) if rank == 0 else (1, 32))
    fisher_one = sharded_fisher_diagonal(mlp, one, loss_fn=default_loss)
    for name, value in erasus.ops.fisher_diagonal(mlp, as_loader(one, 8), loss_fn=default_loss).items():
        torch.testing.assert_close(fisher_one[name], value, rtol=1e-6, atol=0)
    rows = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))  # features given as a tensor
    assert torch.equal(sharded_features(rows, batch_size=2), rows)
    assert torch.equal(sharded_features(rows, batch_size=2, gather=False), rows[:2] if rank == 0 else rows[2:])
    # Fisher: per-rank float32 sums all-reduced: equal up to reassociation
    for mode in ("empirical", "batch_squared"):
        want = erasus.ops.fisher_diagonal(mlp, as_loader(data, 8), mode=mode, loss_fn=default_loss)
        got = sharded_fisher_diagonal(mlp, data, mode=mode, loss_fn=default_loss, batch_size=8)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
    logits = lambda m, b: m(b[0])  # noqa: E731
    got = sharded_fisher_diagonal(mlp, data, mode="mc", logits_fn=logits, batch_size=8, seed=3, reduction="sum")
    parts = [erasus.ops.fisher_diagonal(mlp, [b], mode="mc", logits_fn=logits, seed=3 + i, reduction="sum")
             for i, b in enumerate(as_loader(data, 8))]
    for name in got:
        torch.testing.assert_close(got[name], sum(p[name] for p in parts), rtol=1e-5, atol=1e-7)

    # a tiny GPT-2: token dicts, padding, the tied LM head
    gpt2, tokens = _tiny_gpt2(), _TokenData(11)
    assert torch.equal(sharded_grad_norms(gpt2, tokens, batch_size=4), _single_process_norms(gpt2, tokens, 4))
    assert torch.equal(sharded_features(tokens, model=gpt2, hidden_layer=-1, batch_size=4),
                       extract_features(tokens, model=gpt2, hidden_layer=-1, batch_size=4))

    # a loss that fails on one rank's samples only: that rank raises its error, the other RankFailedError
    def nan_on_late_samples(model, batch):
        loss = default_loss(model, batch)
        return loss * float("nan") if batch[0].shape[0] == 5 else loss  # the last batch (53 = 6 x 8 + 5)
    with pytest.raises(NonFiniteError if rank == 1 else RankFailedError):
        sharded_grad_norms(mlp, data, loss_fn=nan_on_late_samples, batch_size=8)
    other = _mlp() if rank == 0 else nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    with pytest.raises(InvalidInputError, match="weights differ"):
        sharded_grad_norms(other, data, batch_size=8)
    with pytest.raises(InvalidInputError, match="shuffles"):
        sharded_grad_norms(mlp, DataLoader(data, batch_size=4, shuffle=True))
    with pytest.raises(InvalidInputError, match="not a tuple"):
        sharded_grad_norms(mlp, data.tensors)


def test_sharded_scoring_equals_one_process(tmp_path):
    _spawn(_scoring_worker, tmp_path)


# --------------------------------------------------------------------------------------- single process only

def test_without_a_process_group_every_function_says_so():
    assert not dist.is_initialized()
    with pytest.raises(BackendUnavailableError, match="init_process_group"):
        distributed_kcenter(torch.randn(4, 2), 2)
    with pytest.raises(BackendUnavailableError, match="init_process_group"):
        sharded_grad_norms(_mlp(), torch.randn(4, 10))


@pytest.mark.parametrize("n,world,batch", [(0, 3, 1), (1, 4, 1), (10, 3, 1), (53, 2, 8), (7, 5, 2), (100, 8, 16)])
def test_shard_ranges_cover_every_row_once_in_order_and_in_whole_batches(n, world, batch):
    ranges = [shard_range(n, r, world, batch) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(begin % batch == 0 and begin <= end for begin, end in ranges)
    sizes = [-(-(end - begin) // batch) for begin, end in ranges]  # whole batches per rank, as even as possible
    assert max(sizes) - min(sizes) <= 1


def test_one_rank_without_pruning_room_and_under_a_float64_default_selects_what_the_op_selects(tmp_path, monkeypatch):
    """A group of one process: with no room for the pruning state (k x d float32 centres larger than the fp16
    shard and than PRUNE_MAX_BYTES) the rank reads every row and selects what kcenter_greedy selects; so it does
    under torch.set_default_dtype(torch.float64) (the running minima stay float32)."""
    import erasus.distributed as ed

    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(4)).half()
    want = erasus.ops.kcenter_greedy(x, 290, init=0).indices.tolist()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert ed._CompiledSteps(x, 1.0, 290).prune  # 64 MiB of room by default
        monkeypatch.setattr(ed._CompiledSteps, "PRUNE_MAX_BYTES", 0)
        assert not ed._CompiledSteps(x, 1.0, 290).prune  # 290 x 16 x 4 bytes > 300 x 16 x 2
        assert ed._CompiledSteps(x, 1.0, 150).prune  # 150 x 16 x 4 = the shard's 9600 bytes
        assert distributed_kcenter(x, 290, init=0).indices.tolist() == want
        monkeypatch.undo()
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            assert distributed_kcenter(x, 290, init=0).indices.tolist() == want
        finally:
            torch.set_default_dtype(default)
    finally:
        dist.destroy_process_group()
