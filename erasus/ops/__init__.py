"""Fast scores and coreset loops behind one stable API.

Each op has a plain-torch ``reference`` backend (the oracle in tests) and compiled backends: ``cpp``
(CPU, pybind11 + OpenMP) and ``triton`` (CUDA). See :func:`backends` for what runs here, and
``erasus/ops/_backend.py`` for how the backend is chosen.
"""
from erasus.ops._backend import backends
from erasus.ops.fisher import SquaredGradSum, fisher_diagonal, register_fisher_sampler, squared_grad_sum
from erasus.ops.grad_norms import GradNorms, per_sample_grad_norms
from erasus.ops.herding import herding
from erasus.ops.kcenter import KCenterResult, kcenter_greedy
from erasus.ops.kmeans import kmeans_coreset
from erasus.ops.last_layer import last_layer_grad_gram, last_layer_grad_sq_norms
from erasus.ops.model_grad_norms import grad_norms, register_norm_sampler
from erasus.ops import _affine_layers  # noqa: E402,F401  (registers the normalisation layers)

__all__ = ["backends", "herding", "kcenter_greedy", "KCenterResult", "kmeans_coreset", "per_sample_grad_norms",
           "GradNorms", "grad_norms", "register_norm_sampler", "squared_grad_sum", "SquaredGradSum",
           "fisher_diagonal", "register_fisher_sampler", "last_layer_grad_gram", "last_layer_grad_sq_norms"]
