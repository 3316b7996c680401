"""Fast scores and coreset loops behind one stable API.

Each op has a plain-torch ``reference`` backend (the oracle in tests) and compiled backends: ``cpp``
(CPU, pybind11 + OpenMP) and ``triton`` (CUDA). See :func:`backends` for what runs here, and
``erasus/ops/_backend.py`` for how the backend is chosen.
"""
from erasus.ops._backend import backends
from erasus.ops.herding import herding
from erasus.ops.kcenter import KCenterResult, kcenter_greedy
from erasus.ops.kmeans import kmeans_coreset

__all__ = ["backends", "herding", "kcenter_greedy", "KCenterResult", "kmeans_coreset"]
