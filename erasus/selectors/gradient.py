"""Selectors on gradients and losses: GraNd, EL2N, and CRAIG-style facility location on last-layer gradients."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from erasus import ops
from erasus._device import model_device, to_device
from erasus.errors import InvalidInputError
from erasus.losses import per_sample_cross_entropy
from erasus.selectors.base import Selector, resolve_k
from erasus.selectors.features import _as_loader, _inputs, extract_head, labels_of, sample_count


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ties to the lowest index."""
    return torch.argsort(scores, descending=True, stable=True)[:k]


def default_loss(model, batch) -> torch.Tensor:
    """Per-sample cross-entropy for ``(inputs, labels)`` batches, or dict batches with ``labels`` (3-D logits
    are read as a causal LM: shifted, summed over the tokens that are not -100)."""
    labels = labels_of(batch)
    inputs = _inputs(batch)
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    logits = getattr(out, "logits", out)
    return per_sample_cross_entropy(logits, labels, shift=logits.dim() == 3, reduction="sum")


class GradNormSelector(Selector, name="gradnorm"):
    """GraNd (Paul et al. 2021): keep the samples with the largest loss-gradient norm.

    ``scope="model"`` scores the whole gradient over the model's trainable parameters with
    :func:`erasus.ops.grad_norms` (one batched forward and backward per batch, no per-sample gradients);
    ``scope="last_layer"`` uses the closed form ``||e_i|| sqrt(||h_i||^2 + 1)`` of the last linear layer
    (forward only), as DeepCore does. ``loss_fn(model, batch) -> (B,)`` defaults to :func:`default_loss`.

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
            h, z, y = extract_head(data, model, layer=self.layer, batch_size=self.batch_size)
            return _top(ops.last_layer_grad_sq_norms(_ce_errors(z, y), h), k)
        device = model_device(model)
        loss_fn = self.loss_fn or default_loss
        was_training = model.training
        model.eval()  # as every selector: scores without dropout, BatchNorm on running statistics
        try:
            scores = [ops.grad_norms(model, loss_fn, to_device(batch, device), backend=self.backend)
                      for batch in _as_loader(data, self.batch_size)]
        finally:
            model.train(was_training)
        return _top(torch.cat(scores), k)


class EL2NSelector(Selector, name="el2n"):
    """EL2N (Paul et al. 2021): keep the samples with the largest ``||softmax(z_i) - onehot(y_i)||_2``, from
    one forward pass (the scores of a model early in training are the published recipe; any model works).

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
        _, z, y = extract_head(data, model, layer=self.layer, batch_size=self.batch_size)
        return _top(_ce_errors(z, y).norm(dim=1), k)



class FacilityLocationSelector(Selector, name="craig"):
    """CRAIG-style coreset (Mirzasoleiman et al. 2020): greedy facility location on last-layer gradients,
    maximising ``sum_j max_{i in S} s_ij`` with ``s_ij = max_dist - ||g_i - g_j||``. The distances come from the
    factorised Gram ``(E E^T) o (H H^T + 1)`` (:func:`erasus.ops.last_layer_grad_gram`), never from the
    C(d+1)-dimensional gradients. Memory is one n x n float32 matrix (n = 10k: 400 MB).

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
        h, z, y = extract_head(data, model, layer=self.layer, batch_size=self.batch_size)
        gram = ops.last_layer_grad_gram(_ce_errors(z, y), h)
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



def _ce_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE / d logits = softmax(z) - onehot(y)."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs - F.one_hot(labels.long(), probs.shape[1]).float()
