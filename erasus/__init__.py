"""Erasus: machine unlearning with coreset-driven forgetting and a compiled-kernel core.

``erasus.ops`` holds the fast ops, ``erasus.selectors`` the coreset selectors, ``erasus.strategies`` the
unlearning methods and ``erasus.metrics`` their evaluation; ``ErasusUnlearner`` runs the whole flow. Errors
derive from ``erasus.errors.ErasusError``.
"""
from erasus.errors import ErasusError

__version__ = "0.1.0"
__all__ = ["ErasusError", "ErasusUnlearner", "__version__"]


def __getattr__(name):
    # The orchestrator pulls in strategies, metrics and scikit-learn: load it on first use only.
    if name == "ErasusUnlearner":
        from erasus.unlearner import ErasusUnlearner

        return ErasusUnlearner
    raise AttributeError(f"module 'erasus' has no attribute {name!r}")
