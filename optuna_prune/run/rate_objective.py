"""The Optuna objective for layer-wise width-pruning rates: ``rate_xx`` params -> units -> the width fitness.

Glue like :mod:`optuna_prune.run.objective`, whose bookkeeping it reuses (repair or rejection of an
invalid candidate, per-sample and per-cluster losses, early stops as PRUNED trials); only the
params (one int per layer) and the fitness (:class:`~optuna_prune.model.width.WidthFitness`) differ.
"""

from __future__ import annotations

import time

import optuna
import torch

from optuna_prune.run.objective import CANDIDATE_FAILURES, MaskObjective
from optuna_prune.search import compat
from optuna_prune.search.rate_space import RateSpace
from optuna_prune.search.record import (
    FAIL_REASON,
    INTERMEDIATE_SIZES_ATTR,
    METHOD_KEY,
    MLP_SPARSITY_ATTR,
    RATES_ATTR,
    REPAIRED_FROM_ATTR,
    STOP_ABOVE_KEY,
    UNITS_ATTR,
    record_candidate,
    record_dropped,
)


class RateObjective(MaskObjective):
    """Scores the unit vector a sampler proposed for a :class:`RateSpace`.

    ``fitness`` is a :class:`~optuna_prune.model.width.WidthFitness`. Besides the attrs of
    :class:`MaskObjective` a trial records ``units`` and ``rates`` (per layer), ``mlp_sparsity``
    (the share of MLP channels really removed) and ``intermediate_sizes``; ``dropped`` is empty.
    """

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        space = self.space
        assert isinstance(space, RateSpace)
        params = {name: trial.suggest_int(name, 0, space.max_units) for name in space.param_names}
        system_attrs = trial.storage.get_trial_system_attrs(compat.trial_id(trial))
        record_candidate(trial, system_attrs.get(METHOD_KEY, self.method))
        candidate = space.dropped_from_params(params)
        if not space.is_valid(candidate):
            asked = space.units(candidate)
            candidate = self._fix_invalid(trial, candidate)
            trial.set_user_attr(REPAIRED_FROM_ATTR, list(asked))
        units = space.units(candidate)
        sizes = [int(k.numel()) for k in self.fitness.kept(units)]
        trial.set_user_attr(UNITS_ATTR, list(units))
        trial.set_user_attr(RATES_ATTR, list(space.rates(candidate)))
        trial.set_user_attr(INTERMEDIATE_SIZES_ATTR, sizes)
        trial.set_user_attr(MLP_SPARSITY_ATTR, round(1 - sum(sizes) / sum(self.fitness.widths), 6))
        record_dropped(trial, [])

        stop_above = system_attrs.get(STOP_ABOVE_KEY)
        start = time.perf_counter()
        try:
            result = self.fitness.evaluate(units, stop_above=stop_above)
        except CANDIDATE_FAILURES as exc:
            trial.set_user_attr(FAIL_REASON, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        self._record(trial, result, time.perf_counter() - start)
        if not result.complete:
            trial.report(result.value, step=len(result.samples))
            raise optuna.TrialPruned(f"cannot beat {stop_above:.4f}")
        return self._values(result)
