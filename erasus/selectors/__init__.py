"""Coreset selectors: ``selector.select(data, k=None, ratio=None, model=None) -> indices``.

``SELECTORS`` maps a name (as used by configs and the CLI) to its class; classes register themselves.
"""
from erasus.selectors.base import SELECTORS, Selector, get_selector, resolve_k
from erasus.selectors.classic import HerdingSelector, KCenterSelector, KMeansSelector, RandomSelector
from erasus.selectors.features import extract_features

__all__ = ["SELECTORS", "Selector", "get_selector", "resolve_k", "extract_features", "RandomSelector",
           "KCenterSelector", "HerdingSelector", "KMeansSelector"]
