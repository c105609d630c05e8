"""A toy layer-dropping loss with a known optimum, and an objective that behaves like the real one.

The loss of a set of dropped layers is the mean over a few "calibration samples" of per-layer
costs plus small pair interactions, all non-negative, so a running partial mean is a lower bound
of the loss, exactly like the real objective's partial loss over calibration samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import optuna

from optuna_prune.search.pruners import score_in_stages
from optuna_prune.search.space import LayerMaskSpace, sampler_hints


class ToySample(NamedTuple):
    """A toy calibration sample's loss, as one "token" (see optuna_prune.search.pruners.SampleScore)."""

    loss_sum: float
    n_tokens: int = 1


class ToyLoss:
    """``loss(D) = mean_s( sum_{i in D} cost[s, i] + sum_{i<j in D} pair[s, i, j] )``."""

    def __init__(
        self,
        num_layers: int,
        *,
        n_samples: int = 4,
        pair_scale: float = 0.15,
        spread: float = 1.0,
        jitter: float | None = None,
        seed: int = 0,
    ) -> None:
        # spread > 1 makes a few layers far costlier than the rest, as in real LLMs: offspring
        # that drop one of them are hopeless early, so STOP_ABOVE gets to prune them.
        rng = np.random.RandomState(seed)
        self.n_samples = n_samples
        self.cost = rng.uniform(0.1, 1.0, size=(n_samples, num_layers)) ** spread
        self.pair = np.triu(
            rng.uniform(0.0, pair_scale, size=(n_samples, num_layers, num_layers)), 1
        )
        if jitter is not None:
            # One cost per layer, varied by +-jitter per sample: as in real LLMs, a mask that is
            # bad on one calibration sample is bad on the others (what multi-fidelity relies on).
            base = rng.uniform(0.1, 1.0, size=num_layers) ** spread
            self.cost = base * rng.uniform(1 - jitter, 1 + jitter, size=(n_samples, num_layers))

    def per_sample(self, dropped: Iterable[int]) -> list[float]:
        idx = sorted(dropped)
        return [
            float(self.cost[s, idx].sum() + self.pair[s][np.ix_(idx, idx)].sum())
            for s in range(self.n_samples)
        ]

    def partial_means(self, dropped: Iterable[int]) -> list[float]:
        """Running lower bounds after each sample; the last one is the loss."""
        out, total = [], 0.0
        for v in self.per_sample(dropped):
            total += v / self.n_samples
            out.append(total)
        return out

    def __call__(self, dropped: Iterable[int]) -> float:
        return self.partial_means(dropped)[-1]

    def optimum(self, space: LayerMaskSpace) -> tuple[float, tuple[int, ...]]:
        return min((self(c), c) for c in itertools.combinations(space.droppable, space.num_drop))

    def greedy(self, droppable: Iterable[int], k: int) -> list[tuple[int, ...]]:
        """SLEB computed directly: base_1 .. base_k."""
        base: tuple[int, ...] = ()
        bases = []
        for _ in range(k):
            best = min((self(sorted((*base, i))), i) for i in droppable if i not in base)[1]
            base = tuple(sorted((*base, best)))
            bases.append(base)
        return bases


def make_objective(
    space: LayerMaskSpace,
    toy: ToyLoss,
    *,
    honour_stop: bool = True,
    fail_if: Callable[[optuna.Trial, tuple[int, ...]], bool] | None = None,
    stages: Sequence[int] = (),
) -> Callable[[optuna.Trial], float]:
    """An objective that follows the sampler hints the way optuna_prune's real objective does.

    Partial masks (ALLOW_PARTIAL_KEY) are scored and recorded as PRUNED with the loss as last
    intermediate value; with ``honour_stop`` the scoring stops as soon as the running lower bound
    exceeds STOP_ABOVE_KEY (PRUNED, ``stopped_early=True``). ``fail_if`` makes chosen trials FAIL.
    With ``stages`` (sample counts) exact-k masks are scored like the real objective's staged
    (multi-fidelity) scoring, through :func:`optuna_prune.search.pruners.score_in_stages`.
    """

    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_categorical(name, [0, 1]) for name in space.param_names}
        dropped = space.dropped_from_params(params)
        hints = sampler_hints(trial)
        partial = hints.allow_partial and len(dropped) < space.num_drop
        if not partial and not space.is_valid(dropped):
            raise AssertionError(f"trial {trial.number} got invalid mask {dropped}")
        if fail_if is not None and fail_if(trial, dropped):
            raise RuntimeError(f"trial {trial.number} fails on purpose")
        trial.set_user_attr("n_dropped", len(dropped))
        if stages and not partial:
            score = score_in_stages(
                trial,
                (ToySample(v) for v in toy.per_sample(dropped)),
                n_samples=toy.n_samples,
                total_tokens=toy.n_samples,
                stages=stages,
                stop_above=hints.stop_above if honour_stop else None,
            )
            trial.set_user_attr("stopped_early", score.stopped is not None)
            trial.set_user_attr("samples_scored", len(score.samples))
            trial.set_user_attr("stop_reason", score.stopped)
            if score.stopped is not None:
                raise optuna.TrialPruned(score.stopped)
            return score.loss_sum / toy.n_samples
        means = toy.partial_means(dropped)
        for step, lower_bound in enumerate(means[:-1]):
            if honour_stop and hints.stop_above is not None and lower_bound > hints.stop_above:
                trial.set_user_attr("stopped_early", True)
                trial.report(lower_bound, step + 1)
                raise optuna.TrialPruned()
        trial.set_user_attr("stopped_early", False)
        if partial:
            trial.report(means[-1], 0)
            raise optuna.TrialPruned()
        return means[-1]

    return objective
