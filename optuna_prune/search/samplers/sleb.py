"""SLEB's greedy block elimination as an Optuna sampler.

Step s (0-based) scores ``base_s + {i}`` for every layer i not yet dropped (and not protected);
the best becomes ``base_{s+1}``; after k steps ``base_k`` is the result. Each candidate is one
trial, so every step is visible in the dashboard, resumable, and split between workers. The
greedy state is rebuilt from the trials in storage on every proposal.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.search import compat
from optuna_prune.search.record import ALLOW_PARTIAL_KEY, METHOD_KEY, STEP_KEY, STOP_ABOVE_KEY
from optuna_prune.search.samplers.base import (
    MaskSampler,
    Proposal,
    Wait,
    _stop,
    trial_loss,
    trial_mask,
)
from optuna_prune.search.space import LayerMaskSpace

_logger = logging.getLogger(__name__)



class SLEBError(RuntimeError):
    """A greedy step cannot pick a layer: all its candidates failed."""


@dataclass
class _Candidate:
    loss: float | None = None  # exact loss, or a lower bound if not exact
    exact: bool = False
    running: list[int] = field(default_factory=list)  # trial numbers
    failures: int = 0  # FAIL, or finished without any loss

    def merge(self, loss: float, exact: bool) -> None:
        """Keep an exact loss over a lower bound, and the tightest of several lower bounds."""
        if self.loss is None or (exact and not self.exact):
            self.loss, self.exact = loss, exact
        elif exact == self.exact:
            self.loss = min(self.loss, loss) if exact else max(self.loss, loss)


@dataclass
class _Plan:
    step: int  # the step in progress; num_drop when the greedy search is done
    base: tuple[int, ...]  # layers dropped by the steps before
    todo: list[int] = field(default_factory=list)  # layers to propose, best guess first
    running: tuple[int, ...] = ()  # trial numbers still scoring this step
    best: float | None = None  # best exact loss so far in this step


class SLEBSampler(MaskSampler):
    """SLEB: drop one layer at a time, always the one whose removal hurts the loss least.

    Intermediate steps propose masks with fewer than k drops and set ``ALLOW_PARTIAL_KEY``; the
    objective scores them and records them as PRUNED (loss as last intermediate value). The last
    step's candidates have exactly k drops and complete normally. Within a step, candidates are
    proposed in the order of their previous-step loss (best first), and each gets
    ``STOP_ABOVE_KEY`` = the step's best exact loss so far, so a hopeless candidate may stop
    early without changing the argmin. With several workers, the next step waits until every
    candidate of the current step is finished. ``study.stop()`` is called when all k steps are
    done; :func:`sleb_result` then returns the final mask. With a
    :class:`~optuna_prune.search.pruners.GenerationHalvingPruner` and staged scoring, a step is ranked
    like a generation: candidates outranked on a few samples stop (inexact, never the winner),
    and the step picks the best candidate scored on all samples.

    Args:
        space: The masks to search; its ``protected`` layers are never dropped.
        protect_ends: Also never drop the first and the last layer (SLEB's default).
        max_retries: How often a FAILed candidate is proposed again before the step does
            without it.
        seed: Unused by the greedy search itself; kept for a uniform sampler signature.
    """

    method = "sleb"

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        protect_ends: bool = True,
        max_retries: int = 1,
        seed: int | None = None,
    ) -> None:
        super().__init__(space, seed=seed)
        self._protect_ends = bool(protect_ends)
        ends = set(space.ends()) if protect_ends else set()
        # Raises SpaceError when k layers cannot be dropped without the ends.
        self._greedy = LayerMaskSpace(
            space.num_layers, space.num_drop, sorted(set(space.protected) | ends)
        )
        self._max_retries = int(max_retries)

    @classmethod
    def _get_generation_key(cls) -> str:
        """The trial system attr grouping one greedy step, as a GA sampler's generation does, so
        :class:`~optuna_prune.search.pruners.GenerationHalvingPruner` ranks a candidate within its step."""
        return STEP_KEY

    def planned_trials(self) -> int:
        """Every candidate of every greedy step: step s tries each droppable layer not yet dropped."""
        droppable = len(self._greedy.droppable)
        return sum(droppable - step for step in range(self._space.num_drop))

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "protect_ends": self._protect_ends,
            "max_retries": self._max_retries,
        }

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._finish(study, trial, state)
        if state == TrialState.FAIL:
            return  # this worker goes on and proposes the candidate again
        trials = compat.study_storage(study).get_all_trials(compat.study_id(study), deepcopy=False)
        try:
            plan = self._plan(self._with_state(trials, trial, state, values))
        except SLEBError:
            return  # raised, with its message, when the next trial is asked for
        last = self._space.num_drop - 1
        if plan.step > last or (plan.step == last and not plan.todo):
            _stop(study)

    def _plan(self, trials: list[FrozenTrial]) -> _Plan:
        """Replay the greedy search from the SLEB trials in ``trials``."""
        records: dict[tuple[int, ...], _Candidate] = defaultdict(_Candidate)
        for t in trials:
            if t.system_attrs.get(METHOD_KEY) != self.method or STEP_KEY not in t.system_attrs:
                continue
            mask = trial_mask(t, self._space)
            if mask is None:
                continue
            record = records[mask]
            loss = trial_loss(t) if t.state.is_finished() else None
            if loss is not None:
                record.merge(*loss)
            elif t.state.is_finished():
                record.failures += 1
            else:
                record.running.append(t.number)

        k = self._space.num_drop
        base: tuple[int, ...] = ()
        previous: dict[int, float] = {}
        for step in range(k):
            candidates = [i for i in self._greedy.droppable if i not in base]
            candidates.sort(key=lambda i: (previous.get(i, math.inf), i))
            todo, running = [], []
            scored: dict[int, _Candidate] = {}
            for i in candidates:
                record = records.get(tuple(sorted((*base, i))), _Candidate())
                if record.loss is not None:
                    scored[i] = record
                elif record.running:
                    running.extend(record.running)
                elif record.failures <= self._max_retries:
                    todo.append(i)
            exact = {i: r.loss for i, r in scored.items() if r.exact and r.loss is not None}
            best = min(exact.values()) if exact else None
            if todo or running:
                return _Plan(step, base, todo, tuple(running), best)
            if not scored:
                raise SLEBError(
                    f"SLEB step {step} (dropped so far: {list(base)}): every candidate failed "
                    f"{self._max_retries + 1} times; see the FAIL trials' fail_reason and fix "
                    "the objective before resuming"
                )
            if not exact:  # only lower bounds: the objective stopped every candidate early
                _logger.warning("SLEB step %d has no exact loss; using lower bounds", step)
                exact = {i: r.loss for i, r in scored.items() if r.loss is not None}
            winner = min(exact, key=lambda i: (exact[i], i))
            previous = {i: r.loss for i, r in scored.items() if r.loss is not None}
            base = tuple(sorted((*base, winner)))
        return _Plan(k, base)

    def _propose(
        self,
        study: Study,
        trial: FrozenTrial,
        trials: list[FrozenTrial],
        seed: tuple[int, ...] | None,
    ) -> Proposal | Wait:
        if len(study.directions) != 1 or study.direction != StudyDirection.MINIMIZE:
            raise ValueError(
                f"SLEB needs one objective to minimise, the study has {study.directions}; "
                "use a single-objective study (e.g. mean or worst cluster loss)"
            )
        if seed is not None:
            return Proposal(seed)
        plan = self._plan([t for t in trials if t.number != trial.number])
        k = self._space.num_drop
        if plan.step == k:
            return self._surplus(plan.base)
        if not plan.todo:
            return Wait(plan.running)
        layer = plan.todo[0]
        attrs: dict[str, Any] = {STEP_KEY: plan.step}
        if plan.step < k - 1:
            attrs[ALLOW_PARTIAL_KEY] = True
        if plan.best is not None:
            attrs[STOP_ABOVE_KEY] = plan.best
        return Proposal(tuple(sorted((*plan.base, layer))), attrs)


def sleb_result(study: Study) -> tuple[int, ...] | None:
    """The layers SLEB dropped in ``study``, or None if its greedy search has not finished."""
    config = compat.study_storage(study).get_study_system_attrs(compat.study_id(study)).get(SLEBSampler.config_key())
    if config is None:
        return None
    sampler = SLEBSampler(
        LayerMaskSpace.from_dict(config["space"]),
        protect_ends=config["protect_ends"],
        max_retries=config["max_retries"],
    )
    plan = sampler._plan(compat.study_storage(study).get_all_trials(compat.study_id(study), deepcopy=False))
    return plan.base if plan.step == sampler.space.num_drop else None
