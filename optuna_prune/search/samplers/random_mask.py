"""Random search over exact-k masks: the baseline every search method must beat."""

from __future__ import annotations

from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from optuna_prune.search.samplers.base import MaskSampler, Proposal
from optuna_prune.search.space import LayerMaskSpace


class RandomMaskSampler(MaskSampler):
    """Uniformly random valid masks, never one already in the study; stops when all were tried.

    Args:
        space: The masks to search.
        seed: Fixes the masks (per trial number, so workers and resumed runs agree).
        independent_sampler: Samples params that are not part of the mask (default random).
    """

    method = "random"

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        seed: int | None = None,
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        super().__init__(space, seed=seed, independent_sampler=independent_sampler)

    def _propose(
        self,
        study: Study,
        trial: FrozenTrial,
        trials: list[FrozenTrial],
        seed: tuple[int, ...] | None,
    ) -> Proposal:
        if seed is not None:
            return Proposal(seed)
        rng = self._trial_rng(trial)
        dropped = self._random_unseen(rng, self._seen(trials, exclude=trial.number))
        if dropped is None:
            return self._surplus(self._space.from_array(self._space.random_mask(rng)))
        return Proposal(dropped)
