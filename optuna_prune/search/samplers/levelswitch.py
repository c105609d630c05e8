"""EvoPress's (1 + lambda) evolution with level-switch mutations, as an Optuna sampler.

EvoPress searches a layer-drop mask with a single parent: each round, lambda offspring are the
parent with a few "level switches" (a dropped layer comes back, a kept one goes), and the best
offspring replaces the parent only if it is better. Its multi-step selection (all offspring on
a few tokens, the best few on more, the best on all) is not part of the sampler here: the
objective scores candidates in stages and :class:`~optuna_prune.search.pruners.GenerationHalvingPruner`
stops the offspring that rank badly in their round, so the sampler works with any fitness
(EvoPress uses the KL divergence to the dense model: ``fitness = "kl"``).

A (1 + lambda) round is an EvoP generation whose elite is one trial, so this sampler is
:class:`EvoPSampler` with ``n_elite = 1``, no crossover and its own mutation: rounds and the
parent live in storage (the generation trial system attr and the cached parent study attr),
several workers share a round, a resumed run continues it, and PRUNED offspring count as
members ranked last.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from optuna_prune.search.samplers.base import trial_mask
from optuna_prune.search.samplers.evop import EvoPSampler
from optuna_prune.search.space import LayerMaskSpace


class LevelSwitchSampler(EvoPSampler):
    """(1 + lambda) evolution over exact-k masks with 1..``max_swaps`` level switches.

    Round 0 holds the enqueued seeds (e.g. the SLEB or ShortGPT result) and random masks; its
    best becomes the first parent (EvoPress's "initially generated" candidates). In every later
    round each offspring is the parent with ``s`` swaps, ``s`` uniform in ``1..max_swaps``: ``s``
    distinct dropped layers come back and ``s`` distinct kept (non-protected) layers are dropped,
    so the offspring drops exactly k layers and differs from the parent in 2s positions. A mask
    already in the study is redrawn. The parent of the next round is the best COMPLETE trial of
    the parent and this round (ties keep the parent): the parent never gets worse. Each
    offspring's ``STOP_ABOVE_KEY`` is the best loss known in its round, so the objective stops
    an offspring as soon as it cannot win.

    Args:
        space: The masks to search.
        offspring: lambda, trials per round. EvoPress uses 32 for 7B models; 16 suits the
            ~30-layer models this package is tested on (a round covers each layer about once).
        max_swaps: Most level switches per offspring (EvoPress: up to 3).
        seed: Fixes every random choice (per trial number, so workers and resumes agree).
        wait_for_generation: See :class:`EvoPSampler`.
        max_offspring_tries: Redraws of an offspring that is already in the study before a
            random unseen mask is used instead.
        independent_sampler: Samples params that are not part of the mask (default random).
    """

    method = "levelswitch"

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        offspring: int = 16,
        max_swaps: int = 3,
        seed: int | None = None,
        wait_for_generation: bool = True,
        max_offspring_tries: int = 32,
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        if isinstance(max_swaps, bool) or not isinstance(max_swaps, (int, np.integer)) or max_swaps < 1:
            raise ValueError(f"max_swaps={max_swaps!r} must be an integer >= 1")
        valid = not isinstance(offspring, bool) and isinstance(offspring, (int, np.integer))
        super().__init__(
            space,
            population_size=offspring,  # EvoPSampler refuses a bad value with its message
            elite_fraction=1.0 / offspring if valid and offspring >= 2 else 1.0,
            crossover_prob=0.0,
            mutation_prob=0.0,
            seed=seed,
            wait_for_generation=wait_for_generation,
            max_offspring_tries=max_offspring_tries,
            independent_sampler=independent_sampler,
        )
        self._max_swaps = int(max_swaps)

    @property
    def offspring(self) -> int:
        """lambda: trials per round."""
        assert self._population_size is not None
        return self._population_size

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_swaps": self._max_swaps}

    def _offspring(
        self, rng: np.random.RandomState, parents: list[FrozenTrial], seen: set[tuple[int, ...]]
    ) -> tuple[tuple[int, ...] | None, tuple[int, int]]:
        parent = parents[0]
        pair = (parent.number, parent.number)
        mask = self._space.to_array(trial_mask(parent, self._space) or ())
        dropped = np.flatnonzero(mask)
        kept = np.flatnonzero(~mask & self._space.to_array(self._space.droppable))
        most = min(self._max_swaps, dropped.size, kept.size)
        if most < 1:
            return None, pair
        for _ in range(self._max_tries):
            n = rng.randint(1, most + 1)
            child = mask.copy()
            child[rng.choice(dropped, n, replace=False)] = False
            child[rng.choice(kept, n, replace=False)] = True
            candidate = self._space.from_array(child)
            if candidate not in seen:
                return candidate, pair
        return None, pair
