"""Erasus: machine unlearning with coreset-driven forgetting and a compiled-kernel core.

``erasus.ops`` holds the fast ops, ``erasus.selectors`` the coreset selectors; errors derive from
``erasus.errors.ErasusError``.
"""
from erasus.errors import ErasusError

__version__ = "0.1.0"
__all__ = ["ErasusError", "__version__"]
