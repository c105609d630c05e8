"""Multi-fidelity selection vs scoring every candidate on all samples, at equal tokens scored.

Real SmolLM2-135M, C4 calibration windows, perplexity fitness. Each search (EvoP, EvoP with
multi-fidelity selection, level switch with it) runs through the project's own objective,
samplers and pruner until it has scored ``--budget`` calibration samples: the search's cost,
since every sample is one forward pass of the same length (wall time on an idle machine is
proportional to it; on a shared one it is the only fair clock). The curve of the best COMPLETE
loss against samples scored is what is compared.

Per-sample losses are deterministic, so they are computed once, one sample at a time (a
candidate pruned after one sample costs one sample here too), and kept in ``--cache`` across
runs and variants; each run is still charged for every sample its objective consumes.

Usage:
    python benchmarks/multifidelity.py --data-dir ../shared/data --n-samples 4 --seq-len 256 \\
        --sparsity 0.2 0.3 --seeds 0 1 --budget 320
Prints a table: mean best loss (and perplexity) at 25/50/100% of the budget per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import optuna
import torch

from optuna_prune.model.calibration import CalibrationSet, build_calibration
from optuna_prune.model.fitness import Fitness, PerplexityFitness, SampleLoss
from optuna_prune.model.layers import find_layer_stack
from optuna_prune.model.models import load_model
from optuna_prune.run.objective import MaskObjective
from optuna_prune.search.pruners import GenerationHalvingPruner, default_stages
from optuna_prune.search.samplers import EvoPSampler, LevelSwitchSampler
from optuna_prune.search.space import LayerMaskSpace, resolve_num_drop

FRACTIONS = (0.25, 0.5, 1.0)


class _NoMemo(dict):
    """Fitness.evaluate's memo, disabled: a repeated mask must be charged again."""

    def __setitem__(self, key, value) -> None:  # noqa: ANN001
        pass


class SampleCache:
    """A fitness whose per-sample losses come from a disk cache, computed one sample at a time.

    Duck-types what MaskObjective uses of a Fitness; ``evaluate`` is Fitness.evaluate itself
    (exact early stop included), running over this class's ``iter_samples``.
    """

    name = "perplexity"
    evaluate = Fitness.evaluate

    def __init__(self, model: torch.nn.Module, calibration: CalibrationSet, path: Path) -> None:
        ids = calibration.input_ids
        self.calibration = calibration
        self.num_layers = find_layer_stack(model).num_layers
        self.total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        self._memo = _NoMemo()
        self.layer_forwards = 0
        self.charged = 0
        self.computed = 0
        self._path = path
        self._store: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        # One fitness per sample, so that sample j can be scored without samples 0..j-1.
        self._parts = [
            PerplexityFitness(
                model,
                CalibrationSet(input_ids=ids[j : j + 1], source="c4", seed=0, sha256=f"{j}"),
                cache_bytes=64 << 20,
                verify=False,
            )
            for j in range(ids.shape[0])
        ]
        self._n_tokens = ids.shape[1] - 1
        self._prefix = calibration.sha256[:12]

    def iter_samples(self, dropped: Sequence[int]) -> Iterator[SampleLoss]:
        mask = ",".join(map(str, sorted(dropped)))
        for j, part in enumerate(self._parts):
            key = f"{self._prefix}/{mask}/{j}"
            if key not in self._store:
                self._store[key] = part.evaluate(dropped).samples[0].loss_sum
                self.computed += 1
                if self.computed % 50 == 0:
                    self.save()
            self.charged += 1
            yield SampleLoss(j, self._store[key], self._n_tokens)

    def save(self) -> None:
        self._path.write_text(json.dumps(self._store))


def run(
    fitness: SampleCache,
    space: LayerMaskSpace,
    make: Callable[[int], tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner | None]],
    stages: Sequence[int],
    seed: int,
    budget: int,
) -> dict[float, float]:
    """Best COMPLETE loss after each fraction of ``budget`` samples scored."""
    sampler, pruner = make(seed)
    study = optuna.create_study(sampler=sampler, pruner=pruner)
    objective = MaskObjective(fitness, space, method="bench", stages=stages)
    start = fitness.charged
    best = {f: math.inf for f in FRACTIONS}
    running = math.inf

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal running
        spent = fitness.charged - start
        if trial.state == optuna.trial.TrialState.COMPLETE:
            running = min(running, trial.value)
        for f in FRACTIONS:
            if spent <= f * budget:
                best[f] = running
        if spent >= budget:
            study.stop()

    study.optimize(objective, n_trials=100 * budget, callbacks=[callback])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=320, help="calibration samples per search")
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=["evop", "evop+mf", "levelswitch+mf"])
    parser.add_argument("--cache", default="/tmp/optuna_prune_mf_cache.json")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    model, tokenizer = load_model(args.model, device="cpu")
    calibration = build_calibration(
        tokenizer, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=0,
        data_dir=args.data_dir,
    )
    fitness = SampleCache(model, calibration, Path(args.cache))
    num_layers = fitness.num_layers
    stages = default_stages(args.n_samples)
    variants = {
        "evop": (lambda s: (EvoPSampler(space, population_size=args.population, seed=s), None), ()),
        "evop+mf": (lambda s: _with_pruner(EvoPSampler(space, population_size=args.population, seed=s)), stages),
        "evop+mf-noparents": (
            lambda s: _with_pruner(EvoPSampler(space, population_size=args.population, seed=s), with_parents=False),
            stages,
        ),
        "levelswitch": (lambda s: (LevelSwitchSampler(space, seed=s), None), ()),
        "levelswitch+mf": (lambda s: _with_pruner(LevelSwitchSampler(space, seed=s)), stages),
    }
    print(f"{args.model}, c4 {args.n_samples} x {args.seq_len}, stages {list(stages)}, "
          f"budget {args.budget} samples ({args.budget * (args.seq_len - 1)} tokens) per search")
    results: dict[tuple[float, str], list[dict[float, float]]] = {}
    for sparsity in args.sparsity:
        k = resolve_num_drop(num_layers, sparsity)
        space = LayerMaskSpace(num_layers, k)
        for name in args.variants:
            make, st = variants[name]
            for seed in args.seeds:
                t0, computed = time.perf_counter(), fitness.computed
                best = run(fitness, space, make, st, seed, args.budget)
                results.setdefault((sparsity, name), []).append(best)
                print(f"  sparsity {sparsity} {name:18s} seed {seed}: "
                      + "  ".join(f"{f:.0%} {best[f]:.4f}" for f in FRACTIONS)
                      + f"  ({fitness.computed - computed} new samples, {time.perf_counter() - t0:.0f} s)",
                      flush=True)
                fitness.save()
    print("\nmean best calibration loss (perplexity) at 25% / 50% / 100% of the budget")
    for (sparsity, name), runs in results.items():
        cells = []
        for f in FRACTIONS:
            v = float(np.mean([r[f] for r in runs]))
            cells.append(f"{v:.4f} ({math.exp(v):.1f})")
        print(f"  {sparsity:.1f}  {name:18s} " + "  ".join(cells))


def _with_pruner(sampler: EvoPSampler, **kwargs: object) -> tuple[EvoPSampler, GenerationHalvingPruner]:
    return sampler, GenerationHalvingPruner(sampler, **kwargs)


if __name__ == "__main__":
    main()
