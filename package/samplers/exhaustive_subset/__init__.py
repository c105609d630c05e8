"""OptunaHub face of optuna-prune's ExhaustiveMaskSampler: the package code itself, imported, not copied."""

from optuna_prune.search import ExhaustiveMaskSampler, suggest_mask

__all__ = ["ExhaustiveMaskSampler", "suggest_mask"]
