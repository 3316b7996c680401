"""Coreset selectors: ``selector.select(data, k=None, ratio=None, model=None) -> indices``.

They take classifiers' data and causal LMs' forget sets alike (token dicts batched with the dataset's
``collate``; features pooled over the real tokens; token-mean NLL gradients over the label tokens).

``SELECTORS`` maps a name (as used by configs and the CLI) to its class; classes register themselves.
"""
from erasus.selectors.base import SELECTORS, FeatureSelector, Selector, get_selector, resolve_k
from erasus.selectors.classic import HerdingSelector, KCenterSelector, KMeansSelector, RandomSelector
from erasus.selectors.features import extract_features
from erasus.selectors.gradient import (EL2NSelector, FacilityLocationSelector, GradNormSelector,
                                      last_layer_grad_gram_of, last_layer_grad_sq_norms_of)

__all__ = ["SELECTORS", "Selector", "FeatureSelector", "get_selector", "resolve_k", "extract_features",
           "RandomSelector", "KCenterSelector", "HerdingSelector", "KMeansSelector", "GradNormSelector",
           "EL2NSelector", "FacilityLocationSelector", "last_layer_grad_gram_of", "last_layer_grad_sq_norms_of"]
