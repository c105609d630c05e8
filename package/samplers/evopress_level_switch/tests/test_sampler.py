"""The OptunaHub package loads and finds the lightest 3 of 10 items (as the registry's CI would run it)."""

from __future__ import annotations

from pathlib import Path

import optuna
import optunahub


def test_evopress_level_switch_finds_the_best_subset() -> None:
    module = optunahub.load_local_module(
        "samplers/evopress_level_switch", registry_root=str(Path(__file__).resolve().parents[3])
    )
    weights = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.05]
    study = optuna.create_study(sampler=module.LevelSwitchSampler.for_subset(10, 3, seed=0))
    study.optimize(lambda t: sum(weights[i] for i in module.suggest_mask(t, 10, 3)), n_trials=120)
    assert module.suggest_mask(study.best_trial, 10, 3) == (1, 5, 9)
