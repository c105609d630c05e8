"""OptunaHub face of optuna-prune's LevelSwitchSampler: the package code itself, imported, not copied."""

from optuna_prune.search import LevelSwitchSampler, suggest_mask

__all__ = ["LevelSwitchSampler", "suggest_mask"]
