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
import contextlib
import multiprocessing
import threading
import time
import traceback
import uuid
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from optuna_prune.run.storage import open_storage
from optuna_prune.search.samplers import EvoPSampler, trial_mask
from optuna_prune.search.space import LayerMaskSpace

GENERATION_KEY = f"{EvoPSampler.__name__}:generation"
_SETUP_TIMEOUT = 300.0  # seconds for every worker to import and connect


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
    storage_url: str, study_name: str, space: dict[str, Any], population: int, seconds: float, ready: Any,
    results: Any,
) -> None:
    """One worker process: set up, wait at ``ready`` for all others, optimize for ``seconds``.

    Puts (trials it scored, traceback or None) on ``results``.
    """
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

        ready.wait(timeout=_SETUP_TIMEOUT)
        study.optimize(objective, timeout=seconds)
        results.put((scored, None))
    except Exception:
        ready.abort()  # the others stop waiting for this worker
        results.put((scored, traceback.format_exc(limit=3)))


def run_load(
    storage_url: str,
    workers: int = 8,
    seconds: float = 20.0,
    layers: int = 30,
    drop: int = 6,
    population: int | None = None,
) -> dict[str, Any]:
    """Run the load test in a fresh study of ``storage_url``; return its figures.

    Workers start together once all have imported and connected; ``elapsed`` runs from that
    start until the last worker has finished the trial it was in at ``seconds``.
    """
    space = LayerMaskSpace(layers, drop)
    population = population or max(10, layers)
    name = f"storage-load-{uuid.uuid4().hex[:8]}"
    storage = open_storage(storage_url, 5)
    optuna.create_study(study_name=name, storage=storage, direction="minimize")
    context = multiprocessing.get_context("spawn")
    ready, queue = context.Barrier(workers + 1), context.Queue()
    procs = [
        context.Process(
            target=_worker, args=(storage_url, name, space.to_dict(), population, seconds, ready, queue)
        )
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a worker failed: its traceback is queued
        ready.wait(timeout=_SETUP_TIMEOUT)
    began = time.perf_counter()
    results = [queue.get(timeout=_SETUP_TIMEOUT + seconds) for _ in procs]
    elapsed = time.perf_counter() - began
    for proc in procs:
        proc.join()

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    scored = [trial_mask(t, space) for t in trials if t.state == TrialState.COMPLETE]
    generations = [t.system_attrs.get(GENERATION_KEY, -1) for t in trials]
    crashes = [err for _, err in results if err]
    return {
        "study": name,
        "workers": workers,
        "seconds": seconds,
        "complete": states[TrialState.COMPLETE],
        "elapsed": elapsed,
        "trials_per_s": states[TrialState.COMPLETE] / elapsed,
        "errors": states[TrialState.FAIL] + len(crashes),
        "duplicates": len(scored) - len(set(scored)),
        "running": states[TrialState.RUNNING],
        "generations": max(generations, default=-1) + 1,
        "per_worker": [n for n, _ in results],
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
    print(f"trials/s: {r['trials_per_s']:.1f} ({r['complete']} complete in {r['elapsed']:.1f} s, "
          f"per worker {r['per_worker']})")
    print(f"errors: {r['errors']}  duplicates: {r['duplicates']}  running at the end: {r['running']}  "
          f"generations: {r['generations']}")
    for crash in r["crashes"]:
        print(crash)


if __name__ == "__main__":
    main()
