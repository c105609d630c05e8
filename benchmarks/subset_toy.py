"""The exact-k samplers against Optuna's own on k-of-n problems whose optimum is known.

Each problem (one per seed) picks k of n items minimising ``sum cost[i] + sum_{i<j} pair[i, j]``
over the chosen items, with mixed-sign pair interactions, so the optimum is not simply the k
cheapest items; brute force over all C(n, k) subsets finds it. EvoP and level switch propose exact-k
subsets through ``suggest_mask``; Optuna's RandomSampler, TPESampler and NSGAIISampler get the same
n ``{0, 1}`` params through the same ``suggest_mask`` and a subset of the wrong size scores
``PENALTY + |size - k|``. Printed per sampler: the fraction of seeds whose run reaches the optimum
within ``--trials``, and the median trials to reach it (over the runs that do).

Then the storage cost: the same EvoP run on SQLite and in memory (``--sqlite-jobs`` threads), next
to Optuna's RandomSampler under the same conditions, whose ratio is what SQLite's commits cost any
sampler (the trial's params alone are one commit each).

Writes benchmarks/results/subset_toy.json. Usage (defaults take a few minutes on 2 busy cores):
    python benchmarks/subset_toy.py [--seeds 10] [--trials 300] [--n 20 30] [--k 5 9]
        [--samplers evop levelswitch random tpe nsgaii] [--sqlite-trials 60] [--sqlite-jobs 4]
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

from optuna_prune.subset import EvoPSampler, LevelSwitchSampler, suggest_mask

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


def storage_ratio(problem: Problem, trials: int, jobs: int) -> dict[str, Any]:
    """Seconds for ``trials`` trials in memory and on SQLite, EvoP and Optuna's RandomSampler."""
    out: dict[str, Any] = {"trials": trials, "n_jobs": jobs}
    for name, make in (
        ("evop", lambda: EvoPSampler.for_subset(problem.n, problem.k, seed=0)),
        ("random", lambda: optuna.samplers.RandomSampler(seed=0)),
    ):
        for where in ("memory", "sqlite"):
            with tempfile.TemporaryDirectory() as folder:
                storage = f"sqlite:///{folder}/toy.db" if where == "sqlite" else None
                study = optuna.create_study(sampler=make(), storage=storage)
                start = time.perf_counter()
                study.optimize(
                    lambda t: problem.loss(suggest_mask(t, problem.n, problem.k)),
                    n_trials=trials,
                    n_jobs=jobs,
                )
                out[f"{name}_{where}_s"] = round(time.perf_counter() - start, 3)
        out[f"{name}_ratio"] = round(out[f"{name}_sqlite_s"] / out[f"{name}_memory_s"], 1)
    out["evop_sqlite_vs_random_sqlite"] = round(out["evop_sqlite_s"] / out["random_sqlite_s"], 2)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--trials", type=int, default=300, help="trials per run")
    parser.add_argument("--n", type=int, nargs=2, default=(20, 30), metavar=("LOW", "HIGH"))
    parser.add_argument("--k", type=int, nargs=2, default=(5, 9), metavar=("LOW", "HIGH"))
    parser.add_argument("--samplers", nargs="+", default=list(samplers(2, 1, 0)))
    parser.add_argument("--sqlite-trials", type=int, default=60, help="0 skips the storage test")
    parser.add_argument("--sqlite-jobs", type=int, default=4)
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
        storage_ratio(problems[0], args.sqlite_trials, args.sqlite_jobs) if args.sqlite_trials else None
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
        print(f"\nSQLite vs in memory, {storage['trials']} trials, n_jobs={storage['n_jobs']}: "
              f"EvoP {storage['evop_sqlite_s']} s / {storage['evop_memory_s']} s "
              f"(x{storage['evop_ratio']}), Optuna RandomSampler {storage['random_sqlite_s']} s / "
              f"{storage['random_memory_s']} s (x{storage['random_ratio']}); EvoP on SQLite takes "
              f"x{storage['evop_sqlite_vs_random_sqlite']} RandomSampler's time")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
