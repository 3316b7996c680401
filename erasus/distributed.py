"""Erasus beyond one process: sharded scoring and distributed coreset selection on ``torch.distributed``.

Every function here is a collective: call it on every rank of the process group (``group=None``: the default
group that ``torchrun``, ``accelerate launch`` or ``torch.distributed.init_process_group`` set up), with the same
arguments except each rank's own shard. Gloo runs on CPU tensors, NCCL on CUDA tensors (the current device);
nothing here is a communication layer of its own.

- Scoring (``sharded_grad_norms``, ``sharded_fisher_diagonal``, ``sharded_features``): the dataset is split into
  contiguous runs of whole batches, one run per rank (:func:`shard_range`; no padding, no duplicated samples).
  Every sample is therefore scored in exactly the batch it would be in one process with the same
  ``batch_size``, so per-sample values (grad norms, features) are **bitwise** those of one process on the same
  torch build and thread count, gathered in the original order. Fisher sums are all-reduced (SUM) and then
  normalised as :func:`erasus.ops.fisher_diagonal` does: equal to one process **up to float reassociation** of
  the per-rank float32 sums.
- Selection (``distributed_kcenter``, ``distributed_herding``): each rank holds a block of rows of X, in rank
  order (rank 0 the first rows). Per step, one all-reduce of a packed (distance, global index) int64 key and one
  broadcast of the chosen row from its owner; the distances are those of the compiled backends (float32 direct
  differences ``sum_t (x_t * scale - c_t)^2``, the same power-of-two ``scale``), ties to the lowest global row
  index. So the indices equal :func:`erasus.ops.kcenter_greedy` / :func:`erasus.ops.herding` on the whole X,
  exactly on ties (duplicated rows), and everywhere else unless two distances differ only by float32 rounding
  -- the same guarantee the op's own backends give each other.

If one rank fails (bad input, a NaN loss), every rank raises instead of waiting forever: the failing rank its own
error, the others :class:`RankFailedError`. Inputs that must agree across ranks (feature width, dtype, ``k``,
``init``, the model's weights) are checked, and a mismatch raises the same error on every rank.

Example (a group of one process; under ``torchrun`` each rank passes its own block of rows):
    >>> import tempfile, torch, torch.distributed as dist
    >>> from erasus.distributed import distributed_kcenter
    >>> dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]])
    >>> distributed_kcenter(x, 2, init=0).indices.tolist()
    [0, 3]
    >>> dist.destroy_process_group()
"""
from __future__ import annotations

import struct
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset

from erasus import ops
from erasus._device import model_device, to_device
from erasus.errors import (BackendUnavailableError, DTypeError, EmptyInputError, ErasusError, InvalidInputError,
                           NonFiniteError, ShapeError)
import erasus._process_group_guard  # noqa: F401  (before any process group: see that module)
from erasus.ops import _backend, _cpp
from erasus.ops._magnitude import coreset_exponent
from erasus.ops._validate import FLOAT_DTYPES, all_finite, check_indices, check_k, max_abs
from erasus.ops.fisher import MODES as FISHER_MODES
from erasus.ops.kcenter import METRICS, KCenterResult, _unit_rows
from erasus.selectors.features import check_feature_source, collate_of, extract_features, sample_count
from erasus.selectors.gradient import default_loss


class RankFailedError(ErasusError, RuntimeError):
    """Another rank of the process group failed in a collective Erasus call; its own error is on its output."""


# --------------------------------------------------------------------------------------------- process groups

class _Group(NamedTuple):
    handle: object  # the ProcessGroup (None: the default group)
    rank: int
    world: int
    device: torch.device  # where collectives take their tensors: CPU for gloo, the current GPU for NCCL


def _group(group) -> _Group:
    if not (dist.is_available() and dist.is_initialized()):
        raise BackendUnavailableError("torch.distributed has no process group: call "
                                      "torch.distributed.init_process_group (torchrun and accelerate launch do) "
                                      "before a distributed Erasus function")
    if dist.get_rank(group) < 0:
        raise InvalidInputError("group: this process is not a member of the process group it was given")
    nccl = str(dist.get_backend(group)) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return _Group(group, dist.get_rank(group), dist.get_world_size(group), device)


def shard_range(n: int, rank: int, world_size: int, batch_size: int = 1) -> tuple[int, int]:
    """``(begin, end)``: the rows of ``n`` that rank ``rank`` of ``world_size`` holds -- contiguous runs of whole
    batches of ``batch_size`` rows, as even as whole batches allow, in rank order, without padding or repeats.

    Example:
        >>> [shard_range(10, r, 2, batch_size=4) for r in range(2)]
        [(0, 4), (4, 10)]
        >>> [shard_range(5, r, 2) for r in range(2)]
        [(0, 2), (2, 5)]
    """
    batches = -(-n // batch_size)
    first, stop = batches * rank // world_size, batches * (rank + 1) // world_size
    return min(first * batch_size, n), min(stop * batch_size, n)


def _raise_together(error: BaseException | None, g: _Group, what: str) -> None:
    """One all-reduce of every rank's status: if any rank failed, every rank raises (no rank is left waiting in a
    later collective). The failing rank re-raises its own error."""
    status = torch.zeros(g.world, dtype=torch.int64, device=g.device)
    status[g.rank] = 0 if error is None else 1
    dist.all_reduce(status, group=g.handle)
    if error is not None:
        raise error
    failed = status.nonzero().flatten().tolist()
    if failed:
        raise RankFailedError(f"{what} failed on rank(s) {failed} of the process group (their error is in their "
                              "output); every rank stops")


def _local(fn: Callable, g: _Group, what: str):
    try:
        result, error = fn(), None
    except Exception as exc:  # re-raised on this rank by _raise_together, after telling the others
        result, error = None, exc
    _raise_together(error, g, what)
    return result


def _agree(values: list[float], g: _Group) -> torch.Tensor:
    """(world, len(values)) float64: every rank's ``values`` (small integers and floats, exact in float64)."""
    mine = torch.tensor(values, dtype=torch.float64, device=g.device)
    rows = [torch.empty_like(mine) for _ in range(g.world)]
    dist.all_gather(rows, mine, group=g.handle)
    return torch.stack(rows).cpu()


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 6


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``local`` (m_r, ...) along dim 0 in rank order, on every rank (a collective).

    Ranks may hold different numbers of rows, zero included: the row counts are gathered first, each block padded
    to the largest, gathered, and trimmed. The trailing shape and dtype must agree across the ranks that hold rows
    (a 1-D empty tensor stands for "no rows" on any rank). Values are moved, never changed (bitwise). The result
    is on ``local.device``.
    """
    g = _group(group)
    rows, trailing, dtype = _agree_on_rows(local, g, "local")
    if local.shape[0] == 0:
        local = torch.empty((0, *trailing), dtype=dtype, device=local.device)
    wire = local.to(torch.uint8) if dtype == torch.bool else local  # gloo moves no bool tensors
    padded = torch.zeros((max(rows), *trailing), dtype=wire.dtype, device=g.device)
    padded[: local.shape[0]] = wire.to(g.device)
    blocks = [torch.empty_like(padded) for _ in range(g.world)]
    dist.all_gather(blocks, padded, group=g.handle)
    out = torch.cat([block[:m] for block, m in zip(blocks, rows)])
    return out.to(device=local.device, dtype=dtype)


_GATHER_PROBLEMS = ("", "is not a torch.Tensor", f"must have 1 to {_MAX_DIMS} dimensions",
                    "has a dtype that cannot be gathered")


def _agree_on_rows(local, g: _Group, name: str) -> tuple[list[int], tuple[int, ...], torch.dtype]:
    """Row counts of every rank, and the trailing shape and dtype that the ranks holding rows share. Checked
    together (one all-gather): a problem on any rank raises the same error on every rank."""
    problem = (1 if not isinstance(local, torch.Tensor) else 2 if not 1 <= local.dim() <= _MAX_DIMS
               else 3 if local.dtype not in _DTYPES else 0)
    if problem:
        meta = _agree([problem] + [-1] * (_MAX_DIMS + 2), g).long().tolist()
    else:
        shape = list(local.shape[1:]) + [-1] * (_MAX_DIMS - local.dim())
        meta = _agree([0, local.shape[0], local.dim(), _DTYPES.index(local.dtype), *shape], g).long().tolist()
    failed = [(r, m[0]) for r, m in enumerate(meta) if m[0]]
    if failed:
        what = "; ".join(f"on rank {r} it {_GATHER_PROBLEMS[c]}" for r, c in failed)
        error = {1: InvalidInputError, 2: ShapeError, 3: DTypeError}[failed[0][1]]
        raise error(f"{name}: {what}")
    rows = [m[1] for m in meta]
    holders = [m for m in meta if m[1] > 0] or meta[:1]
    first = holders[0]
    if any(m[2:] != first[2:] for m in holders):
        if any(m[3] != first[3] for m in holders):
            raise DTypeError(f"{name} has different dtypes on different ranks: "
                             f"{[str(_DTYPES[m[3]]) for m in meta]}")
        raise ShapeError(f"{name} has different trailing shapes on different ranks: "
                         f"{[tuple(v for v in m[4:] if v >= 0) for m in meta]}")
    trailing = tuple(first[4:4 + first[2] - 1])
    return rows, trailing, _DTYPES[first[3]]


# ------------------------------------------------------------------------------------------------ scoring

def _batch_size(data, batch_size) -> int:
    if isinstance(data, tuple):  # its len() is 2, not the number of samples
        raise InvalidInputError("data: pass a Dataset (e.g. TensorDataset(inputs, labels)), a DataLoader or a tensor, "
                                "not a tuple")
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset) or data.batch_size is None:
            raise InvalidInputError("data: a DataLoader over an IterableDataset or with a custom batch_sampler "
                                    "cannot be split by index; pass the Dataset")
        if not isinstance(data.sampler, SequentialSampler) or data.drop_last:
            raise InvalidInputError("data: the DataLoader shuffles, uses a custom sampler or drops its last batch, "
                                    "so indices would not match the dataset; pass the Dataset or a DataLoader "
                                    "with shuffle=False and drop_last=False")
        return int(data.batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _local_data(data, begin: int, end: int, batch_size: int):
    """This rank's rows of ``data`` as something that batches exactly like the whole of ``data`` does."""
    if isinstance(data, torch.Tensor):
        return data[begin:end]
    if isinstance(data, DataLoader):
        return DataLoader(Subset(data.dataset, range(begin, end)), batch_size=batch_size, shuffle=False,
                          collate_fn=data.collate_fn, num_workers=data.num_workers, pin_memory=data.pin_memory)
    return Subset(data, range(begin, end))


def _local_batches(data, begin: int, end: int, batch_size: int):
    local = _local_data(data, begin, end, batch_size)
    if isinstance(local, torch.Tensor):
        return local.split(batch_size)
    if isinstance(local, DataLoader):
        return local
    return DataLoader(local, batch_size=batch_size, shuffle=False, collate_fn=collate_of(data))


def _check_same_weights(params: list[torch.Tensor], g: _Group) -> None:
    """The model must hold the same weights on every rank (as under DDP): compare a float64 digest (count, sum,
    sum of squares), with a tolerance for summation order (ranks may run with different thread counts)."""
    params = [p.detach() for p in params]
    digest = [float(len(params)), float(sum(p.numel() for p in params)),
              float(sum(torch.sum(p, dtype=torch.float64) for p in params)) if params else 0.0,
              float(sum(torch.linalg.vector_norm(p, dtype=torch.float64) ** 2 for p in params)) if params else 0.0]
    table = _agree(digest, g)
    spread = table.max(dim=0).values - table.min(dim=0).values
    tolerance = 1e-6 * (1 + table[:, 2:].abs().max(dim=0).values)
    if bool(spread[:2].any()) or bool((spread[2:] > tolerance).any()):
        raise InvalidInputError("model: the weights differ across ranks (build or load the same model on every "
                                "rank, e.g. from the same seed or checkpoint)")


def sharded_grad_norms(model: nn.Module, data, *, loss_fn: Callable | None = None, batch_size: int = 256,
                       squared: bool = False, backend: str | None = None, fallback: bool = False,
                       group=None) -> torch.Tensor:
    """Per-sample gradient norms of the whole ``data``, each rank scoring its shard (a collective).

    Rank r runs :func:`erasus.ops.grad_norms` on its batches (:func:`shard_range` with ``batch_size``); the
    scores are gathered in the original order. The result equals, bit for bit, what one process gets from
    ``torch.cat([erasus.ops.grad_norms(model, loss_fn, b) for b in batches of data])`` with the same batches
    (every sample sits in the same batch either way). Does not mutate the model (weights, ``.grad`` and mode are
    left as they were; it runs in the model's current mode, so call ``model.eval()`` to score without dropout).

    Args:
        model: the same model on every rank (checked), on any device.
        data: a tensor of inputs, a Dataset, or a DataLoader that keeps order (its own batch size is used).
        loss_fn: ``loss_fn(model, batch) -> (B,)``; default: cross-entropy / a causal LM's token-mean NLL
            (:func:`erasus.selectors.gradient.default_loss`).
        batch_size, squared, backend, fallback: as in :func:`erasus.ops.grad_norms`.
        group: the process group (default: the default group).

    Returns:
        float32 (n,) on the model's device, the same on every rank.
    """
    g = _group(group)
    n = sample_count(data)
    batch_size = _batch_size(data, batch_size)
    begin, end = shard_range(n, g.rank, g.world, batch_size)
    loss_fn = loss_fn or default_loss
    device = model_device(model)
    _check_same_weights([p for p in model.parameters() if p.requires_grad], g)

    def score_shard() -> torch.Tensor:
        parts = [ops.grad_norms(model, loss_fn, to_device(batch, device), squared=squared, backend=backend,
                                fallback=fallback) for batch in _local_batches(data, begin, end, batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, device=device)

    scores = _local(score_shard, g, "sharded_grad_norms")
    out = gather_rows(scores, group)
    if out.shape != (n,):
        raise ShapeError(f"got {out.shape[0]} scores but data holds {n} samples (loss_fn must return one loss per "
                         "sample)")
    return out


def sharded_fisher_diagonal(model: nn.Module, data, *, mode: str = "empirical", loss_fn: Callable | None = None,
                            logits_fn: Callable | None = None, reduction: str = "mean", seed: int = 0,
                            batch_size: int = 256, backend: str | None = None, fallback: bool = False,
                            group=None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``data``, each rank summing over its shard of batches, then one all-reduce (SUM) and
    the normalisation of :func:`erasus.ops.fisher_diagonal` (a collective; every rank gets the result).

    Equals ``erasus.ops.fisher_diagonal(model, batches of data, ...)`` in one process up to float reassociation
    (the per-rank float32 sums are added in a different order). ``reduction="mean"`` divides by the number of
    samples (``empirical``, ``mc``) or of batches (``batch_squared``) of the whole ``data``. ``mode="mc"`` draws
    each batch's labels with its own generator, seeded ``seed + global batch index``, so the result does not
    depend on the number of ranks (one process's ``fisher_diagonal(mode="mc")`` draws from one stream instead,
    and differs by the sampling). Does not mutate the model.

    Args:
        model: the same model on every rank (checked).
        data: a tensor of inputs, a Dataset, or a DataLoader that keeps order (its own batch size is used).
        mode, loss_fn, logits_fn, reduction, backend, fallback: as in :func:`erasus.ops.fisher_diagonal`.
        seed: base seed of ``mode="mc"``.
        group: the process group (default: the default group).

    Returns:
        ``{parameter name: float32 tensor}`` for every trainable parameter, the same on every rank.
    """
    if mode not in FISHER_MODES:
        raise InvalidInputError(f"mode must be one of {FISHER_MODES}, got {mode!r}")
    if reduction not in ("mean", "sum"):
        raise InvalidInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    g = _group(group)
    n = sample_count(data)
    batch_size = _batch_size(data, batch_size)
    begin, end = shard_range(n, g.rank, g.world, batch_size)
    first_batch = begin // batch_size
    _check_same_weights([p for p in model.parameters() if p.requires_grad], g)
    options = dict(mode=mode, loss_fn=loss_fn, logits_fn=logits_fn, reduction="sum", backend=backend,
                   fallback=fallback)

    def sum_shard() -> dict[str, torch.Tensor]:
        batches = _local_batches(data, begin, end, batch_size)
        if end == begin:  # no batch here: this rank adds zeros, after the op's own argument checks
            try:
                ops.fisher_diagonal(model, [], **options)
            except EmptyInputError:  # "no batches": the arguments passed
                return {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()
                        if p.requires_grad}
        if mode != "mc":
            return ops.fisher_diagonal(model, batches, **options)
        total = None
        for offset, batch in enumerate(batches):
            part = ops.fisher_diagonal(model, [batch], seed=seed + first_batch + offset, **options)
            total = part if total is None else {name: total[name] + value for name, value in part.items()}
        return total

    sums = _local(sum_shard, g, "sharded_fisher_diagonal")
    _all_reduce_sum(list(sums.values()), g)
    if reduction == "mean":
        count = -(-n // batch_size) if mode == "batch_squared" else n
        for value in sums.values():
            value /= count
    for name, value in sums.items():
        if not all_finite(value):
            raise NonFiniteError(f"the Fisher of {name} overflows float32 (a squared gradient above 3.4e38) "
                                 "although the losses and gradients are finite; scale the loss down")
    return sums


_BUCKET_ELEMENTS = 1 << 25  # 128 MiB of float32 per all-reduce: few collectives, bounded extra memory


def _all_reduce_sum(tensors: list[torch.Tensor], g: _Group) -> None:
    """In-place SUM of each tensor across ranks, packed into flat buckets (one collective per bucket)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors + [None]:
        if t is not None and size + t.numel() <= _BUCKET_ELEMENTS or (t is not None and not bucket):
            bucket.append(t)
            size += t.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket]).to(g.device)
            dist.all_reduce(flat, group=g.handle)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.reshape(b.shape))
        bucket, size = ([t], t.numel()) if t is not None else ([], 0)


def sharded_features(data, *, model: nn.Module | None = None, embed: Callable | None = None,
                     layer: str | None = None, hidden_layer: int | None = None, pooling: str = "mean",
                     batch_size: int = 256, gather: bool = True, group=None) -> torch.Tensor:
    """Selector features (:func:`erasus.selectors.extract_features`) of ``data``, each rank embedding its shard
    (a collective). Each sample is embedded in the same batch as in one process, so the rows are bitwise those
    of ``extract_features(data, ...)``. The model runs in eval mode under no_grad; it is not changed.

    ``gather=True`` returns the (n, d) features on every rank in the original order; ``gather=False`` returns only
    this rank's rows (``shard_range(n, rank, world_size, batch_size)``) -- exactly the ``x_shard`` that
    :func:`distributed_kcenter` and :func:`distributed_herding` take, so features never need to meet on one rank.
    A 2-D feature tensor without ``model``/``embed`` is split (or returned) as it is.
    """
    check_feature_source(embed=embed, layer=layer, hidden_layer=hidden_layer, pooling=pooling)
    g = _group(group)
    n = sample_count(data)
    batch_size = _batch_size(data, batch_size)
    begin, end = shard_range(n, g.rank, g.world, batch_size)
    if model is not None:  # features come from frozen weights just as well: compare all of them
        _check_same_weights(list(model.parameters()), g)

    def embed_shard() -> torch.Tensor:
        if end == begin:
            return torch.empty(0)
        local = _local_data(data, begin, end, batch_size)
        return extract_features(local, model=model, embed=embed, layer=layer, hidden_layer=hidden_layer,
                                pooling=pooling, batch_size=batch_size)

    local = _local(embed_shard, g, "sharded_features")
    if gather:
        return gather_rows(local, group)
    _, trailing, dtype = _agree_on_rows(local, g, "features")
    return local if local.shape[0] else torch.empty((0, *trailing), dtype=dtype)


# ---------------------------------------------------------------------------------------- coreset selection

_INPUT_PROBLEMS = ("", "is not a torch.Tensor", "is not 2-D", "is not float32, float16 or bfloat16",
                   "has no features (0 columns)", "holds NaN or infinite values", "has an all-zero row (cosine)")
_INDEX_BITS = 32  # a global row index travels in the low 32 bits of the packed key
_NO_CANDIDATE_MAX = -1
_NO_CANDIDATE_MIN = (1 << 63) - 1


class _Shard(NamedTuple):
    x: torch.Tensor  # validated rows of this rank (cosine: unit rows), contiguous
    offset: int  # global index of its first row
    ends: list[int]  # exclusive end of every rank's rows, in rank order
    n: int
    scale: float  # power of two applied to every row (erasus.ops._magnitude.coreset_exponent of the global max)
    exponent: int


def _input_problem(x, unit_rows: bool) -> tuple[int, Exception | None]:
    """(code, error) of what is wrong with a rank's shard; (0, None) when nothing is."""
    if not isinstance(x, torch.Tensor):
        return 1, InvalidInputError(f"x_shard must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        return 2, ShapeError(f"x_shard must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        return 3, DTypeError(f"x_shard must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] == 0:
        return 4, EmptyInputError(f"x_shard has no features (shape {tuple(x.shape)})")
    if not all_finite(x):
        return 5, NonFiniteError("x_shard holds NaN or infinite values")
    if unit_rows and x.shape[0] and bool((torch.linalg.vector_norm(x.double(), dim=1) == 0).any()):
        return 6, InvalidInputError("x_shard has an all-zero row, which has no cosine distance; use metric='l2'")
    return 0, None


def _prepare_shard(x_shard, k, g: _Group, *, metric: str = "l2", init=None) -> tuple[_Shard, int, torch.Tensor | None]:
    """Check every rank's shard and arguments together (one all-gather; every rank raises the same error on a
    mismatch), and agree on the row layout and the global power-of-two scale."""
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {METRICS}, got {metric!r}")
    code, error = _input_problem(x_shard, metric == "cosine")
    x = None
    if error is None:
        x = x_shard.detach().contiguous()
        if metric == "cosine" and x.shape[0]:
            x = _unit_rows(x)
    k_value = float(k) if isinstance(k, int) and not isinstance(k, bool) else float("nan")
    init_count = 0.0 if init is None else float(torch.as_tensor(init).numel())
    meta = _agree([code, x.shape[0] if x is not None else 0, x.shape[1] if x is not None else 0,
                   FLOAT_DTYPES.index(x.dtype) if x is not None else -1, max_abs(x) if x is not None else 0.0,
                   k_value, METRICS.index(metric), init_count], g)
    failed = [(r, int(c)) for r, c in enumerate(meta[:, 0].tolist()) if c]
    if error is not None:
        raise error
    if failed:
        raise RankFailedError("x_shard " + "; ".join(f"on rank {r} {_INPUT_PROBLEMS[c]}" for r, c in failed))
    _same_on_every_rank(meta, 2, "x_shard's number of features", ShapeError)
    _same_on_every_rank(meta, 3, "x_shard's dtype", DTypeError, lambda v: str(FLOAT_DTYPES[int(v)]))
    _same_on_every_rank(meta, 5, "k")
    _same_on_every_rank(meta, 6, "metric", lambda_=lambda v: METRICS[int(v)])
    _same_on_every_rank(meta, 7, "the number of init indices")
    rows = meta[:, 1].long().tolist()
    n = sum(rows)
    if n == 0:
        raise EmptyInputError("x_shard has no rows on any rank")
    if n >= 1 << _INDEX_BITS:
        raise InvalidInputError(f"x_shard: {n} rows in all exceed the 2**{_INDEX_BITS} rows a step's key can index")
    k = check_k(k, n)
    ends = torch.tensor(rows).cumsum(0).tolist()
    exponent = coreset_exponent(float(meta[:, 4].max()))
    shard = _Shard(x, ends[g.rank] - rows[g.rank], ends, n, 2.0 ** -exponent, exponent)
    init_idx = None
    if init is not None:
        init_idx = check_indices(init, n, "init")
        if init_idx.numel() > k:
            raise InvalidInputError(f"init holds {init_idx.numel()} indices but k = {k}")
        low, high = init_idx.to(g.device, copy=True), init_idx.to(g.device, copy=True)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=g.handle)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=g.handle)
        if not (torch.equal(low.cpu(), init_idx) and torch.equal(high.cpu(), init_idx)):
            raise InvalidInputError("init differs across ranks; pass the same global indices on every rank")
    return shard, k, init_idx


def _same_on_every_rank(meta: torch.Tensor, column: int, what: str, error=InvalidInputError, lambda_=None) -> None:
    values = meta[:, column].tolist()
    if any(v != values[0] and not (v != v and values[0] != values[0]) for v in values):
        shown = [lambda_(v) if lambda_ else v for v in values]
        raise error(f"{what} differs across ranks: {shown} (rank order); every rank must pass the same")


def _row_blocks(x: torch.Tensor) -> range:
    # about 1 MiB of float32 per block: the difference block stays in cache between its three passes
    return range(0, x.shape[0], max(1, (1 << 18) // max(1, x.shape[1])))


def _compiled_steps_here(x: torch.Tensor) -> bool:
    """Whether a rank's steps run in the compiled op's own steps (CPU rows, erasus._C built); else in torch."""
    return x.device.type == "cpu" and _backend._probe("cpp")[0]


class _Distances:
    """Squared distances of a shard's rows to one vector in torch, ``sum_t (x_t * scale - v_t)^2`` in float32 --
    the arithmetic of the compiled backends (direct differences, so a duplicate of the vector is exactly 0, and
    duplicated rows get bitwise equal distances) -- one cache-sized block of rows at a time: the path where the
    compiled steps cannot run (GPUs; CPU without erasus._C)."""

    def __init__(self, x: torch.Tensor, scale: float):
        self.x, self.scale = x, scale
        self.blocks = _row_blocks(x)
        self.step = self.blocks.step
        self.work = torch.empty(min(self.step, x.shape[0]), x.shape[1], dtype=torch.float32, device=x.device)
        self.out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)

    def to_vector(self, v: torch.Tensor) -> torch.Tensor:
        for start in self.blocks:
            rows = self.x[start:start + self.step]
            work = self.work[: rows.shape[0]]
            if rows.dtype == torch.float32 and self.scale == 1.0:
                torch.sub(rows, v, out=work)
            else:
                work.copy_(rows)
                if self.scale != 1.0:
                    work.mul_(self.scale)  # exact: a power of two
                work.sub_(v)
            work.square_()
            torch.sum(work, dim=1, out=self.out[start:start + rows.shape[0]])
        return self.out


class _CompiledSteps:
    """A rank's k-center steps in the compiled op's own step (``_C.kcenter_step``, on torch's threads): the running
    minima updated against the new centre and the rank's farthest row, in one call, with the op's exact pruning
    by the triangle inequality (a row at squared distance m from its nearest centre a is not read when
    ||c - a||^2 >= 4 m: it cannot come closer; the selection is the one without pruning). To prune, each rank
    keeps the centres' rows it received (k x d float32) and the step of every row's nearest centre, and measures
    each new centre to the earlier ones (O(k d) per step): only while those rows take no more memory than the
    shard itself or PRUNE_MAX_BYTES, so that the extra memory stays O(rows) and that work small beside a step."""

    PRUNE_MAX_BYTES = 64 << 20

    def __init__(self, x: torch.Tensor, scale: float, k: int):
        self.x, self.scale = x, scale
        self.prune = k * x.shape[1] * 4 <= max(x.numel() * x.element_size(), self.PRUNE_MAX_BYTES)
        self.centres = torch.empty(k if self.prune else 1, x.shape[1], dtype=torch.float32)
        self.to_centre = torch.empty(k if self.prune else 0, dtype=torch.float32)
        # the step of each row's nearest centre
        self.owner = torch.full((x.shape[0] if self.prune else 0,), -1, dtype=torch.int32)

    def step(self, min_dist: torch.Tensor, row: torch.Tensor, step: int) -> tuple[float, int]:
        """min_dist (and the owners) updated in place against centre ``row`` (scaled float32) of ``step``; returns
        this rank's farthest (min_dist, local index), (-2.0, -1) without rows."""
        slot = step if self.prune else 0
        self.centres[slot] = row
        to_centre = self.to_centre[:step]
        if self.prune and step:  # the earlier centres' squared distances to this one, by the same kernel
            _cpp.call("row_distances", self.centres[:step].numpy(), "float32", self.centres[step].numpy(),
                      to_centre.numpy(), 1.0, torch.get_num_threads(), False, True)
        index, value = _cpp.call("kcenter_step", _cpp.as_numpy(self.x), _cpp.elem_name(self.x.dtype),
                                 self.centres[slot].numpy(), step, min_dist.numpy(),
                                 self.owner.numpy() if self.prune else None,
                                 to_centre.numpy() if self.prune else None, self.scale, torch.get_num_threads(),
                                 False, True)
        return value, index


def _float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _reduce_key(key: int, op, g: _Group) -> int:
    t = torch.tensor([key], dtype=torch.int64, device=g.device)
    dist.all_reduce(t, op=op, group=g.handle)
    return int(t.item())


def _farthest(values: torch.Tensor, offset: int, g: _Group) -> tuple[float, int]:
    """Global (max value, lowest global index holding it) over every rank's ``values`` >= 0, by one all-reduce
    MAX of ``float32 bits << 32 | (2**32 - 1 - index)``: non-negative float32 bits order as integers, and the
    inverted index makes the lowest index win among equal values. (-1.0, -1) when no value is >= 0."""
    if values.numel():
        j = int(torch.argmax(values))  # the first maximum: the lowest local index
        return _farthest_key(float(values[j]), j, offset, g)
    return _farthest_key(-1.0, -1, offset, g)


def _farthest_key(value: float, j: int, offset: int, g: _Group) -> tuple[float, int]:
    """:func:`_farthest` from this rank's own farthest (value, local index ``j``); no candidate when value < 0."""
    key = _NO_CANDIDATE_MAX
    v = value + 0.0  # -0.0 would pack as the largest key
    if v >= 0.0:
        key = _float_bits(v) << _INDEX_BITS | ((1 << _INDEX_BITS) - 1 - (offset + j))
    key = _reduce_key(key, dist.ReduceOp.MAX, g)
    if key < 0:
        return -1.0, -1
    return _bits_float(key >> _INDEX_BITS), (1 << _INDEX_BITS) - 1 - (key & ((1 << _INDEX_BITS) - 1))


def _nearest(values: torch.Tensor, offset: int, g: _Group) -> int:
    """Global index of the smallest of every rank's non-negative ``values`` (+inf excluded), lowest index on
    ties, by one all-reduce MIN of ``float32 bits << 32 | index``."""
    if values.numel():
        j = int(torch.argmin(values))  # the first minimum: the lowest local index
        return _nearest_key(float(values[j]), j, offset, g)
    return _nearest_key(float("inf"), -1, offset, g)


def _nearest_key(value: float, j: int, offset: int, g: _Group) -> int:
    """:func:`_nearest` from this rank's own nearest (value, local index ``j``); no candidate when value is +inf."""
    key = _NO_CANDIDATE_MIN
    v = value + 0.0
    if v != float("inf"):
        key = _float_bits(v) << _INDEX_BITS | (offset + j)
    key = _reduce_key(key, dist.ReduceOp.MIN, g)
    if key == _NO_CANDIDATE_MIN:
        raise InvalidInputError("no row left to choose")  # unreachable for 1 <= k <= n, kept as a guard
    return key & ((1 << _INDEX_BITS) - 1)


def _owner(shard: _Shard, index: int) -> int:
    return next(r for r, end in enumerate(shard.ends) if index < end)


def _broadcast_row(shard: _Shard, index: int, g: _Group) -> torch.Tensor:
    """Row ``index`` (global) times ``scale`` as float32, from the rank that holds it to every rank."""
    owner = _owner(shard, index)
    row = torch.empty(shard.x.shape[1], dtype=torch.float32, device=g.device)
    if owner == g.rank:
        row.copy_(shard.x[index - shard.offset].float() * shard.scale)
    dist.broadcast(row, group=g.handle, group_src=owner)
    return row.to(shard.x.device)


def _default_init(shard: _Shard, g: _Group) -> torch.Tensor:
    """The row nearest the mean of all rows (the op's default start), with the mean summed in float64 across
    ranks; ties to the lowest global index."""
    x = shard.x
    blocks = _row_blocks(x)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for start in blocks:
        total += (x[start:start + blocks.step].float() * shard.scale).sum(dim=0, dtype=torch.float64)
    total = total.to(g.device)
    dist.all_reduce(total, group=g.handle)
    mean = (total / shard.n).float().to(x.device)
    norms = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in blocks:
        block = x[start:start + blocks.step].float() * shard.scale
        norms[start:start + block.shape[0]] = torch.linalg.vector_norm(block - mean, dim=1)
    return torch.tensor([_nearest(norms, shard.offset, g)])


def distributed_kcenter(x_shard: torch.Tensor, k: int, *, metric: str = "l2", init=None, group=None
                        ) -> KCenterResult:
    """Greedy k-center (farthest-first) over the rows of every rank's ``x_shard`` together (a collective).

    Rank r holds rows ``[offset_r, offset_r + len(x_shard))`` of X, ranks in order (e.g. the output of
    :func:`sharded_features` with ``gather=False``); ranks may hold different numbers of rows, zero included.
    Each step: the running minimum distance of this rank's rows is updated against the newest centre
    (O(rows) memory, never a rows x k matrix), one all-reduce (MAX) of a packed (distance, global index) key
    picks the next centre, and its owner broadcasts the row. Per step ``d`` floats and one int64 cross the
    network. On CPU a rank's step is the compiled op's, which skips the rows the triangle inequality rules out
    while the k centres' rows it keeps for that fit in max(its shard's bytes, 64 MiB).

    The indices equal ``erasus.ops.kcenter_greedy(X, k, metric=..., init=...)`` on the concatenated X: the same
    float32 direct-difference distances as its compiled backends (on CPU their kernel itself, bit for bit), the
    same power-of-two rescaling, ties to the lowest global index; they can differ only where two distances differ
    by float32 rounding (on GPUs; and the default start, the row nearest the mean, uses a mean summed in float64
    across ranks). Does not modify ``x_shard``.

    Args:
        x_shard: (rows, d) float32, float16 or bfloat16; the same d and dtype on every rank (a rank without
            rows passes a (0, d) tensor).
        k: centres to pick, 1 <= k <= n (all rows of all ranks); the same on every rank.
        metric: ``"l2"`` or ``"cosine"`` as in :func:`erasus.ops.kcenter_greedy`.
        init: global index (or distinct indices) of the first centre(s), the same on every rank; None: the row
            nearest the mean.
        group: the process group (default: the default group).

    Returns:
        :class:`erasus.ops.KCenterResult` ``(indices, radius)`` on every rank: int64 (k,) global indices in
        selection order and the covering radius (0-d float64), on ``x_shard``'s device.
    """
    g = _group(group)
    shard, k, init_idx = _prepare_shard(x_shard, k, g, metric=metric, init=init)
    if init_idx is None:
        init_idx = _default_init(shard, g)
    indices = init_idx.tolist() + [0] * (k - init_idx.numel())
    min_dist = torch.full((shard.x.shape[0],), float("inf"), dtype=torch.float32, device=shard.x.device)
    compiled = _CompiledSteps(shard.x, shard.scale, k) if _compiled_steps_here(shard.x) else None
    distances = None if compiled is not None else _Distances(shard.x, shard.scale)
    radius2 = 0.0
    for step in range(k):
        centre = indices[step]
        row = _broadcast_row(shard, centre, g)
        if shard.offset <= centre < shard.offset + shard.x.shape[0]:
            min_dist[centre - shard.offset] = -1.0  # never chosen again, even among exact duplicates
        if compiled is not None:
            value, index = _farthest_key(*compiled.step(min_dist, row, step), shard.offset, g)
        else:
            torch.minimum(min_dist, distances.to_vector(row), out=min_dist)  # keeps the -1 of chosen rows
            value, index = _farthest(min_dist, shard.offset, g)
        if init_idx.numel() <= step + 1 < k:
            indices[step + 1] = index
        radius2 = max(value, 0.0)
    radius2_x = torch.tensor(radius2, dtype=torch.float64) * 4.0 ** shard.exponent  # back to x's units, exact
    radius = radius2_x.sqrt() if metric == "l2" else radius2_x / 2  # on unit rows, ||u - v||^2 / 2 = 1 - cos
    device = shard.x.device
    return KCenterResult(torch.tensor(indices, dtype=torch.int64, device=device), radius.to(device))


def distributed_herding(x_shard: torch.Tensor, k: int, *, group=None) -> torch.Tensor:
    """Herding over the rows of every rank's ``x_shard`` together (a collective): step i picks the unchosen row
    nearest ``(i+1) * mean - S_i`` (S_i: the sum of the rows chosen so far), as :func:`erasus.ops.herding`.

    The mean is one all-reduce (SUM) of per-rank float64 column sums; each step is one all-reduce (MIN) of a
    packed (distance, global index) key and a broadcast of the chosen row from its owner, which every rank adds
    to its float64 S_i. The indices equal ``erasus.ops.herding(X, k)`` on the concatenated X (the compiled
    backends' float32 direct-difference distances to the float32 target, ties to the lowest global index),
    except where two distances differ only by rounding. Does not modify ``x_shard``.

    Args:
        x_shard: (rows, d) float32, float16 or bfloat16 rows of X held by this rank (ranks in order).
        k: rows to pick, 1 <= k <= n; the same on every rank.
        group: the process group (default: the default group).

    Returns:
        int64 (k,) global row indices in selection order, the same on every rank, on ``x_shard``'s device.
    """
    g = _group(group)
    shard, k, _ = _prepare_shard(x_shard, k, g)
    x, d = shard.x, shard.x.shape[1]
    column_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
    blocks = _row_blocks(x)
    for start in blocks:
        column_sum += x[start:start + blocks.step].sum(dim=0, dtype=torch.float64)
    column_sum = column_sum.to(g.device)
    dist.all_reduce(column_sum, group=g.handle)
    mean = (column_sum / shard.n * shard.scale).to(x.device)  # the order of the cpp backend: sum / n * scale
    chosen_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
    chosen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    distances = None if _compiled_steps_here(x) else _Distances(x, shard.scale)
    out = []
    for i in range(k):
        target = (mean * (i + 1) - chosen_sum).float()
        if distances is None:  # the compiled op's own step: this rank's unchosen row nearest the target
            local, value = _cpp.call("herding_step", _cpp.as_numpy(x), _cpp.elem_name(x.dtype),
                                     target.contiguous().numpy(), chosen.view(torch.uint8).numpy(), shard.scale,
                                     torch.get_num_threads(), False, True)
            j = _nearest_key(value, local, shard.offset, g)
        else:
            score = distances.to_vector(target).masked_fill_(chosen, float("inf"))
            j = _nearest(score, shard.offset, g)
        out.append(j)
        if shard.offset <= j < shard.offset + x.shape[0]:
            chosen[j - shard.offset] = True
        chosen_sum += _broadcast_row(shard, j, g).double()
    return torch.tensor(out, dtype=torch.int64, device=x.device)
