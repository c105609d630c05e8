"""The Optuna objective: a trial's layer params -> a drop mask -> the fitness -> values and attrs.

This is one of the two places where the search side (Optuna, the mask space) meets the model side
(torch, the fitness). It records what a user inspects in the dashboard: the dropped layers, the
perplexity, the loss on each CCDS cluster, the cost of the evaluation, and why a trial failed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import optuna
import torch

from optuna_prune.model.fitness import Fitness, FitnessResult, NonFiniteLossError
from optuna_prune.search import compat
from optuna_prune.search.pruners import score_in_stages
from optuna_prune.search.record import (
    ALLOW_PARTIAL_KEY,
    EVAL_SECONDS_ATTR,
    FAIL_REASON,
    INVALID_MASK_ATTR,
    LAYER_FORWARDS_ATTR,
    METHOD_KEY,
    PER_CLUSTER_ATTR,
    PER_SAMPLE_ATTR,
    PERPLEXITY_ATTR,
    REPAIRED_FROM_ATTR,
    STOP_ABOVE_KEY,
    STOPPED_EARLY_ATTR,
    record_candidate,
    record_dropped,
)
from optuna_prune.search.space import LayerMaskSpace

# Failures that belong to one candidate: recorded as FAIL, the study goes on.
CANDIDATE_FAILURES: tuple[type[BaseException], ...] = (NonFiniteLossError, torch.OutOfMemoryError)


@dataclass
class MaskObjective:
    """Scores the mask a sampler proposed.

    ``mode`` turns per-cluster calibration losses into the objective: "mean" (one value),
    "worst" (the worst cluster, EvoP's robustness) or "clusters" (one objective per cluster, for a
    multi-objective sampler). Masks without exactly k drops are repaired or rejected
    (``invalid``), except the partial masks a greedy sampler asks for on purpose.
    ``stages`` (sample counts, single objective only) turns on multi-fidelity scoring: after each
    stage the running mean is reported and the study's pruner may stop the candidate (see
    :func:`optuna_prune.search.pruners.score_in_stages`).
    """

    fitness: Fitness
    space: LayerMaskSpace
    method: str
    cluster_ids: Sequence[int] | None = None
    mode: str = "mean"
    invalid: str = "repair"
    stages: Sequence[int] = ()

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        params = {
            name: trial.suggest_categorical(name, [0, 1]) for name in self.space.param_names
        }
        system_attrs = trial.storage.get_trial_system_attrs(compat.trial_id(trial))
        method = system_attrs.get(METHOD_KEY, self.method)
        record_candidate(trial, method)
        dropped = self.space.dropped_from_params(params)
        partial = bool(system_attrs.get(ALLOW_PARTIAL_KEY)) and len(dropped) < self.space.num_drop
        if not partial and not self.space.is_valid(dropped):
            dropped = self._fix_invalid(trial, dropped)
        record_dropped(trial, dropped)

        stop_above = system_attrs.get(STOP_ABOVE_KEY)
        staged = bool(self.stages)
        start = time.perf_counter()
        try:
            if staged:
                result, why = self._evaluate_in_stages(trial, dropped, stop_above)
            else:
                result, why = self.fitness.evaluate(dropped, stop_above=stop_above), None
        except CANDIDATE_FAILURES as exc:
            trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        self._record(trial, result, time.perf_counter() - start)

        if partial or not result.complete:
            trial.set_user_attr(STOPPED_EARLY_ATTR, not result.complete)
            if not staged:  # staged scoring reported already
                trial.report(result.value, step=len(result.samples))
            raise optuna.TrialPruned(
                why or ("partial greedy step" if result.complete else f"cannot beat {stop_above:.4f}")
            )
        return self._values(result)

    def _evaluate_in_stages(
        self, trial: optuna.Trial, dropped: tuple[int, ...], stop_above: float | None
    ) -> tuple[FitnessResult, str | None]:
        """Score sample by sample with staged reports; the result, and why it stopped early."""
        fitness = self.fitness
        forwards = fitness.layer_forwards
        score = score_in_stages(
            trial, fitness.iter_samples(dropped), n_samples=len(fitness.calibration.input_ids),
            total_tokens=fitness.total_tokens, stages=self.stages, stop_above=stop_above,
            bounds=fitness.iter_bounds(dropped) if fitness.has_bound and dropped else None,
        )
        result = FitnessResult(
            dropped=dropped, value=score.loss_sum / fitness.total_tokens,
            samples=tuple(score.samples), complete=score.stopped is None,
            layer_forwards=fitness.layer_forwards - forwards, total_tokens=fitness.total_tokens,
        )
        return result, score.stopped

    def _fix_invalid(self, trial: optuna.Trial, dropped: tuple[int, ...]) -> tuple[int, ...]:
        if self.invalid == "reject":
            trial.set_user_attr(INVALID_MASK_ATTR, list(dropped))
            raise optuna.TrialPruned(
                f"mask drops {len(dropped)} layers, not {self.space.num_drop}: rejected"
            )
        rng = np.random.RandomState(trial.number)
        fixed = self.space.from_array(self.space.repair(self.space.to_array(dropped), rng))
        trial.set_user_attr(REPAIRED_FROM_ATTR, list(dropped))
        return fixed

    def _record(self, trial: optuna.Trial, result: FitnessResult, seconds: float) -> None:
        trial.set_user_attr(STOPPED_EARLY_ATTR, not result.complete)
        trial.set_user_attr(LAYER_FORWARDS_ATTR, result.layer_forwards)
        trial.set_user_attr(EVAL_SECONDS_ATTR, round(seconds, 4))
        trial.set_user_attr(PER_SAMPLE_ATTR, [round(v, 6) for v in result.per_sample])
        if self.fitness.name == "perplexity" and result.complete:
            trial.set_user_attr(PERPLEXITY_ATTR, math.exp(result.value))
        if result.complete and self.cluster_ids is not None:
            trial.set_user_attr(PER_CLUSTER_ATTR, cluster_losses(result, self.cluster_ids))

    def _values(self, result: FitnessResult) -> float | list[float]:
        if self.mode == "mean":
            return result.value
        per_cluster = cluster_losses(result, self.cluster_ids or [])
        return max(per_cluster) if self.mode == "worst" else per_cluster


def cluster_losses(result: FitnessResult, cluster_ids: Sequence[int]) -> list[float]:
    """Token-weighted mean loss of each CCDS cluster, in cluster order."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for sample in result.samples:
        c = cluster_ids[sample.index]
        sums[c] = sums.get(c, 0.0) + sample.loss_sum
        counts[c] = counts.get(c, 0) + sample.n_tokens
    return [sums[c] / counts[c] for c in sorted(sums)]
