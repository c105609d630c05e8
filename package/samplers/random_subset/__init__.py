"""OptunaHub face of optuna-prune's RandomMaskSampler: the package code itself, imported, not copied."""

from optuna_prune.search import RandomMaskSampler, suggest_mask

__all__ = ["RandomMaskSampler", "suggest_mask"]
