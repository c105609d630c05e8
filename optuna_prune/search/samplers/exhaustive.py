"""Exhaustive search: every exact-k mask once, in a fixed order; the ground truth on small models."""

from __future__ import annotations

import math
from collections.abc import Sequence

from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial

from optuna_prune.search.samplers.base import MaskSampler, Proposal
from optuna_prune.search.space import LayerMaskSpace, SpaceError


def _rank(combo: Sequence[int], n: int) -> int:
    """Lexicographic rank of a sorted k-subset of range(n) among all k-subsets."""
    k = len(combo)
    rank, prev = 0, -1
    for j, c in enumerate(combo):
        for x in range(prev + 1, c):
            rank += math.comb(n - 1 - x, k - 1 - j)
        prev = c
    return rank


def _unrank(rank: int, n: int, k: int) -> tuple[int, ...]:
    """The sorted k-subset of range(n) with the given lexicographic rank."""
    combo: list[int] = []
    x = 0
    for j in range(k):
        while True:
            count = math.comb(n - 1 - x, k - 1 - j)
            if rank < count:
                break
            rank -= count
            x += 1
        combo.append(x)
        x += 1
    return tuple(combo)


class ExhaustiveMaskSampler(MaskSampler):
    """Enumerates all C(L', k) masks (L' = non-protected layers) in lexicographic order.

    Each trial takes the first mask that no trial of the study holds (running ones included), so
    several workers split the enumeration, like Optuna's ``BruteForceSampler``; a FAILed mask is
    proposed again. The study stops once every mask is taken.

    Args:
        space: The masks to enumerate.
        max_candidates: Refuse (``SpaceError``) spaces with more masks than this; an exhaustive
            search over them would not finish.
        seed: Seeds the sampler of params that are not part of the mask (the order is fixed).
        independent_sampler: Samples params that are not part of the mask (default random).
    """

    method = "exhaustive"

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        max_candidates: int = 200_000,
        seed: int | None = None,
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        super().__init__(space, seed=seed, independent_sampler=independent_sampler)
        n = space.n_candidates
        if n > max_candidates:
            raise SpaceError(
                f"exhaustive search over C({len(space.droppable)}, {space.num_drop}) = {n} masks "
                f"exceeds max_candidates={max_candidates}; raise max_candidates or use EvoP"
            )

    def planned_trials(self) -> int:
        return self._space.n_candidates

    def _propose(
        self,
        study: Study,
        trial: FrozenTrial,
        trials: list[FrozenTrial],
        seed: tuple[int, ...] | None,
    ) -> Proposal:
        if seed is not None:
            return Proposal(seed)
        free = self._space.droppable
        position = {layer: p for p, layer in enumerate(free)}
        n, k = len(free), self._space.num_drop
        taken = {
            _rank([position[i] for i in mask], n)
            for mask in self._seen(trials, exclude=trial.number)
            if self._space.is_valid(mask)
        }
        rank = next(r for r in range(len(taken) + 1) if r not in taken)
        if rank >= self._space.n_candidates:
            # Every mask is taken; a running one that fails is re-proposed by its own worker.
            return self._surplus(tuple(free[p] for p in _unrank(0, n, k)))
        return Proposal(tuple(free[p] for p in _unrank(rank, n, k)))
