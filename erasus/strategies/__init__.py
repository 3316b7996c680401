"""Unlearning strategies. ``STRATEGIES`` maps a name to its class; classes register themselves.

Every strategy changes the model in place. Gradient strategies expose ``loss(model, forget_batch,
retain_batch, original)`` for your own loop, and ``unlearn`` to run theirs with the stop-and-restore guard.
"""
from erasus.strategies.base import STRATEGIES, GradientStrategy, Strategy, frozen_copy, get_strategy
from erasus.strategies.gradient import NPO, SCRUB, FineTune, GradDiff, GradientAscent, SalUn, SimNPO
from erasus.strategies.representation import RMU
from erasus.strategies.elm import ELM
from erasus.strategies.pruning import DualSensitivityPruning, SelectivePruning
from erasus.strategies.guard import GuardTripped, TrainingGuard
from erasus.strategies.training_free import SSD, FisherForgetting
from erasus.strategies.clip import ContrastiveUnlearning, ModalityDecoupling
from erasus.strategies.diffusion import ESD, UCE

__all__ = ["STRATEGIES", "Strategy", "GradientStrategy", "get_strategy", "frozen_copy", "GradientAscent",
           "GradDiff", "NPO", "SimNPO", "RMU", "ELM", "FineTune", "SCRUB", "SalUn", "SSD", "FisherForgetting", "ModalityDecoupling",
           "ContrastiveUnlearning", "ESD", "UCE", "TrainingGuard",
           "GuardTripped"]
