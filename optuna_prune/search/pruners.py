"""Multi-fidelity selection: score candidates on growing token counts and stop the ones that lose.

A search's time goes into offspring that never become parents. EvoPress and DarwinLM therefore
score every offspring on a few tokens and only the best on many. Here that is two search-side
pieces, used by the objective (staged scoring) and the study (the pruner):

* :func:`score_in_stages` consumes a candidate's per-sample losses in order; after each stage of
  a schedule (a number of calibration samples) it reports the running mean loss to Optuna with
  ``step`` = tokens scored so far, and asks the pruner whether to go on. It also stops exactly
  once the candidate cannot beat the sampler's ``STOP_ABOVE_KEY`` threshold. Given cheap per-sample
  lower bounds (the perplexity's vocabulary bound), the stages rank those, and only a candidate that
  passed every stage computes its exact losses.
* :class:`GenerationHalvingPruner` is successive halving within one generation of a GA sampler
  (an EvoP generation, a level-switch round) or one step of SLEB's greedy search: at each stage a
  candidate goes on only if its running mean ranks in the best ``keep`` fraction of the
  generation's members (and the generation's parents) that reached the same step.

The intermediate value of a staged trial is a running mean over the samples scored so far (of the
losses or of their bounds), an estimate of the full loss: a PRUNED trial's loss is inexact (``trial_loss`` gives
``exact=False``) and the GA samplers rank every PRUNED member after every COMPLETE one.

Default schedule (:func:`default_stages`): rank after 1, 2, 4, ... samples, keep the better half
each time. On SmolLM2-135M (C4, 4 x 256 tokens) EvoP found clearly better masks with it than
without at the same number of tokens scored (``benchmarks/multifidelity.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import optuna
from optuna.pruners import BasePruner
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.search import compat
from optuna_prune.search.samplers.evop import EvoPSampler
from optuna_prune.search.samplers.sleb import SLEBSampler


class SampleScore(Protocol):
    """One calibration sample's contribution: a sum of per-token losses over ``n_tokens``."""

    @property
    def loss_sum(self) -> float: ...

    @property
    def n_tokens(self) -> int: ...


S = TypeVar("S", bound=SampleScore)


@dataclass
class StagedScore(Generic[S]):
    """What :func:`score_in_stages` consumed, and why it stopped (None: every sample scored)."""

    samples: list[S]
    loss_sum: float
    tokens: int
    stopped: str | None


def default_stages(n_samples: int) -> tuple[int, ...]:
    """Doubling sample counts below ``n_samples``: (1, 2) for 4 samples, (1, 2, 4) for 5 to 8."""
    return tuple(2**i for i in range(max(0, n_samples - 1).bit_length()))


def check_stages(stages: Sequence[int], n_samples: int) -> tuple[int, ...]:
    """A valid stage schedule: increasing sample counts in 1..n_samples-1 (the last stage is all)."""
    out = tuple(int(s) for s in stages)
    if any(s < 1 for s in out) or list(out) != sorted(set(out)):
        raise ValueError(f"fidelity stages {list(stages)} must be increasing sample counts >= 1")
    if out and out[-1] >= n_samples:
        raise ValueError(
            f"fidelity stage {out[-1]} needs fewer samples than the {n_samples} calibration "
            "samples (the last stage always scores all of them); lower it or raise n_samples"
        )
    return out


def score_in_stages(
    trial: optuna.Trial,
    samples: Iterable[S],
    *,
    n_samples: int,
    total_tokens: int,
    stages: Sequence[int],
    stop_above: float | None = None,
    bounds: Iterable[S] | None = None,
) -> StagedScore[S]:
    """Consume per-sample losses; after each stage report the running mean and ask the pruner.

    ``stages`` are sample counts after which the candidate is ranked (``trial.report(mean,
    step=tokens)`` then ``trial.should_prune()``); the full mean is reported at the end too. With
    ``stop_above`` the scoring also stops once ``loss_sum / total_tokens`` (a lower bound of the
    full mean, the per-token losses being non-negative) exceeds it. A stopped candidate's last
    intermediate value is its running mean.

    ``bounds`` are per-sample lower bounds of the same losses, far cheaper (the layers without the
    LM head, which costs a small model's candidate as much as its layers): the stages then rank the
    bounds' running means, ``stop_above`` stops on their sum, and only a candidate that passed every
    stage computes its exact losses, while ``stop_above`` stays in reach (the bounds of the samples
    not yet exact keep the sum a lower bound). Every candidate of a generation must get bounds,
    so that a stage ranks like with like.
    """
    ranked = samples if bounds is None else bounds
    seen: list[S] = []
    loss, tokens = 0.0, 0
    for sample in ranked:
        seen.append(sample)
        loss += sample.loss_sum
        tokens += sample.n_tokens
        last = len(seen) >= n_samples
        # An exact loss is complete at the last sample, even above stop_above; a bound is not.
        doomed = stop_above is not None and not (last and bounds is None) and loss / total_tokens > stop_above
        if doomed or (not last and len(seen) in stages):
            trial.report(loss / tokens, step=tokens)
            exact = seen if bounds is None else []
            if doomed:
                return StagedScore(exact, loss, tokens, f"cannot beat {stop_above:.4f}")
            if trial.should_prune():
                return StagedScore(exact, loss, tokens, f"outranked in its generation after {tokens} tokens")
        if last:
            break
    if bounds is None:
        trial.report(loss / tokens, step=tokens)
        return StagedScore(seen, loss, tokens, None)
    exact = []
    for sample, bound in zip(samples, seen, strict=True):
        exact.append(sample)
        loss += sample.loss_sum - bound.loss_sum
        if stop_above is not None and len(exact) < n_samples and loss / total_tokens > stop_above:
            trial.report(loss / tokens, step=tokens)
            return StagedScore(exact, loss, tokens, f"cannot beat {stop_above:.4f}")
    trial.report(loss / tokens, step=tokens)
    return StagedScore(exact, loss, tokens, None)


class GenerationHalvingPruner(BasePruner):
    """Successive halving within a generation of a GA sampler (asynchronous, like ASHA).

    At its i-th report a trial goes on only if its intermediate value ranks within the best
    ``ceil(keep[i] * n)`` of the ``n`` trials that reported the same step: itself, the other
    members of its generation (any state but FAIL, running ones of other workers included) and,
    with ``with_parents``, the generation's parents. Nothing is pruned while fewer than
    ``min_peers`` others reported that step, so the first members are not judged on nothing.
    Everything is read from storage, so several workers prune consistently.

    Args:
        sampler: The sampler (class or instance) whose generation system attr groups trials,
            e.g. :class:`EvoPSampler` (``"EvoPSampler:generation"``), the level-switch sampler,
            or :class:`~optuna_prune.search.samplers.SLEBSampler` (a greedy step; it has no parents).
        keep: Fraction kept at each stage (one value for all, or one per stage; the last one
            repeats). 0.5 halves the survivors at every stage.
        min_peers: Other trials that must have reached a step before any trial is pruned there.
        with_parents: Rank against the generation's parents too (they were scored on the same
            stages). An offspring is worth finishing only if it can join the elite, so this
            sets the bar from the first offspring on. Default: whether the sampler has parents
            (a GA sampler does, SLEB does not).
    """

    def __init__(
        self,
        sampler: compat.BaseGASampler | type[compat.BaseGASampler] | type[SLEBSampler] | SLEBSampler = EvoPSampler,
        *,
        keep: float | Sequence[float] = 0.5,
        min_peers: int = 3,
        with_parents: bool | None = None,
    ) -> None:
        fractions = [float(keep)] if isinstance(keep, (int, float)) else [float(k) for k in keep]
        if not fractions or not all(0.0 < k <= 1.0 for k in fractions):
            raise ValueError(f"keep={keep!r}: give fractions in (0, 1], e.g. 0.5")
        if isinstance(min_peers, bool) or not isinstance(min_peers, int) or min_peers < 0:
            raise ValueError(f"min_peers={min_peers!r} must be an integer >= 0")
        if with_parents is None:
            with_parents = compat.keeps_parents(sampler)
        self._generation_key = compat.generation_key(sampler)
        self._parent_prefix = compat.parent_cache_key_prefix(sampler) if with_parents else ""
        self._keep = fractions
        self._min_peers = min_peers
        self._with_parents = with_parents

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        generation = trial.system_attrs.get(self._generation_key)
        if step is None or generation is None:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        peers = self._peers(study, trial, generation)
        values = [t.intermediate_values[step] for t in peers if step in t.intermediate_values]
        if len(values) < self._min_peers:
            return False
        stage = sum(s < step for s in trial.intermediate_values)
        keep = self._keep[min(stage, len(self._keep) - 1)]
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        better = sum(sign * v < sign * value for v in values)
        # round() first: 0.5 * 6 must be 3, not 3.0000000000000004.
        return better >= max(1, math.ceil(round(keep * (len(values) + 1), 9)))

    def _peers(self, study: Study, trial: FrozenTrial, generation: int) -> list[FrozenTrial]:
        storage = compat.study_storage(study)
        trials = storage.get_all_trials(compat.study_id(study), deepcopy=False)
        peers = [
            t
            for t in trials
            if t.number != trial.number
            and t.state != TrialState.FAIL
            and t.system_attrs.get(self._generation_key) == generation
        ]
        if self._with_parents:
            attrs = storage.get_study_system_attrs(compat.study_id(study))
            parent_ids = set(attrs.get(f"{self._parent_prefix}{generation}", ()))
            peers += [t for t in trials if compat.trial_id(t) in parent_ids]
        return peers
