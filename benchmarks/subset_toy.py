"""The exact-k samplers against Optuna's own on k-of-n problems whose optimum is known.

Each problem (one per seed) picks k of n items minimising ``sum cost[i] + sum_{i<j} pair[i, j]``
over the chosen items, with mixed-sign pair interactions, so the optimum is not simply the k
cheapest items; brute force over all C(n, k) subsets finds it. EvoP and level switch propose exact-k
subsets through ``suggest_mask``; Optuna's RandomSampler, TPESampler and NSGAIISampler get the same
n ``{0, 1}`` params through the same ``suggest_mask`` and a subset of the wrong size scores
``PENALTY + |size - k|``. Printed per sampler: the fraction of seeds whose run reaches the optimum
within ``--trials``, and the median trials to reach it (over the runs that do).

Then the storage cost, on problem 0 with a cheap objective: seconds for ``--sqlite-trials`` trials
in memory and on an SQLite file, and their ratio, for each sampler of ``STORAGE_RUNS`` and each
``--sqlite-jobs`` thread count, all in one run. ``optuna_floor`` is Optuna's RandomSampler on one
float param: what Optuna's own storage work per trial (create, read, tell) costs any sampler, and
"vs floor" is a sampler's SQLite time over it.

Writes ``--out`` (default benchmarks/results/subset_toy.json). Usage (defaults take some
20 minutes on 2 busy cores):
    python benchmarks/subset_toy.py [--seeds 10] [--trials 300] [--n 20 30] [--k 5 9]
        [--samplers evop levelswitch random tpe nsgaii] [--sqlite-trials 60] [--sqlite-jobs 1 4]
        [--sqlite-dir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from optuna_prune.search import EvoPSampler, LevelSwitchSampler, RandomMaskSampler, suggest_mask

PENALTY = 100.0  # above every exact-k loss: cost <= 1 per item, |pair| <= PAIR per pair
PAIR = 0.2
RESULTS = Path(__file__).resolve().parent / "results" / "subset_toy.json"


class Problem:
    """k of n items: item costs in [0.1, 1], pair interactions in [-PAIR, PAIR]."""

    def __init__(self, n: int, k: int, seed: int) -> None:
        rng = np.random.RandomState(seed)
        self.n, self.k, self.seed = n, k, seed
        self.cost = rng.uniform(0.1, 1.0, n)
        self.pair = np.triu(rng.uniform(-PAIR, PAIR, (n, n)), 1)
        self.pair = self.pair + self.pair.T  # symmetric: pair[i, j] for either order

    def loss(self, chosen: tuple[int, ...]) -> float:
        if len(chosen) != self.k:
            return PENALTY + abs(len(chosen) - self.k)
        idx = list(chosen)
        return float(self.cost[idx].sum() + self.pair[np.ix_(idx, idx)].sum() / 2)

    def optimum(self, chunk: int = 1 << 20) -> tuple[float, tuple[int, ...]]:
        """Brute force over all C(n, k) subsets, vectorised in chunks."""
        combos = _combinations(self.n, self.k)
        best, arg = math.inf, None
        for start in range(0, len(combos), chunk):
            s = combos[start : start + chunk].astype(np.intp)
            values = self.cost[s].sum(axis=1)
            for a in range(self.k):
                for b in range(a + 1, self.k):
                    values += self.pair[s[:, a], s[:, b]]
            i = int(values.argmin())
            if values[i] < best:
                best, arg = float(values[i]), tuple(int(x) for x in s[i])
        assert arg is not None
        return self.loss(arg), arg  # the same arithmetic as the trials' values


def _combinations(n: int, k: int) -> np.ndarray:
    """All sorted k-subsets of range(n) as rows of an int8 array, in lexicographic order."""
    rows = np.arange(n - k + 1, dtype=np.int8)[:, None]
    for size in range(1, k):
        last = rows[:, -1].astype(np.int64)
        counts = (n - (k - size)) - last  # next item in last+1 .. n-(k-size), room for the rest
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        nxt = (np.repeat(last, counts) + 1 + offsets).astype(np.int8)
        rows = np.hstack([np.repeat(rows, counts, axis=0), nxt[:, None]])
    return rows


def samplers(n: int, k: int, seed: int) -> dict[str, Callable[[], optuna.samplers.BaseSampler]]:
    return {
        "evop": lambda: EvoPSampler.for_subset(n, k, seed=seed),
        "levelswitch": lambda: LevelSwitchSampler.for_subset(n, k, seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }


def run(problem: Problem, sampler: optuna.samplers.BaseSampler, trials: int) -> list[float]:
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: problem.loss(suggest_mask(t, problem.n, problem.k)), n_trials=trials)
    return [t.value for t in study.get_trials(deepcopy=False) if t.value is not None]


def trials_to_reach(values: list[float], optimum: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v <= optimum + 1e-9), None)


Objective = Callable[[optuna.Trial], float]


def storage_runs(problem: Problem) -> dict[str, tuple[Callable[[], optuna.samplers.BaseSampler], Objective]]:
    """Samplers timed on both storages, each with its objective."""
    n, k = problem.n, problem.k

    def subset(t: optuna.Trial) -> float:
        return problem.loss(suggest_mask(t, n, k))

    return {
        "evop": (lambda: EvoPSampler.for_subset(n, k, seed=0), subset),
        "random_subset": (lambda: RandomMaskSampler.for_subset(n, k, seed=0), subset),
        "optuna_random": (lambda: optuna.samplers.RandomSampler(seed=0), subset),
        "optuna_floor": (
            lambda: optuna.samplers.RandomSampler(seed=0),
            lambda t: t.suggest_float("x", 0.0, 1.0),
        ),
    }


def storage_ratio(
    problem: Problem, trials: int, jobs: list[int], folder: str | None
) -> dict[str, Any]:
    """Seconds for ``trials`` trials in memory and on SQLite, per sampler and thread count."""
    out: dict[str, Any] = {"trials": trials, "problem": f"{problem.k} of {problem.n}", "runs": []}
    for n_jobs in jobs:
        row: dict[str, Any] = {"n_jobs": n_jobs}
        for name, (make, objective) in storage_runs(problem).items():
            seconds = {}
            for where in ("memory", "sqlite"):
                with tempfile.TemporaryDirectory(dir=folder) as tmp:
                    storage = f"sqlite:///{tmp}/toy.db" if where == "sqlite" else None
                    study = optuna.create_study(sampler=make(), storage=storage)
                    start = time.perf_counter()
                    study.optimize(objective, n_trials=trials, n_jobs=n_jobs)
                    seconds[where] = time.perf_counter() - start
            row[name] = {
                "memory_s": round(seconds["memory"], 3),
                "sqlite_s": round(seconds["sqlite"], 3),
                "ratio": round(seconds["sqlite"] / seconds["memory"], 1),
                "sqlite_ms_per_trial": round(1000 * seconds["sqlite"] / trials, 1),
            }
        floor = row["optuna_floor"]["sqlite_s"]
        for name in storage_runs(problem):
            row[name]["sqlite_vs_floor"] = round(row[name]["sqlite_s"] / floor, 2)
        out["runs"].append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=300, help="trials per run")
    parser.add_argument("--n", type=int, nargs=2, default=(20, 30), metavar=("LOW", "HIGH"))
    parser.add_argument("--k", type=int, nargs=2, default=(5, 9), metavar=("LOW", "HIGH"))
    parser.add_argument("--samplers", nargs="+", default=list(samplers(2, 1, 0)))
    parser.add_argument("--sqlite-trials", type=int, default=60, help="0 skips the storage test")
    parser.add_argument("--sqlite-jobs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sqlite-dir", help="where the SQLite files go (default: the temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    args = parser.parse_args(argv)
    unknown = set(args.samplers) - set(samplers(2, 1, 0))
    if unknown:
        parser.error(f"unknown samplers {sorted(unknown)}; choose from {list(samplers(2, 1, 0))}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # Seed s spreads the problems over both ranges, n up while k goes down, so that brute force
    # stays under a million subsets (C(30, 9) = 14 M would take minutes; pass --k 9 9 for it).
    problems = []
    for s in range(args.seeds):
        frac = s / max(args.seeds - 1, 1)
        n = round(args.n[0] + frac * (args.n[1] - args.n[0]))
        k = round(args.k[1] - frac * (args.k[1] - args.k[0]))
        problems.append(Problem(n, k, seed=s))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.samplers}
    for problem in problems:
        start = time.perf_counter()
        optimum, best = problem.optimum()
        brute = time.perf_counter() - start
        print(f"seed {problem.seed}: {problem.k} of {problem.n}, optimum {optimum:.4f} {best} "
              f"(brute force {brute:.1f} s)", file=sys.stderr)  # fmt: skip
        for name in args.samplers:
            start = time.perf_counter()
            values = run(problem, samplers(problem.n, problem.k, problem.seed)[name](), args.trials)
            runs[name].append({
                "seed": problem.seed, "n": problem.n, "k": problem.k, "optimum": optimum,
                "best": min(values), "trials_to_optimum": trials_to_reach(values, optimum),
                "seconds": round(time.perf_counter() - start, 2),
            })  # fmt: skip
            row = runs[name][-1]
            print(f"  {name}: best {row['best']:.4f}, optimum after {row['trials_to_optimum']} "
                  f"trials ({row['seconds']} s)", file=sys.stderr)  # fmt: skip

    summary = {}
    for name, rows in runs.items():
        hits = [r["trials_to_optimum"] for r in rows if r["trials_to_optimum"] is not None]
        summary[name] = {
            "reached": f"{len(hits)}/{len(rows)}",
            "fraction": len(hits) / len(rows),
            "median_trials": statistics.median(hits) if hits else None,
            "median_gap": statistics.median(r["best"] - r["optimum"] for r in rows),
            "seconds": round(sum(r["seconds"] for r in rows), 1),
        }
    storage = (
        storage_ratio(problems[0], args.sqlite_trials, args.sqlite_jobs, args.sqlite_dir)
        if args.sqlite_trials
        else None
    )
    result = {
        "command": "python benchmarks/subset_toy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"optuna {optuna.__version__}",
        "trials_per_run": args.trials,
        "summary": summary,
        "storage": storage,
        "runs": runs,
    }
    print(f"\n{'sampler':<12} {'reached':>8} {'median trials':>14} {'median gap':>11} {'seconds':>8}")
    for name, row in summary.items():
        med = "-" if row["median_trials"] is None else f"{row['median_trials']:g}"
        print(f"{name:<12} {row['reached']:>8} {med:>14} {row['median_gap']:>11.4f} {row['seconds']:>8}")
    if storage:
        print(f"\nSQLite vs in memory, {storage['trials']} trials of problem 0 ({storage['problem']})")
        print(f"{'sampler':<14} {'n_jobs':>6} {'memory s':>9} {'SQLite s':>9} {'ratio':>7} "
              f"{'ms/trial':>9} {'vs floor':>9}")  # fmt: skip
        for row in storage["runs"]:
            for name, r in row.items():
                if name != "n_jobs":
                    print(f"{name:<14} {row['n_jobs']:>6} {r['memory_s']:>9} {r['sqlite_s']:>9} "
                          f"{'x' + str(r['ratio']):>7} {r['sqlite_ms_per_trial']:>9} "
                          f"{'x' + str(r['sqlite_vs_floor']):>9}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
