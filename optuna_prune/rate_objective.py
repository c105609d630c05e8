"""The Optuna objective for layer-wise width-pruning rates: ``rate_xx`` params -> units -> the width fitness.

Glue like :mod:`optuna_prune.objective`, whose bookkeeping it reuses (repair or rejection of an
invalid candidate, per-sample and per-cluster losses, early stops as PRUNED trials); only the
params (one int per layer) and the fitness (:class:`~optuna_prune.width.WidthFitness`) differ.
"""

from __future__ import annotations

import time

import optuna
import torch

from optuna_prune.objective import CANDIDATE_FAILURES, WORKER, MaskObjective
from optuna_prune.rate_space import RateSpace
from optuna_prune.space import METHOD_KEY, STOP_ABOVE_KEY


class RateObjective(MaskObjective):
    """Scores the unit vector a sampler proposed for a :class:`RateSpace`.

    ``fitness`` is a :class:`~optuna_prune.width.WidthFitness`. Besides the attrs of
    :class:`MaskObjective` a trial records ``units`` and ``rates`` (per layer), ``mlp_sparsity``
    (the share of MLP channels really removed) and ``intermediate_sizes``; ``dropped`` is empty.
    """

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        space = self.space
        assert isinstance(space, RateSpace)
        params = {name: trial.suggest_int(name, 0, space.max_units) for name in space.param_names}
        system_attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
        trial.set_user_attr("method", system_attrs.get(METHOD_KEY, self.method))
        trial.set_user_attr("worker", WORKER)
        candidate = space.dropped_from_params(params)
        if not space.is_valid(candidate):
            asked = space.units(candidate)
            candidate = self._fix_invalid(trial, candidate)
            trial.set_user_attr("repaired_from", list(asked))
        units = space.units(candidate)
        sizes = [int(k.numel()) for k in self.fitness.kept(units)]
        trial.set_user_attr("units", list(units))
        trial.set_user_attr("rates", list(space.rates(candidate)))
        trial.set_user_attr("intermediate_sizes", sizes)
        trial.set_user_attr("mlp_sparsity", round(1 - sum(sizes) / sum(self.fitness.widths), 6))
        trial.set_user_attr("dropped", [])
        trial.set_user_attr("n_dropped", 0)

        stop_above = system_attrs.get(STOP_ABOVE_KEY)
        start = time.perf_counter()
        try:
            result = self.fitness.evaluate(units, stop_above=stop_above)
        except CANDIDATE_FAILURES as exc:
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        self._record(trial, result, time.perf_counter() - start)
        if not result.complete:
            trial.report(result.value, step=len(result.samples))
            raise optuna.TrialPruned(f"cannot beat {stop_above:.4f}")
        return self._values(result)
