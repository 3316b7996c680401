"""Fast scores and coreset loops behind one stable API.

Each op has a plain-torch ``reference`` backend (the oracle in tests) and compiled backends: ``cpp``
(CPU, pybind11 + OpenMP) and ``triton`` (CUDA), declared in one table per op (``_backend.OPS``). See
:func:`backends` for what runs here, and ``erasus/ops/_backend.py`` for how the backend is chosen. The
model-level ops (:func:`grad_norms`, :func:`fisher_diagonal`) read one registry of layer rules
(:mod:`erasus.ops.layers`).
"""
from erasus.ops._backend import backends
from erasus.ops.dual_sensitivity import DualMask, dual_sensitivity_mask
from erasus.ops.fisher import fisher_diagonal
from erasus.ops.grad_norms import grad_norms
from erasus.ops.herding import herding
from erasus.ops.kcenter import KCenterResult, kcenter_greedy
from erasus.ops.kmeans import kmeans_coreset
from erasus.ops.last_layer import last_layer_grad_gram, last_layer_grad_sq_norms
from erasus.ops.layers import SlowPathWarning, register_fisher_sampler, register_norm_sampler
from erasus.ops.linear_grads import SquaredGradNorms, SquaredGradSum, per_sample_grad_norms, squared_grad_sum
from erasus.ops.lora_importance import LoraImportanceEMA, lora_importance

__all__ = ["backends", "herding", "kcenter_greedy", "KCenterResult", "kmeans_coreset", "per_sample_grad_norms",
           "SquaredGradNorms", "grad_norms", "register_norm_sampler", "squared_grad_sum", "SquaredGradSum",
           "fisher_diagonal", "register_fisher_sampler", "last_layer_grad_gram", "last_layer_grad_sq_norms",
           "SlowPathWarning", "dual_sensitivity_mask", "DualMask", "lora_importance", "LoraImportanceEMA"]
