"""OptunaHub face of optuna-prune's EvoPSampler: the package code itself, imported, not copied."""

from optuna_prune.search import EvoPSampler, suggest_mask

__all__ = ["EvoPSampler", "suggest_mask"]
