"""Layer rules: one file per layer family, each registering one rule (per-sample norms + Fisher) by type in the
one registry of :mod:`erasus.ops.layers._registry`; :mod:`._math` holds the shared layer math (a leaf);
:mod:`.fallback` is the opt-in exact path for any layer without a rule. Imports form a DAG:
``_registry``, ``_math`` -> ``linear``, ``embedding``, ``conv``, ``normalization``, ``recurrent``, ``attention``
-> ``transformers`` (lazy); :mod:`.parameters` measures the bare parameters of containers (no rule needed) with
the reducers of :mod:`.fallback`."""
from erasus.ops.layers import (attention, conv, embedding, linear, normalization, recurrent,  # noqa: F401
                               transformers)  # (register rules)
from erasus.ops.layers._registry import (RULES, LayerRule, register_fisher_sampler, register_layer,
                                         register_norm_sampler, registered_type, rule_for)
from erasus.ops.layers.fallback import FALLBACK, SlowPathWarning
from erasus.ops.layers.normalization import register_affine

__all__ = ["RULES", "LayerRule", "register_layer", "register_norm_sampler", "register_fisher_sampler",
           "register_affine", "registered_type", "rule_for", "FALLBACK", "SlowPathWarning"]
