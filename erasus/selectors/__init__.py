"""Coreset selectors: ``selector.select(data, k=None, ratio=None, model=None) -> indices``.

``SELECTORS`` maps a name (as used by configs and the CLI) to its class; classes register themselves.
"""
from erasus.selectors.base import SELECTORS, FeatureSelector, Selector, get_selector, resolve_k
from erasus.selectors.classic import HerdingSelector, KCenterSelector, KMeansSelector, RandomSelector
from erasus.selectors.features import extract_features
from erasus.selectors.gradient import EL2NSelector, FacilityLocationSelector, GradNormSelector

__all__ = ["SELECTORS", "Selector", "FeatureSelector", "get_selector", "resolve_k", "extract_features",
           "RandomSelector", "KCenterSelector", "HerdingSelector", "KMeansSelector", "GradNormSelector",
           "EL2NSelector", "FacilityLocationSelector"]
