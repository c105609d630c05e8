"""Storage load test: many worker processes run one EvoP search in one PostgreSQL study.

No model: the objective is a toy loss in pure Python, so the figures measure what workers on many
GPUs share — the storage and the sampler's coordination (generation slots, parents decided once,
waits for a generation's running members, heartbeats) — not the fitness. All workers start at
the same moment and stop after ``--seconds``. Prints and returns:

    trials/s     COMPLETE trials per second, all workers together
    errors       FAIL trials plus exceptions raised in workers (must be 0)
    duplicates   masks scored more than once (must be 0)

Usage: python benchmarks/storage_load.py --storage postgresql://postgres@127.0.0.1:5432/test \
           [--workers 8] [--seconds 20] [--layers 30] [--drop 6] [--population 30]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import time
import traceback
import uuid
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from optuna_prune.samplers import EvoPSampler, trial_mask
from optuna_prune.space import LayerMaskSpace
from optuna_prune.study import open_storage

GENERATION_KEY = f"{EvoPSampler.__name__}:generation"


class ToyLoss:
    """Per-layer costs plus pair interactions, fixed by a seed: cheap, deterministic, with structure."""

    def __init__(self, num_layers: int, seed: int = 0) -> None:
        rng = np.random.RandomState(seed)
        self.cost = rng.uniform(0.1, 1.0, num_layers)
        self.pair = np.triu(rng.uniform(0.0, 0.1, (num_layers, num_layers)), 1)

    def __call__(self, dropped: tuple[int, ...]) -> float:
        idx = list(dropped)
        return float(self.cost[idx].sum() + self.pair[np.ix_(idx, idx)].sum())


def _worker(
    storage_url: str, study_name: str, space: dict[str, Any], population: int, start: float, seconds: float
) -> tuple[int, float, str | None]:
    """One worker process: wait for the common start, optimize until the common end.

    Returns (trials it scored, seconds it started late, traceback or None).
    """
    late = 0.0
    scored = 0
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        mask_space = LayerMaskSpace.from_dict(space)
        toy = ToyLoss(mask_space.num_layers)
        sampler = EvoPSampler(mask_space, population_size=population, seed=0)
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url, 5), sampler=sampler)

        def objective(trial: optuna.Trial) -> float:
            nonlocal scored
            params = {name: trial.suggest_categorical(name, [0, 1]) for name in mask_space.param_names}
            scored += 1
            return toy(mask_space.dropped_from_params(params))

        late = time.time() - start
        time.sleep(max(0.0, -late))
        study.optimize(objective, timeout=max(0.1, start + seconds - time.time()))
        return scored, max(0.0, late), None
    except Exception:
        return scored, max(0.0, late), traceback.format_exc(limit=3)


def run_load(
    storage_url: str,
    workers: int = 8,
    seconds: float = 20.0,
    layers: int = 30,
    drop: int = 6,
    population: int | None = None,
    startup: float = 8.0,
) -> dict[str, Any]:
    """Run the load test in a fresh study of ``storage_url``; return its figures."""
    space = LayerMaskSpace(layers, drop)
    population = population or max(10, layers)
    name = f"storage-load-{uuid.uuid4().hex[:8]}"
    storage = open_storage(storage_url, 5)
    optuna.create_study(study_name=name, storage=storage, direction="minimize")
    start = time.time() + startup  # spawned processes need a few seconds to import optuna
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(_worker, storage_url, name, space.to_dict(), population, start, seconds)
            for _ in range(workers)
        ]
        results = [f.result() for f in futures]

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    scored = [trial_mask(t, space) for t in trials if t.state == TrialState.COMPLETE]
    generations = [t.system_attrs.get(GENERATION_KEY, -1) for t in trials]
    crashes = [err for _, _, err in results if err]
    return {
        "study": name,
        "workers": workers,
        "seconds": seconds,
        "complete": states[TrialState.COMPLETE],
        "trials_per_s": states[TrialState.COMPLETE] / seconds,
        "errors": states[TrialState.FAIL] + len(crashes),
        "duplicates": len(scored) - len(set(scored)),
        "running": states[TrialState.RUNNING],
        "generations": max(generations, default=-1) + 1,
        "per_worker": [n for n, _, _ in results],
        "late_start_s": max(late for _, late, _ in results),
        "crashes": crashes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--drop", type=int, default=6)
    parser.add_argument("--population", type=int)
    args = parser.parse_args()
    r = run_load(args.storage, args.workers, args.seconds, args.layers, args.drop, args.population)
    print(f"storage_load: {r['workers']} workers x {r['seconds']:.0f} s, study {r['study']} in {args.storage}")
    print(f"trials/s: {r['trials_per_s']:.1f} ({r['complete']} complete, per worker {r['per_worker']}; "
          f"latest worker start {r['late_start_s']:.1f} s late)")
    print(f"errors: {r['errors']}  duplicates: {r['duplicates']}  running at the end: {r['running']}  "
          f"generations: {r['generations']}")
    for crash in r["crashes"]:
        print(crash)


if __name__ == "__main__":
    main()
