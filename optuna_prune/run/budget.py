"""A method's trial budget in a shared study, its time budget, and the progress bar that counts it.

Budgets are counted in storage, not in memory: every worker of a study sees the same count, so
the method stops at exactly ``n_trials`` evaluations however many processes run it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from optuna_prune.progress import progress_bar
from optuna_prune.search import compat
from optuna_prune.search.record import EVAL_SECONDS_ATTR, FAIL_REASON, PER_SAMPLE_ATTR, trial_method

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
"""A method's evaluations."""
_COUNTED = (*FINISHED, TrialState.RUNNING)


class BudgetReached(RuntimeError):
    """A trial started while other workers' trials already filled the method's budget."""


def method_trials(study: optuna.Study, method: str, states: tuple[TrialState, ...] | None = None) -> list[optuna.trial.FrozenTrial]:
    """Trials that ``method`` proposed (tagged by its sampler, or by the objective as user attr)."""
    return [
        t for t in study.get_trials(deepcopy=False, states=states)
        if trial_method(t) == method
    ]


class Deadline:
    """A trial callback that ends the search while its next trial and the validation pick after it
    still fit before ``deadline`` (``time.monotonic()``), the end of ``--timeout``.

    Optuna's own timeout only stops starting trials, so a run would end up to a trial past it, and
    the pick (``pick_masks`` masks scored on ``pick_windows`` validation windows) after that. Both are
    estimated from this search's trials: the median trial's wall time, and the median seconds per
    window its fitness scored. A benchmark that gives every method SLEB's time gives none more.
    """

    def __init__(self, deadline: float, pick_windows: int = 0, pick_masks: int = 0) -> None:
        self.deadline, self.pick_windows, self.pick_masks = deadline, pick_windows, pick_masks
        self._trial: list[float] = []
        self._window: list[float] = []

    def seconds(self) -> float:
        """The estimated time the next trial and the pick take (0 before any trial ended)."""
        trial = float(np.median(self._trial)) if self._trial else 0.0
        window = float(np.median(self._window)) if self._window else 0.0
        return trial + self.pick_masks * self.pick_windows * window

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.duration is not None:
            self._trial.append(trial.duration.total_seconds())
        seconds, scored = trial.user_attrs.get(EVAL_SECONDS_ATTR), trial.user_attrs.get(PER_SAMPLE_ATTR)
        if seconds is not None and scored:
            self._window.append(seconds / len(scored))
        if time.monotonic() + self.seconds() >= self.deadline:
            study.stop()


def _fail_stale(study: optuna.Study) -> None:
    """Fail (and re-queue) the trials whose worker's heartbeat went stale, so a wait on them ends."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def wait_for_running(study: optuna.Study, method: str, until: float | None = None, poll_interval: float = 0.5) -> bool:
    """Wait while other workers run trials of ``method`` (the last candidates of a seeding SLEB run),
    failing those whose worker is gone (heartbeats), until none runs or ``until`` (``time.monotonic()``)
    passes. True if it waited and none runs now: their results, or a retry to run, are in storage."""
    waited = False
    while method_trials(study, method, (TrialState.RUNNING,)):
        if until is not None and time.monotonic() >= until:
            return False
        waited = True
        _fail_stale(study)
        time.sleep(poll_interval)
    return waited


@dataclass
class MethodBudget:
    """Stop the study once ``method`` has ``n_trials`` finished trials, exactly, across all workers.

    A worker starts no trial while running ones would fill the budget: it waits, since one of them
    may still fail (a killed worker's, after its heartbeat grace period) and need a replacement.
    Two workers that start a trial at the same moment are settled by trial number: the later one
    is not evaluated (:meth:`guard`) and recorded FAIL, so it counts nowhere.
    """

    method: str
    n_trials: int
    poll_interval: float = 0.5

    def done(self, study: optuna.Study) -> int:
        return len(method_trials(study, self.method, FINISHED))

    def has_room(self, study: optuna.Study) -> bool:
        """False once the budget is reached; True as soon as one more trial fits beside the running ones."""
        while True:
            counted = method_trials(study, self.method, _COUNTED)
            done = sum(t.state != TrialState.RUNNING for t in counted)
            if done >= self.n_trials:
                return False
            if len(counted) < self.n_trials:
                return True
            if not compat.is_heartbeat_enabled(compat.study_storage(study)):
                return False  # dead workers cannot be told from slow ones: leave the rest to them
            _fail_stale(study)
            time.sleep(self.poll_interval)

    def admits(self, study: optuna.Study, trial: optuna.trial.BaseTrial) -> bool:
        """Whether fewer than ``n_trials`` earlier trials of the method are finished or running."""
        earlier = [t for t in method_trials(study, self.method, _COUNTED) if t.number < trial.number]
        return len(earlier) < self.n_trials

    def guard(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        """``objective``, except for a trial beyond the budget: FAIL with a reason, not evaluated."""

        def run(trial: optuna.Trial) -> Any:
            if not self.admits(trial.study, trial):
                reason = f"not evaluated: other workers' trials fill the {self.method} budget of {self.n_trials}"
                trial.set_user_attr(FAIL_REASON, reason)
                raise BudgetReached(reason)
            return objective(trial)

        return run

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.has_room(study):
            study.stop()


class SearchProgress:
    """An ``optimize`` callback that shows a method's progress: evaluations done of its budget (all
    workers' finished trials, as :class:`MethodBudget` counts them), the best loss so far, elapsed
    time and the time left. The total is the budget, or what a self-stopping method (SLEB,
    exhaustive) plans; without either (a timeout only) the bar counts without an estimate.

    Reading every trial after each one would cost a storage scan per trial, so this process's own
    trials are counted as they finish and the study is recounted every ``recount`` seconds.
    """

    def __init__(self, study: optuna.Study, method: str, total: int | None, enabled: bool = True,
                 perplexity: bool = False, recount: float = 5.0) -> None:

        self.method = method
        self.perplexity = perplexity
        self.recount = recount
        self.bar = progress_bar(total, method, "eval", enabled=enabled)
        self.done = self.failed = 0
        self.best: float | None = None
        self.counted_at = -math.inf
        self(study, None)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        if time.monotonic() - self.counted_at >= self.recount:
            self.done = self.failed = 0
            self.best = None
            for t in method_trials(study, self.method, (*FINISHED, TrialState.FAIL)):
                self._count(t)
            self.counted_at = time.monotonic()
        elif trial is not None and trial_method(trial) == self.method:
            self._count(trial)
        parts = [] if self.best is None else [f"best loss {self.best:.4f}"]
        if self.best is not None and self.perplexity:
            parts.append(f"ppl {math.exp(self.best):.2f}")
        if self.failed:
            parts.append(f"{self.failed} failed")
        self.bar.n = self.done
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.refresh()

    def _count(self, t: optuna.trial.FrozenTrial) -> None:
        if t.state == TrialState.FAIL:
            self.failed += 1
            return
        self.done += 1
        if t.state == TrialState.COMPLETE and t.values:
            loss = float(np.mean(t.values))
            if math.isfinite(loss) and (self.best is None or loss < self.best):
                self.best = loss

    def close(self) -> None:
        self.bar.close()
