"""Samplers that propose which layers to drop: EvoP, EvoPress level switch, Self-Pruner, SLEB, random, exhaustive.

All of them subclass :class:`MaskSampler`, propose exact-k masks of a
:class:`~optuna_prune.search.space.LayerMaskSpace` as ``layer_xx`` params, and keep their state in the
study's storage. They use only Optuna and numpy, so they work for any exact-k subset problem.
"""

from optuna_prune.search.samplers.base import MaskSampler, trial_loss, trial_mask
from optuna_prune.search.samplers.evop import EvoPSampler
from optuna_prune.search.samplers.exhaustive import ExhaustiveMaskSampler
from optuna_prune.search.samplers.levelswitch import LevelSwitchSampler
from optuna_prune.search.samplers.random_mask import RandomMaskSampler
from optuna_prune.search.samplers.selfpruner import SelfPrunerSampler, llm_stats
from optuna_prune.search.samplers.sleb import SLEBError, SLEBSampler, sleb_result

__all__ = [
    "EvoPSampler",
    "ExhaustiveMaskSampler",
    "LevelSwitchSampler",
    "MaskSampler",
    "RandomMaskSampler",
    "SLEBError",
    "SLEBSampler",
    "SelfPrunerSampler",
    "llm_stats",
    "sleb_result",
    "trial_loss",
    "trial_mask",
]
