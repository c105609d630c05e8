"""Choose k of n items with optuna-prune's exact-k samplers: no model, no torch.

The toy problem: pick 6 of 20 items (features, experts, sensors) whose summed costs plus pairwise
interactions are smallest, and tune a "shrinkage" float alongside. The samplers propose only
subsets of exactly 6; the float goes to their fallback independent sampler. Brute force checks
the answer. Run: ``python examples/subset_selection.py``.
"""

from __future__ import annotations

import itertools

import numpy as np
import optuna

from optuna_prune.search import EvoPSampler, LevelSwitchSampler, suggest_mask

N, K = 20, 6
rng = np.random.RandomState(0)
COST = rng.uniform(0.1, 1.0, N)
PAIR = np.triu(rng.uniform(-0.15, 0.15, (N, N)), 1)  # some pairs work well together


def loss(chosen: tuple[int, ...]) -> float:
    idx = list(chosen)
    return float(COST[idx].sum() + PAIR[np.ix_(idx, idx)].sum())


def objective(trial: optuna.Trial) -> float:
    chosen = suggest_mask(trial, N, K)  # sorted indices, exactly K of range(N)
    shrinkage = trial.suggest_float("shrinkage", 1e-3, 1.0, log=True)  # not part of the mask
    return loss(chosen) + 0.01 * abs(np.log10(shrinkage) + 1)  # best at shrinkage = 0.1


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = min(loss(c) for c in itertools.combinations(range(N), K))  # 38,760 subsets

    # 1. create_study / optimize
    study = optuna.create_study(sampler=EvoPSampler.for_subset(N, K, seed=0))
    study.optimize(objective, n_trials=400)
    chosen = suggest_mask(study.best_trial, N, K)  # a FrozenTrial gives back its subset
    print(f"EvoP:         {chosen} loss {loss(chosen):.4f} (optimum {best:.4f})")

    # 2. ask-and-tell, in batches of 8 (with the defaults: nothing waits for untold trials)
    study = optuna.create_study(sampler=LevelSwitchSampler.for_subset(N, K, seed=0))
    for _ in range(50):
        batch = [study.ask() for _ in range(8)]
        for trial in batch:
            study.tell(trial, objective(trial))
    chosen = suggest_mask(study.best_trial, N, K)
    print(f"level switch: {chosen} loss {loss(chosen):.4f} (optimum {best:.4f})")


if __name__ == "__main__":
    main()
