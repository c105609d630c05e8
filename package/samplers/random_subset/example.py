"""Choose 3 of 10 weighted items with the least total weight, loading this folder as OptunaHub does."""

from __future__ import annotations

from pathlib import Path

import optuna
import optunahub

module = optunahub.load_local_module(
    "samplers/random_subset", registry_root=str(Path(__file__).resolve().parents[2])
)
weights = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.05]


def objective(trial: optuna.Trial) -> float:
    chosen = module.suggest_mask(trial, 10, 3)  # exactly 3 of range(10)
    return sum(weights[i] for i in chosen)


if __name__ == "__main__":
    sampler = module.RandomMaskSampler.for_subset(10, 3, seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=100)
    print(study.best_value, module.suggest_mask(study.best_trial, 10, 3))
