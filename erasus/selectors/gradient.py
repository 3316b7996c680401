"""Selectors on gradients and losses: GraNd, EL2N, and CRAIG-style facility location on last-layer gradients.

Classifiers and causal LMs alike. The last layer ("head": the model's last ``nn.Linear``, or ``layer``; a causal
LM's ``lm_head``) maps inputs ``h`` to logits ``z = W h (+ b)``. For a classifier each sample has one (h, z)
pair; for a causal LM it has one per token, and the per-sample loss is the token-mean NLL over its n_i label
tokens (position t predicts token t + 1; -100 labels, i.e. prompt and padding, count for nothing). With
``e_t = (softmax(z_t) - onehot(y_{t+1})) / n_i`` at the label positions (0 elsewhere), the gradient of sample
i's loss with respect to the head weight is ``G_i = sum_t e_t h_t^T`` (V x d), and with respect to its bias
``sum_t e_t``. Their inner products factorise over tokens,

    <G_i, G_j> (+ <bias grads>) = sum_{t, s} (e_it . e_js) (h_it . h_js (+ 1)),

so GraNd's last-layer norms and CRAIG's Gram cost token-level products of sizes T x V and T x d, never a
V x d gradient per sample. A classifier is the case T = 1 (the closed forms of :mod:`erasus.ops.last_layer`).
The gradient is that of the head as a layer of its own: a head tied to the input embedding (GPT-2) is
measured as the head alone.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from erasus import ops
from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError, NonFiniteError, ShapeError
from erasus.losses import per_sample_cross_entropy
from erasus.selectors.base import Selector, resolve_k
from erasus.selectors.features import (as_loader, batch_inputs, capture_layer, eval_mode, find_layer, labels_of,
                                      sample_count)

IGNORE_INDEX = -100
# Token-Gram blocks of CRAIG hold at most this many float32 entries (64 MiB).
_GRAM_BLOCK_ELEMENTS = 1 << 24


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties to the lowest index."""
    return torch.argsort(scores, descending=True, stable=True)[:k]


def default_loss(model, batch) -> torch.Tensor:
    """Per-sample loss (B,) for ``(inputs, labels)`` batches or dict batches with ``labels``: cross-entropy of
    (B, C) logits; for (B, T, V) logits (a causal LM, ``model(**inputs).logits``) the token-mean NLL over each
    sample's label tokens -- labels shifted by one, -100 skipped (:func:`erasus.losses.per_sample_cross_entropy`
    with ``shift=True, reduction="mean"``), the loss the model is trained and unlearned with."""
    labels = labels_of(batch)
    inputs = batch_inputs(batch)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise InvalidInputError(f"the model returned {type(out).__name__}, which has no logits tensor: pass "
                                "loss_fn=(model, batch) -> per-sample losses (B,) to score this model (e.g. a CLIP "
                                "model: erasus.tasks.CLIPTask's zero-shot loss)")
    return per_sample_cross_entropy(logits, labels, shift=logits.dim() == 3, reduction="mean")


def head_errors(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token gradients of each sample's loss with respect to the head's logits, and where they count.

    Args:
        logits: (B, C) of a classifier or (B, T, V) of a causal LM.
        labels: (B,) class indices, or (B, T) unshifted token labels with -100 where nothing is predicted.

    Returns:
        ``e`` (B, T', C) float32 and ``counted`` (B, T') bool. A classifier has T' = 1 and
        ``e = softmax(z) - onehot(y)``. A causal LM has T' = T - 1: row t is ``(softmax(z_t) - onehot(y_{t+1}))
        / n_i`` where y_{t+1} is a label (n_i of them in sample i), and 0 where it is not -- the gradient of the
        token-mean NLL. The head's inputs to pair with them are ``h[:, :-1]``.
    """
    if not torch.isfinite(logits).all():
        raise NonFiniteError("the model's logits hold NaN or infinity")
    if logits.dim() == 2:
        if labels.shape != logits.shape[:1]:
            raise ShapeError(f"labels of a classifier must have shape {tuple(logits.shape[:1])}, got "
                             f"{tuple(labels.shape)}")
        logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
    elif logits.dim() == 3:
        if labels.shape != logits.shape[:2]:
            raise ShapeError(f"labels of a causal LM must have the shape (B, T) = {tuple(logits.shape[:2])} of its "
                             f"logits, got {tuple(labels.shape)}")
        logits, labels = logits[:, :-1], labels[:, 1:]
    else:
        raise ShapeError(f"the head's logits must be (B, C) or (B, T, V), got shape {tuple(logits.shape)}")
    labels = labels.to(logits.device).long()
    counted = labels != IGNORE_INDEX
    if ((labels[counted] < 0) | (labels[counted] >= logits.shape[-1])).any():
        raise InvalidInputError(f"labels must be class indices in [0, {logits.shape[-1]}) or {IGNORE_INDEX}")
    e = torch.softmax(logits.float(), dim=-1)
    e.scatter_add_(-1, torch.where(counted, labels, 0).unsqueeze(-1), -torch.ones(*labels.shape, 1, device=e.device))
    weight = counted.float() / counted.sum(dim=1, keepdim=True).clamp(min=1)
    return e.mul_(weight.unsqueeze(-1)), counted


def _head_inputs(h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The head's inputs aligned with ``e``: (B, 1, d) for a classifier, the first T - 1 tokens for an LM."""
    h = h.float()
    return h.unsqueeze(1) if h.dim() == 2 else h[:, : e.shape[1]]


def _bias_term(head: nn.Module) -> float:
    """1 when the head has a bias (its gradient adds ``e_t . e_s`` to each token pair), else 0."""
    return 1.0 if getattr(head, "bias", None) is not None else 0.0


def for_each_head_batch(data, model: nn.Module, *, layer: str | None, batch_size: int, fn: Callable) -> list:
    """``fn(e, h, counted)`` for every batch of ``data`` (:func:`head_errors` and the aligned head inputs), from
    one forward pass per batch in eval mode under no_grad; the list of what it returned. The model's weights
    and training mode are not changed."""
    if model is None:
        raise InvalidInputError("this selector needs a model")
    n = sample_count(data)
    results = []
    rows = [0]

    def on_batch(batch, h, z):
        if not isinstance(z, torch.Tensor) or h.dim() != z.dim() or h.shape[:-1] != z.shape[:-1]:
            raise ShapeError(f"the head must map (B, d) features to (B, C) logits or (B, T, d) to (B, T, V), got "
                             f"{tuple(h.shape)} -> {tuple(getattr(z, 'shape', ()))}; pass layer= to name the head")
        e, counted = head_errors(z, labels_of(batch))
        rows[0] += e.shape[0]
        results.append(fn(e, _head_inputs(h, e), counted))

    capture_layer(model, find_layer(model, layer), as_loader(data, batch_size), on_batch)
    if rows[0] != n:
        raise ShapeError(f"the head saw {rows[0]} samples but data holds {n}")
    return results


def last_layer_grad_sq_norms_of(data, model: nn.Module, *, layer: str | None = None, batch_size: int = 256
                                ) -> torch.Tensor:
    """(n,) squared norms of each sample's loss gradient with respect to the head's weight (and bias, if it has
    one): ``sum_{t,s} (e_t . e_s)(h_t . h_s + [bias])`` per sample (see the module docstring). The model is not
    changed.

    Example:
        >>> import torch
        >>> from erasus.selectors.gradient import last_layer_grad_sq_norms_of
        >>> head = torch.nn.Linear(2, 3, bias=False)
        >>> data = torch.utils.data.TensorDataset(torch.randn(5, 2), torch.randint(0, 3, (5,)))
        >>> last_layer_grad_sq_norms_of(data, head).shape
        torch.Size([5])
    """
    head = find_layer(model, layer) if model is not None else None
    bias = _bias_term(head)

    def norms(e, h, _counted):
        ee, hh = torch.bmm(e, e.transpose(1, 2)), torch.bmm(h, h.transpose(1, 2))
        return (ee * (hh + bias)).sum(dim=(1, 2))

    return torch.cat(for_each_head_batch(data, model, layer=layer, batch_size=batch_size, fn=norms))


def last_layer_grad_gram_of(data, model: nn.Module, *, layer: str | None = None, batch_size: int = 256
                            ) -> torch.Tensor:
    """(n, n) Gram matrix ``K_ij = <g_i, g_j>`` of the samples' loss gradients with respect to the head's weight
    (and bias): ``sum_{t,s} (e_it . e_js)(h_it . h_js + [bias])``, computed from the counted tokens' errors and
    inputs in blocks of token pairs summed per sample pair. The model is not changed.

    Memory: the counted tokens' errors and inputs, N x (V + d) float32 for N label tokens in ``data`` (one row
    per sample for a classifier), plus the n x n result; compute ~N^2 (V + d).
    """
    head = find_layer(model, layer) if model is not None else None
    bias = _bias_term(head)
    rows = for_each_head_batch(data, model, layer=layer, batch_size=batch_size,
                               fn=lambda e, h, counted: (e[counted], h[counted], counted.sum(dim=1)))
    e = torch.cat([r[0] for r in rows])
    h = torch.cat([r[1] for r in rows])
    counts = torch.cat([r[2] for r in rows])
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    return _sum_token_pairs(e, h, owner, counts.numel(), bias)


def _sum_token_pairs(e: torch.Tensor, h: torch.Tensor, owner: torch.Tensor, n: int, bias: float) -> torch.Tensor:
    """``K[a, b] = sum over tokens t of a, s of b of (e_t . e_s)(h_t . h_s + bias)``, one block of token rows at a
    time so that no N x N token matrix is held."""
    gram = torch.zeros(n, n, device=e.device)
    block = max(1, _GRAM_BLOCK_ELEMENTS // max(1, e.shape[0]))
    for start in range(0, e.shape[0], block):
        stop = start + block
        pairs = (e[start:stop] @ e.T) * (h[start:stop] @ h.T + bias)
        per_sample = torch.zeros(pairs.shape[0], n, device=e.device).index_add_(1, owner, pairs)
        gram.index_add_(0, owner[start:stop], per_sample)
    return gram


class GradNormSelector(Selector, name="gradnorm"):
    """GraNd (Paul et al. 2021): keep the samples with the largest loss-gradient norm.

    ``scope="model"`` scores the whole gradient over the model's trainable parameters (a peft model's adapters
    only) with :func:`erasus.ops.grad_norms` (one batched forward and backward per batch, no per-sample
    gradients). ``scope="last_layer"`` uses the exact gradient norm of the last linear layer (weight, and bias
    if it has one) in closed form, forward only: ``||e_i|| sqrt(||h_i||^2 + 1)`` for a classifier with a bias,
    as DeepCore does, and the square root of ``sum_{t,s} (e_t . e_s)(h_t . h_s (+ 1))`` over the label tokens of
    a causal LM (see the module docstring). A head without a bias drops the ``+ 1``.
    ``loss_fn(model, batch) -> (B,)`` defaults to :func:`default_loss` (cross-entropy; a causal LM's token-mean
    NLL over its label tokens). After ``select``, ``scores_`` holds every sample's norm.

    Example:
        >>> import torch
        >>> from erasus.selectors import GradNormSelector
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> data = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
        >>> GradNormSelector().select(data, k=5, model=model).shape
        torch.Size([5])
    """

    def __init__(self, scope: str = "model", loss_fn: Callable | None = None, backend: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if scope not in ("model", "last_layer"):
            raise InvalidInputError(f"scope must be 'model' or 'last_layer', got {scope!r}")
        self.scope, self.loss_fn, self.backend = scope, loss_fn, backend

    def select(self, data, k=None, ratio=None, model=None):
        if model is None:
            raise InvalidInputError("GradNormSelector needs a model")
        n = sample_count(data)
        k = resolve_k(n, k, ratio)
        if self.scope == "last_layer":
            scores = last_layer_grad_sq_norms_of(data, model, layer=self.layer, batch_size=self.batch_size).sqrt()
        else:
            scores = self._model_grad_norms(data, model)
        if scores.shape != (n,):
            raise ShapeError(f"got {scores.shape[0]} scores but data holds {n} samples")
        self.scores_ = scores
        return _top(scores, k)

    def _model_grad_norms(self, data, model) -> torch.Tensor:
        device = model_device(model)
        loss_fn = self.loss_fn or default_loss
        with eval_mode(model):  # as every selector: scores without dropout, BatchNorm on running statistics
            return torch.cat([ops.grad_norms(model, loss_fn, to_device(batch, device), backend=self.backend)
                              for batch in as_loader(data, self.batch_size)])


class EL2NSelector(Selector, name="el2n"):
    """EL2N (Paul et al. 2021): keep the samples with the largest error norm ``||softmax(z_i) - onehot(y_i)||_2``,
    from one forward pass (the scores of a model early in training are the published recipe; any model works).

    For a causal LM a sample's score is the mean over its label tokens of ``||softmax(z_t) - onehot(y_{t+1})||_2``
    (prompt and padding tokens, labelled -100, do not count; a sample without label tokens scores 0). The mean,
    not the sum, so that long answers do not win by length alone -- the same token averaging as the loss.
    After ``select``, ``scores_`` holds every sample's score.

    Example:
        >>> import torch
        >>> from erasus.selectors import EL2NSelector
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> data = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
        >>> EL2NSelector().select(data, ratio=0.25, model=model).shape
        torch.Size([5])
    """

    def select(self, data, k=None, ratio=None, model=None):
        n = sample_count(data)
        k = resolve_k(n, k, ratio)
        # the rows of e are already divided by each sample's token count, so their norms sum to the mean
        scores = torch.cat(for_each_head_batch(data, model, layer=self.layer, batch_size=self.batch_size,
                                               fn=lambda e, _h, _counted: e.norm(dim=2).sum(dim=1)))
        self.scores_ = scores
        return _top(scores, k)


class FacilityLocationSelector(Selector, name="craig"):
    """CRAIG-style coreset (Mirzasoleiman et al. 2020): greedy facility location on last-layer gradients,
    maximising ``sum_j max_{i in S} s_ij`` with ``s_ij = max_dist - ||g_i - g_j||``. The distances come from the
    factorised Gram of the gradients (:func:`last_layer_grad_gram_of`; for a classifier
    ``(E E^T) o (H H^T + 1)`` as in :func:`erasus.ops.last_layer_grad_gram`, for a causal LM its token-level
    form), never from the gradients themselves. Memory is one n x n float32 matrix (n = 10k: 400 MB) plus, for
    a causal LM, the label tokens' errors (N x V float32 for N label tokens).

    After ``select``, ``weights_`` holds how many samples each chosen one stands for (CRAIG's step sizes).

    Example:
        >>> import torch
        >>> from erasus.selectors import FacilityLocationSelector
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> data = torch.utils.data.TensorDataset(torch.randn(30, 4), torch.randint(0, 3, (30,)))
        >>> sel = FacilityLocationSelector()
        >>> idx = sel.select(data, k=4, model=model)
        >>> int(sel.weights_.sum())
        30
    """

    def select(self, data, k=None, ratio=None, model=None):
        n = sample_count(data)
        k = resolve_k(n, k, ratio)
        gram = last_layer_grad_gram_of(data, model, layer=self.layer, batch_size=self.batch_size)
        diag = gram.diagonal()
        dist = (diag[:, None] + diag[None, :] - 2 * gram).clamp_(min=0).sqrt_()
        sim = dist.max() - dist
        del gram, dist
        chosen: list[int] = []
        best = torch.zeros(n, device=sim.device)  # coverage of each sample by the chosen set
        available = torch.ones(n, dtype=torch.bool, device=sim.device)
        for _ in range(k):
            gains = (sim - best[None, :]).clamp_(min=0).sum(dim=1)
            gains[~available] = -1.0
            i = int(torch.argmax(gains))
            chosen.append(i)
            available[i] = False
            best = torch.maximum(best, sim[i])
        idx = torch.tensor(chosen, device=sim.device)
        self.weights_ = torch.bincount(sim[idx].argmax(dim=0), minlength=k).float()
        return idx
