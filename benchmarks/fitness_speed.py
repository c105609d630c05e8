"""Fitness speed: the project's fitness vs SLEB's own way of scoring masks, on the real SmolLM2-135M.

Two real searches at 20% sparsity (a SLEB greedy run and an EvoP genetic run) are run once to get
their mask sequences and the thresholds the samplers set. Both sequences are then replayed through

  (a) SLEB's way: toggle the layers in place and run the full forward pass for every mask;
  (b) the project's fitness: dense-prefix reuse, prefix LRU cache, exact early stop, dedup.

Both must agree (equal losses for complete results; a stopped candidate's true loss is above its
threshold). Prints masks/second for each and the ratios:

    sleb-sequence ratio: X
    ga-sequence ratio: Y

Usage: python benchmarks/fitness_speed.py [--data-dir ../shared/data] [--samples 4 --seq-len 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import optuna
import torch
from tqdm import tqdm

from optuna_prune.model.calibration import build_calibration
from optuna_prune.model.fitness import PerplexityFitness, plain_forward_loss
from optuna_prune.model.layers import find_layer_stack
from optuna_prune.model.models import load_model
from optuna_prune.run.objective import MaskObjective
from optuna_prune.search.record import STOP_ABOVE_KEY
from optuna_prune.search.samplers import EvoPSampler, SLEBSampler
from optuna_prune.search.space import LayerMaskSpace, resolve_num_drop

ROOT = Path(__file__).resolve().parents[1]


def record_search(sampler, objective: MaskObjective, n_trials: int | None) -> list[tuple[tuple[int, ...], float | None]]:
    """Run a search in memory; return (mask, stop_above) for every evaluation, in order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=n_trials, show_progress_bar=True)
    return [
        (tuple(t.user_attrs["dropped"]), t.system_attrs.get(STOP_ABOVE_KEY))
        for t in study.get_trials(deepcopy=False)
        if "dropped" in t.user_attrs
    ]


def replay(model, calibration, sequence, label: str) -> float:
    """Time (a) and (b) on the same sequence, check they agree, print masks/s, return the ratio."""
    t0 = time.perf_counter()
    fitness = PerplexityFitness(model, calibration)  # its dense pass counts in (b)'s time
    ours = [fitness.evaluate(mask, stop_above=thr) for mask, thr in tqdm(sequence, desc=f"{label}: ours")]
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    plain = [plain_forward_loss(model, calibration, mask) for mask, _ in tqdm(sequence, desc=f"{label}: SLEB way")]
    t_plain = time.perf_counter() - t0

    stopped = 0
    for (mask, thr), got, ref in zip(sequence, ours, plain, strict=True):
        if got.complete:
            assert abs(got.value - ref) <= 1e-4 * max(1.0, abs(ref)), (mask, got.value, ref)
        else:
            stopped += 1
            assert thr is not None and ref > thr and got.value <= ref + 1e-6, (mask, got.value, ref, thr)
    n = len(sequence)
    print(f"{label}: {n} masks, {len(set(m for m, _ in sequence))} distinct, {stopped} stopped early")
    print(f"  SLEB way (toggle + full forward): {n / t_plain:.3f} masks/s ({t_plain / n:.2f} s/mask)")
    print(f"  optuna-prune fitness:             {n / t_ours:.3f} masks/s ({t_ours / n:.2f} s/mask), "
          f"{fitness.layer_forwards} layer forwards vs {n * calibration.n_samples * find_layer_stack(model).num_layers} "
          f"naive, cache hits {fitness.cache.hits}")
    return t_plain / t_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--ga-trials", type=int, default=100)
    parser.add_argument("--population", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device="cpu")
    calibration = build_calibration(
        tokenizer, args.calibration, n_samples=args.samples, seq_len=args.seq_len, seed=0, data_dir=args.data_dir
    )
    num_layers = find_layer_stack(model).num_layers
    space = LayerMaskSpace(num_layers, resolve_num_drop(num_layers, sparsity=args.sparsity))
    print(f"{args.model}: {num_layers} layers, drop {space.num_drop}; calibration {args.samples} x {args.seq_len} "
          f"tokens of {args.calibration}; {torch.get_num_threads()} threads")

    search_fitness = PerplexityFitness(model, calibration)
    sleb_seq = record_search(SLEBSampler(space), MaskObjective(search_fitness, space, "sleb"), None)
    print(f"SLEB search: {len(sleb_seq)} evaluations")
    ga_seq = record_search(
        EvoPSampler(space, population_size=args.population, seed=0),
        MaskObjective(search_fitness, space, "evop"), args.ga_trials,
    )
    firsts = [min(m) for m, _ in ga_seq if m]
    print(f"GA masks drop their first layer at index {sum(firsts) / len(firsts):.1f} on average")

    sleb_ratio = replay(model, calibration, sleb_seq, "SLEB greedy sequence")
    ga_ratio = replay(model, calibration, ga_seq, "EvoP genetic sequence")
    print(f"sleb-sequence ratio: {sleb_ratio:.2f}")
    print(f"ga-sequence ratio: {ga_ratio:.2f}")


if __name__ == "__main__":
    main()
