"""EvoP's evolutionary pruning pattern search (EPPS) as an Optuna genetic-algorithm sampler.

Generation 0 is random valid masks plus any enqueued seeds (e.g. SLEB's or ShortGPT's result).
The best ``ceil(elite_fraction * P)`` of a generation and its parents become the next parents
(elitism); each offspring is the crossover of two random parents, mutated, and repaired to
exactly k dropped layers. Generations and parents live in storage, as in Optuna's
``BaseGASampler``, with three differences: enqueued trials join generation 0, PRUNED (stopped
early) candidates count as members ranked last, and running trials count too, so concurrent
workers neither stall nor overfill a generation.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
from collections import defaultdict
from typing import Any

import numpy as np
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.search import compat
from optuna_prune.search.record import METHOD_KEY, ORIGIN_KEY, PARENTS_KEY, STOP_ABOVE_KEY
from optuna_prune.search.samplers.base import MaskSampler, Proposal, Wait, trial_loss, trial_mask
from optuna_prune.search.samplers.operators import CROSSOVERS, bit_flip_mutation, swap_mutation
from optuna_prune.search.space import LayerMaskSpace

_logger = logging.getLogger(__name__)



class EvoPSampler(MaskSampler, compat.BaseGASampler):
    """EvoP's genetic search over exact-k layer masks.

    Args:
        space: The masks to search.
        population_size: Members per generation (P), enqueued seeds included. Default
            ``max(10, L')`` with L' the non-protected layers: one member per layer, so a
            generation can cover every layer once, and at least 10 so that 3 elites exist.
        elite_fraction: Share of a generation kept as parents, EvoP's top 30%.
        crossover: "uniform" (default), "one_point" or "two_point".
        crossover_prob: Probability that an offspring is a crossover of its two parents rather
            than a copy of the first (then only mutation changes it).
        swapping_prob: Per-layer probability of taking the second parent in uniform crossover.
        mutation_prob: Per-layer flip probability; default ``1 / L'`` (one flip on average).
        seed: Fixes every random choice (per trial number, so workers and resumes agree).
        wait_for_generation: With several workers, a trial of generation g+1 waits until every
            member of g is finished (the parents must be known). It never waits on trials that
            the asking thread holds itself (batched ask-and-tell): such a trial joins generation
            g instead, as every trial does with False.
        max_offspring_tries: Breeding attempts before an offspring that duplicates a known mask
            is walked away by level switches, then replaced by a random unseen mask.
        independent_sampler: Samples params that are not part of the mask (default random).

    The offspring's trial gets ``STOP_ABOVE_KEY`` (single-objective minimisation only): the
    ``n_elite``-th best value among its generation's parents and finished members; a candidate
    worse than it can never become a parent, so its evaluation may stop early.
    With several objectives, parents are chosen NSGA-II style (non-dominated rank, then
    crowding distance).
    """

    method = "evop"
    _process_state = (*MaskSampler._process_state, "_thread_lock")  # BaseGASampler's lock

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        population_size: int | None = None,
        elite_fraction: float = 0.3,
        crossover: str = "uniform",
        crossover_prob: float = 0.9,
        swapping_prob: float = 0.5,
        mutation_prob: float | None = None,
        seed: int | None = None,
        wait_for_generation: bool = True,
        max_offspring_tries: int = 32,
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        MaskSampler.__init__(self, space, seed=seed, independent_sampler=independent_sampler)
        n_free = len(space.droppable)
        size = max(10, n_free) if population_size is None else population_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
            raise ValueError(f"population_size={population_size!r} must be an integer >= 2")
        if not 0.0 < elite_fraction <= 1.0:
            raise ValueError(f"elite_fraction={elite_fraction!r} must lie in (0, 1], e.g. 0.3")
        if crossover not in CROSSOVERS:
            raise ValueError(f"crossover={crossover!r}; choose one of {sorted(CROSSOVERS)}")
        mutation = 1.0 / n_free if mutation_prob is None else mutation_prob
        for name, p in (
            ("crossover_prob", crossover_prob),
            ("swapping_prob", swapping_prob),
            ("mutation_prob", mutation),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p!r} must be a probability in [0, 1]")
        compat.BaseGASampler.__init__(self, int(size))
        self._elite_fraction = float(elite_fraction)
        # round() first: 0.3 * 10 is 3.0000000000000004 in floating point.
        self._n_elite = max(1, math.ceil(round(elite_fraction * size, 9)))
        self._crossover = (
            functools.partial(CROSSOVERS[crossover], swap_prob=swapping_prob)
            if crossover == "uniform"
            else CROSSOVERS[crossover]
        )
        self._crossover_prob = float(crossover_prob)
        self._mutation_prob = float(mutation)
        self._wait_for_generation = wait_for_generation
        self._max_tries = max(1, int(max_offspring_tries))

    def _init_process_state(self) -> None:
        super()._init_process_state()
        self._thread_lock = threading.Lock()

    @property
    def n_elite(self) -> int:
        """Parents per generation: ``ceil(elite_fraction * population_size)``."""
        return self._n_elite

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "population_size": self._population_size,
            "elite_fraction": self._elite_fraction,
        }

    # --- BaseGASampler interface, with EvoP's membership rules -------------------------------

    def get_trial_generation(self, study: Study, trial: FrozenTrial) -> int:
        """The generation this sampler assigned to ``trial`` in ``before_trial``."""
        key = self._get_generation_key()
        generation = trial.system_attrs.get(key)
        if generation is None:
            generation = compat.study_storage(study).get_trial_system_attrs(compat.trial_id(trial)).get(key)
        if generation is None:
            raise ValueError(f"trial {trial.number} was not proposed by {type(self).__name__}")
        return int(generation)

    def get_population(self, study: Study, generation: int) -> list[FrozenTrial]:
        """Members of ``generation``: its trials in any state but FAIL."""
        trials = compat.study_storage(study).get_all_trials(compat.study_id(study), deepcopy=False)
        return list(self._members(trials)[generation])

    def get_parent_population(self, study: Study, generation: int) -> list[FrozenTrial]:
        """Parents of ``generation`` (cached in study system attrs; [] for generation 0).

        Raises RuntimeError while generation - 1 still has running members.
        """
        trials = compat.study_storage(study).get_all_trials(compat.study_id(study), deepcopy=False)
        attrs = dict(compat.study_storage(study).get_study_system_attrs(compat.study_id(study)))
        parents = self._parents(study, generation, self._members(trials), trials, attrs)
        if isinstance(parents, Wait):
            raise RuntimeError(
                f"generation {generation - 1} still runs trials {list(parents.on)}; "
                f"the parents of generation {generation} are not decided yet"
            )
        return parents

    def select_parent(self, study: Study, generation: int) -> list[FrozenTrial]:
        """The elite of generation - 1 and its parents (not cached; see get_parent_population)."""
        if generation < 1:
            raise ValueError(f"generation={generation}: generation 0 has no parents")
        pool = self.get_parent_population(study, generation - 1)
        return self._select(study, pool + self.get_population(study, generation - 1))

    # --- proposal --------------------------------------------------------------------------------

    def _propose(
        self,
        study: Study,
        trial: FrozenTrial,
        trials: list[FrozenTrial],
        seed: tuple[int, ...] | None,
    ) -> Proposal | Wait:
        if seed is not None and not self._space.is_valid(seed):
            _logger.warning(
                "preset trial %d drops layers %s, not %d valid ones: it is scored but joins "
                "no generation",
                trial.number,
                list(seed),
                self._space.num_drop,
            )
            return Proposal(seed, {ORIGIN_KEY: "seed"})
        storage = compat.study_storage(study)
        size = self._population_size
        assert size is not None
        # A stale trial re-enqueued by RetryHeartbeatStaleTrialCallback keeps its generation.
        generation_key = self._get_generation_key()
        retried = trial.system_attrs.get(generation_key) if seed is not None else None
        for _attempt in range(3):
            attrs = dict(storage.get_study_system_attrs(compat.study_id(study)))
            members = self._members(trials, exclude=trial.number)
            g_open = self._open_generation(attrs)
            if retried is not None:
                generation = int(retried)
            else:  # seeds join the open generation, offspring take the first free slot
                generation = g_open
                while seed is None and len(members[generation]) >= size:
                    generation += 1
            parents = self._parents(study, generation, members, trials, attrs)
            if isinstance(parents, Wait):
                if seed is not None:
                    parents = []  # a seed needs none; a threshold from fewer values stays safe
                elif self._wait_for_generation and not self._held_here(study, parents.on):
                    return Wait(parents.on, {generation_key: generation})  # holds the slot meanwhile
                else:
                    generation = g_open
                    parents = self._parents(study, generation, members, trials, attrs)
                    assert not isinstance(parents, Wait)
            if seed is None and len(members[generation]) == size - 1:
                # Took the last slot: if a concurrent worker took it too, the higher trial
                # number yields and moves on to the next generation.
                self._store(study, trial, {generation_key: generation})
                trials = storage.get_all_trials(compat.study_id(study), deepcopy=False)
                rivals = self._members(trials, exclude=trial.number)[generation]
                if sum(t.number < trial.number for t in rivals) >= size:
                    continue
            break

        extra: dict[str, Any] = {generation_key: generation}  # stored with the proposal
        threshold = self._threshold(study, parents, members[generation])
        if threshold is not None:
            extra[STOP_ABOVE_KEY] = threshold
        if seed is not None:
            if ORIGIN_KEY not in trial.system_attrs:
                extra[ORIGIN_KEY] = "seed"
            return Proposal(seed, extra)

        rng = self._trial_rng(trial)
        seen = self._seen(trials, exclude=trial.number)
        dropped: tuple[int, ...] | None = None
        origin = "random"
        if parents:
            dropped, pair = self._offspring(rng, parents, seen)
            extra[PARENTS_KEY] = list(pair)
            origin = "offspring" if dropped is not None else "fallback"
        if dropped is None:
            dropped = self._random_unseen(rng, seen)
        if dropped is None:  # every valid mask is in the study
            surplus = self._surplus(self._space.from_array(self._space.random_mask(rng)))
            surplus.attrs[generation_key] = generation
            return surplus
        return Proposal(dropped, {**extra, ORIGIN_KEY: origin})

    def _offspring(
        self, rng: np.random.RandomState, parents: list[FrozenTrial], seen: set[tuple[int, ...]]
    ) -> tuple[tuple[int, ...] | None, tuple[int, int]]:
        masks = [self._space.to_array(trial_mask(p, self._space) or ()) for p in parents]
        pair = (0, 0)
        child = masks[0]
        for _ in range(self._max_tries):
            pair = tuple(rng.choice(len(masks), 2, replace=False)) if len(masks) > 1 else (0, 0)
            a, b = masks[pair[0]], masks[pair[1]]
            child = self._crossover(a, b, rng) if rng.rand() < self._crossover_prob else a
            child = self._space.repair(bit_flip_mutation(child, rng, self._mutation_prob), rng)
            if self._space.from_array(child) not in seen:
                break
        else:
            # Everything bred near these parents is known: walk on by level switches.
            droppable = self._space.to_array(self._space.droppable)
            for _ in range(self._max_tries):
                child = swap_mutation(child, rng, droppable)
                if self._space.from_array(child) not in seen:
                    break
            else:
                return None, (parents[pair[0]].number, parents[pair[1]].number)
        return self._space.from_array(child), (parents[pair[0]].number, parents[pair[1]].number)

    # --- generations in storage ------------------------------------------------------------------

    def _members(
        self, trials: list[FrozenTrial], exclude: int | None = None
    ) -> defaultdict[int, list[FrozenTrial]]:
        key = self._get_generation_key()
        members: defaultdict[int, list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            if t.number == exclude or t.state == TrialState.FAIL:
                continue
            if t.system_attrs.get(METHOD_KEY) != self.method:
                continue
            generation = t.system_attrs.get(key)
            if generation is not None:
                members[int(generation)].append(t)
        return members

    def _parent_key(self, generation: int) -> str:
        return self._get_parent_cache_key_prefix() + str(generation)

    def _open_generation(self, study_attrs: dict[str, Any]) -> int:
        """The oldest generation whose successor's parents are not decided yet."""
        generation = 0
        while self._parent_key(generation + 1) in study_attrs:
            generation += 1
        return generation

    def _parents(
        self,
        study: Study,
        generation: int,
        members: defaultdict[int, list[FrozenTrial]],
        trials: list[FrozenTrial],
        study_attrs: dict[str, Any],
    ) -> list[FrozenTrial] | Wait:
        """Cached parents of ``generation``, computed once when generation - 1 has finished."""
        if generation == 0:
            return []
        key = self._parent_key(generation)
        if key not in study_attrs:
            previous = members[generation - 1]
            # Only RUNNING members are waited for: a queued retry of a killed worker's trial is run
            # by whichever worker asks next, maybe the one waiting here, so waiting for it deadlocks.
            running = tuple(t.number for t in previous if t.state == TrialState.RUNNING)
            if running:
                return Wait(running)
            grand = self._parents(study, generation - 1, members, trials, study_attrs)
            if isinstance(grand, Wait):
                return grand
            known = {compat.trial_id(t) for t in grand}
            chosen = self._select(study, grand + [t for t in previous if compat.trial_id(t) not in known])
            storage = compat.study_storage(study)
            storage.set_study_system_attr(compat.study_id(study), key, [compat.trial_id(t) for t in chosen])
            # Another worker may have written at the same moment: use what storage holds.
            study_attrs.update(storage.get_study_system_attrs(compat.study_id(study)))
        by_id = {compat.trial_id(t): t for t in trials}
        return [by_id[i] for i in study_attrs[key] if i in by_id]

    def _select(self, study: Study, pool: list[FrozenTrial]) -> list[FrozenTrial]:
        """The best ``n_elite`` of ``pool``: COMPLETE by value (or Pareto rank), PRUNED last."""
        complete = sorted(
            (t for t in pool if t.state == TrialState.COMPLETE), key=lambda t: t.number
        )
        pruned = [t for t in pool if t.state != TrialState.COMPLETE]
        pruned.sort(key=lambda t: ((trial_loss(t) or (math.inf,))[0], t.number))
        if len(study.directions) == 1:
            sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
            ranked = sorted(complete, key=lambda t: (sign * t.values[0], t.number))
        else:
            ranked = []
            fronts = compat.rank_population(
                complete, study.directions, is_constrained=compat.is_constrained_optimization(complete)
            )
            for front in fronts:
                compat.crowding_distance_sort(front)
                ranked.extend(front)
        return (ranked + pruned)[: self._n_elite]

    def _threshold(
        self, study: Study, parents: list[FrozenTrial], members: list[FrozenTrial]
    ) -> float | None:
        """The selection threshold known now: the n_elite-th best exact value, if that many."""
        if len(study.directions) != 1 or study.direction != StudyDirection.MINIMIZE:
            return None
        values = sorted(
            t.values[0] for t in itertools.chain(parents, members) if t.state == TrialState.COMPLETE
        )
        return float(values[self._n_elite - 1]) if len(values) >= self._n_elite else None
