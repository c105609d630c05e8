"""The samplers on a toy loss with a known optimum, end to end through Optuna studies."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from _toy import ToyLoss, make_objective
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.storages import InMemoryStorage, JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.search.record import (
    ALLOW_PARTIAL_KEY,
    METHOD_KEY,
    ORIGIN_KEY,
    PARENTS_KEY,
    STEP_KEY,
    STOP_ABOVE_KEY,
    SURPLUS_KEY,
)
from optuna_prune.search.samplers import (
    EvoPSampler,
    ExhaustiveMaskSampler,
    RandomMaskSampler,
    SLEBError,
    SLEBSampler,
    sleb_result,
    trial_loss,
    trial_mask,
)
from optuna_prune.search.samplers.exhaustive import _rank, _unrank
from optuna_prune.search.space import (
    LayerMaskSpace,
    SpaceError,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

GEN_KEY = EvoPSampler._get_generation_key()


class CountingSpace(LayerMaskSpace):
    """Counts the repairs that changed a mask, to prove the repair path is exercised."""

    repairs = 0

    def repair(self, mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        out = super().repair(mask, rng)
        if not np.array_equal(out, mask):
            CountingSpace.repairs += 1
        return out


class CountingStorage(InMemoryStorage):
    """Counts writes of each study system attr (parents must be cached once per generation)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[str] = Counter()

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.writes[key] += 1
        super().set_study_system_attr(study_id, key, value)


def masks(study: optuna.Study, space: LayerMaskSpace) -> list[tuple[int, ...] | None]:
    return [trial_mask(t, space) for t in study.get_trials(deepcopy=False)]


def generations(study: optuna.Study) -> dict[int, list[FrozenTrial]]:
    """Members per generation (FAIL excluded), from the trials' system attrs."""
    out: dict[int, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        is_member = t.system_attrs.get(METHOD_KEY) == "evop" and t.state != TrialState.FAIL
        if is_member and GEN_KEY in t.system_attrs:
            out.setdefault(t.system_attrs[GEN_KEY], []).append(t)
    return out


def cached_parents(study: optuna.Study) -> dict[int, set[int]]:
    prefix = EvoPSampler._get_parent_cache_key_prefix()
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {int(k[len(prefix) :]): set(v) for k, v in attrs.items() if k.startswith(prefix)}


def evop_study(
    space: LayerMaskSpace, *, storage: Any = None, name: str | None = None, **kwargs: Any
) -> optuna.Study:
    sampler = EvoPSampler(space, **kwargs)
    sampler.poll_interval = 0.01
    return optuna.create_study(
        sampler=sampler, storage=storage, study_name=name, load_if_exists=name is not None
    )


# --- EvoP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("crossover", ["uniform", "one_point", "two_point"])
def test_evop_masks_are_exact_k_unique_and_repaired(crossover: str) -> None:
    space = CountingSpace(20, 7, protected=[0])
    CountingSpace.repairs = 0
    toy = ToyLoss(20, seed=3)
    study = evop_study(space, population_size=10, crossover=crossover, seed=0)
    study.optimize(make_objective(space, toy), n_trials=120)
    found = masks(study, space)
    assert all(space.is_valid(m) for m in found)
    assert all(
        m is not None and space.to_params(m) == t.params
        for m, t in zip(found, study.trials, strict=True)
    )
    assert len(set(found)) == len(found)  # never proposes a mask already in the study
    assert CountingSpace.repairs > 20  # crossover + mutation broke k, repair restored it
    origins = Counter(t.system_attrs[ORIGIN_KEY] for t in study.trials)
    assert origins["random"] == 10 and origins["offspring"] > 90


def test_evop_generations_are_exactly_p_and_parents_cached_once() -> None:
    space = LayerMaskSpace(14, 5)
    storage = CountingStorage()
    study = evop_study(space, storage=storage, population_size=8, seed=1)
    study.optimize(make_objective(space, ToyLoss(14, seed=4)), n_trials=8 * 6 + 3)
    gens = generations(study)
    assert [len(gens[g]) for g in sorted(gens)] == [8] * 6 + [3]
    parents = cached_parents(study)
    assert sorted(parents) == [1, 2, 3, 4, 5, 6]
    assert all(len(p) == 3 for p in parents.values())  # ceil(0.3 * 8)
    prefix = EvoPSampler._get_parent_cache_key_prefix()
    assert all(storage.writes[prefix + str(g)] == 1 for g in parents)
    # The BaseGASampler API reads the same bookkeeping.
    sampler = study.sampler
    assert isinstance(sampler, EvoPSampler) and sampler.n_elite == 3
    assert {t._trial_id for t in sampler.get_parent_population(study, 4)} == parents[4]
    assert {t._trial_id for t in sampler.select_parent(study, 4)} == parents[4]
    assert len(sampler.get_population(study, 2)) == 8
    assert sampler.get_trial_generation(study, study.trials[-1]) == 6
    # Offspring of generation g descend from the parents of generation g.
    by_number = {t.number: t._trial_id for t in study.trials}
    for g, members in gens.items():
        for t in members:
            if g > 0:
                assert {by_number[n] for n in t.system_attrs[PARENTS_KEY]} <= parents[g]


def test_evop_is_elitist_and_stop_above_is_exact() -> None:
    """Parents = the true top 30% of (parents ∪ members): pruned candidates never belonged there."""
    space = LayerMaskSpace(16, 6)
    toy = ToyLoss(16, seed=5, n_samples=8, spread=10.0)
    study = evop_study(space, population_size=10, seed=2)
    study.optimize(make_objective(space, toy), n_trials=100)
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.PRUNED] > 0  # STOP_ABOVE was set and honoured
    assert all(t.user_attrs["stopped_early"] for t in study.trials if t.state == TrialState.PRUNED)
    by_id = {t._trial_id: t for t in study.trials}
    gens, parents = generations(study), cached_parents(study)
    best = np.inf
    for g in sorted(parents):
        pool = list(gens[g - 1]) + [by_id[i] for i in parents.get(g - 1, ())]
        truth = sorted(pool, key=lambda t: toy(trial_mask(t, space)))[:3]
        assert {t._trial_id for t in truth} == parents[g]
        best_parent = min(by_id[i].value for i in parents[g])
        assert best_parent <= best  # elitism: the best parent never gets worse
        best = best_parent
    # Every threshold is the n_elite-th best known exact value, and only then is it set.
    with_stop = [t for t in study.trials if STOP_ABOVE_KEY in t.system_attrs]
    assert len(with_stop) > 50


def test_evop_enqueued_seeds_join_generation_0_and_can_be_parents() -> None:
    space = LayerMaskSpace(12, 4)
    toy = ToyLoss(12, seed=6)
    _, best = toy.optimum(space)
    study = evop_study(space, population_size=6, seed=0)
    study.enqueue_trial(space.to_params(best), user_attrs={"seeded_from": "oracle"})
    study.enqueue_trial(space.to_params((0, 1, 2, 3)))
    study.optimize(make_objective(space, toy), n_trials=7)
    seeds = [t for t in study.trials if t.system_attrs.get(ORIGIN_KEY) == "seed"]
    assert len(seeds) == 2
    assert all(t.system_attrs[METHOD_KEY] == "evop" and t.system_attrs[GEN_KEY] == 0 for t in seeds)
    assert len(generations(study)[0]) == 6  # seeds take population slots
    seed_id = next(t._trial_id for t in seeds if trial_mask(t, space) == best)
    assert seed_id in cached_parents(study)[1]


def test_evop_pruned_members_count_failed_ones_do_not() -> None:
    space = LayerMaskSpace(12, 4)
    toy = ToyLoss(12, seed=7)
    failing = {2, 5, 13}
    study = evop_study(space, population_size=5, seed=3)
    objective = make_objective(space, toy, fail_if=lambda trial, _: trial.number in failing)
    study.optimize(objective, n_trials=30, catch=(RuntimeError,))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == sorted(failing)
    gens = generations(study)
    assert all(len(gens[g]) == 5 for g in sorted(gens)[:-1])  # failed slots were refilled
    parent_ids = set().union(*cached_parents(study).values())
    assert not parent_ids & {t._trial_id for t in failed}
    # A PRUNED member counts and ranks last: the study moves on regardless.
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert all(GEN_KEY in t.system_attrs for t in pruned)


def test_evop_resume_and_alternating_workers_continue_the_same_evolution(tmp_path: Path) -> None:
    space = LayerMaskSpace(12, 4)
    objective = make_objective(space, ToyLoss(12, seed=8))
    reference = evop_study(space, population_size=6, seed=4)
    reference.optimize(objective, n_trials=40)

    path = str(tmp_path / "journal.log")
    first = evop_study(
        space, storage=JournalStorage(JournalFileBackend(path)), name="s", population_size=6, seed=4
    )
    first.optimize(objective, n_trials=17)
    resumed = evop_study(
        space, storage=JournalStorage(JournalFileBackend(path)), name="s", population_size=6, seed=4
    )
    resumed.optimize(objective, n_trials=23)
    assert masks(resumed, space) == masks(reference, space)

    shared = InMemoryStorage()
    a = evop_study(space, storage=shared, name="w", population_size=6, seed=4)
    b = evop_study(space, storage=shared, name="w", population_size=6, seed=4)
    for i in range(40):
        (a if i % 2 else b).optimize(objective, n_trials=1)
    assert masks(a, space) == masks(reference, space)
    assert [len(v) for v in generations(a).values()] == [6] * 6 + [4]


def test_evop_two_threads_make_well_formed_generations() -> None:
    space = LayerMaskSpace(12, 4)
    study = evop_study(space, population_size=6, seed=5)
    study.optimize(make_objective(space, ToyLoss(12, seed=9)), n_trials=48, n_jobs=2)
    assert all(space.is_valid(m) for m in masks(study, space))
    gens, parents = generations(study), cached_parents(study)
    for g in parents:  # closed generations: full, at most one extra from a race
        assert 6 <= len(gens[g - 1]) <= 7
    by_number = {t.number: t._trial_id for t in study.trials}
    for g, members in gens.items():
        for t in members:
            if g > 0 and PARENTS_KEY in t.system_attrs:
                assert {by_number[n] for n in t.system_attrs[PARENTS_KEY]} <= parents[g]


def _suggest_all(trial: optuna.Trial, space: LayerMaskSpace) -> tuple[int, ...]:
    params = {name: trial.suggest_categorical(name, [0, 1]) for name in space.param_names}
    return space.dropped_from_params(params)


def test_evop_waits_for_running_members_then_breeds() -> None:
    space = LayerMaskSpace(10, 3)
    toy = ToyLoss(10, seed=10)
    study = evop_study(space, population_size=4, seed=0)
    first = [study.ask() for _ in range(4)]
    for trial in first[:3]:
        study.tell(trial, toy(_suggest_all(trial, space)))
    asked: list[optuna.Trial] = []
    waiter = threading.Thread(target=lambda: asked.append(study.ask()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # generation 0 still runs first[3]: parents unknown
    sampler = study.sampler
    assert isinstance(sampler, EvoPSampler)
    with pytest.raises(RuntimeError, match="not decided yet"):
        sampler.get_parent_population(study, 1)
    study.tell(first[3], toy(_suggest_all(first[3], space)))
    waiter.join(10)
    assert not waiter.is_alive() and asked
    frozen = study._storage.get_trial(asked[0]._trial_id)
    assert frozen.system_attrs[GEN_KEY] == 1 and frozen.system_attrs[ORIGIN_KEY] == "offspring"


def test_evop_batched_ask_without_waiting_overfills_instead() -> None:
    space = LayerMaskSpace(10, 3)
    study = evop_study(space, population_size=4, seed=0, wait_for_generation=False)
    batch = [study.ask() for _ in range(7)]  # would wait forever on its own trials otherwise
    gens = [study._storage.get_trial(t._trial_id).system_attrs[GEN_KEY] for t in batch]
    assert gens == [0] * 7


def test_evop_interrupted_wait_fails_its_trial() -> None:
    space = LayerMaskSpace(10, 3)
    study = evop_study(space, population_size=2, seed=0)
    # Asked by another thread (as by another worker): this thread waits only on others' trials.
    asker = threading.Thread(target=lambda: (study.ask(), study.ask()))
    asker.start()
    asker.join()
    sampler = study.sampler
    assert isinstance(sampler, EvoPSampler)
    original = sampler._propose

    def interrupt(*args: Any) -> Any:
        result = original(*args)
        if not hasattr(result, "dropped"):
            raise KeyboardInterrupt
        return result

    sampler._propose = interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        study.ask()
    assert study.trials[-1].state == TrialState.FAIL


def test_evop_finds_the_optimum_where_random_search_does_not_always() -> None:
    space = LayerMaskSpace(16, 6)  # 8008 masks
    toy = ToyLoss(16, seed=1)
    optimum, _ = toy.optimum(space)
    evop_best, random_best = [], []
    for seed in range(3):
        study = evop_study(space, seed=seed)
        study.optimize(make_objective(space, toy), n_trials=240)
        evop_best.append(study.best_value)
        rand = optuna.create_study(sampler=RandomMaskSampler(space, seed=seed))
        rand.optimize(make_objective(space, toy), n_trials=240)
        random_best.append(rand.best_value)
    assert all(v <= optimum + 1e-9 for v in evop_best)
    assert any(v > optimum + 1e-9 for v in random_best)


def test_evop_multi_objective_selects_by_pareto_rank() -> None:
    space = LayerMaskSpace(12, 4)
    toys = ToyLoss(12, seed=11), ToyLoss(12, seed=12)
    sampler = EvoPSampler(space, population_size=8, seed=0)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        dropped = _suggest_all(trial, space)
        return toys[0](dropped), toys[1](dropped)

    study.optimize(objective, n_trials=40)
    assert not any(STOP_ABOVE_KEY in t.system_attrs for t in study.trials)
    by_id = {t._trial_id: t for t in study.trials}
    gens, parents = generations(study), cached_parents(study)
    for g in sorted(parents):
        pool = list(gens[g - 1]) + [by_id[i] for i in parents.get(g - 1, ())]
        front = {
            t._trial_id
            for t in pool
            if not any(all(np.array(o.values) <= t.values) and o.values != t.values for o in pool)
        }
        chosen = parents[g]
        assert chosen <= front if len(front) >= 3 else front <= chosen


def test_evop_foreign_params_and_invalid_seeds() -> None:
    space = LayerMaskSpace(10, 3)
    study = evop_study(space, population_size=4, seed=0)
    study.enqueue_trial(space.to_params((1, 2)))  # wrong k: scored, but in no generation

    def objective(trial: optuna.Trial) -> float:
        dropped = _suggest_all(trial, space)
        return len(dropped) + trial.suggest_float("x", 0.0, 1.0)

    study.optimize(objective, n_trials=3)
    assert GEN_KEY not in study.trials[0].system_attrs
    assert all(0.0 <= t.params["x"] <= 1.0 for t in study.trials)


def test_resuming_with_another_population_size_is_refused() -> None:
    space = LayerMaskSpace(10, 3)
    storage = InMemoryStorage()
    evop_study(space, storage=storage, name="s", population_size=4).optimize(
        make_objective(space, ToyLoss(10)), n_trials=2
    )
    other = evop_study(space, storage=storage, name="s", population_size=5)
    with pytest.raises(SpaceError, match="population_size"):
        other.ask()
    assert other.trials[-1].state == TrialState.FAIL


# --- random and exhaustive ---------------------------------------------------------------------


def test_random_masks_are_seeded_unique_and_stop_when_exhausted() -> None:
    space = LayerMaskSpace(6, 2)
    toy = ToyLoss(6)
    runs = []
    for _ in range(2):
        study = optuna.create_study(sampler=RandomMaskSampler(space, seed=7))
        study.optimize(make_objective(space, toy), n_trials=100)
        runs.append(masks(study, space))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 15 == len(set(runs[0]))  # C(6, 2), then study.stop()
    assert all(t.system_attrs[METHOD_KEY] == "random" for t in study.trials)


def test_exhaustive_enumerates_everything_once_and_finds_the_optimum() -> None:
    space = LayerMaskSpace(9, 3, protected=[0])
    toy = ToyLoss(9, seed=13)
    study = optuna.create_study(sampler=ExhaustiveMaskSampler(space))
    objective = make_objective(space, toy, fail_if=lambda trial, _: trial.number == 4)
    study.optimize(objective, n_trials=1000, catch=(RuntimeError,))
    done = [trial_mask(t, space) for t in study.trials if t.state == TrialState.COMPLETE]
    assert done == sorted(itertools.combinations(range(1, 9), 3))  # fixed order, FAIL retried
    assert len(study.trials) == 56 + 1
    assert study.best_value == pytest.approx(toy.optimum(space)[0])
    assert not any(SURPLUS_KEY in t.system_attrs for t in study.trials)


class SlowReads(InMemoryStorage):
    """Reads of every trial take 50 ms: threads that ask at once would read the same storage."""

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Any = None
    ) -> list[FrozenTrial]:
        trials = super().get_all_trials(study_id, deepcopy, states)
        time.sleep(0.05)
        return trials


class RacingJournal(JournalStorage):
    """A journal file (shared by processes) whose first ``n`` full reads all finish before any
    returns: ``n`` workers propose from the same storage. Reads of some states only pass."""

    def __init__(self, path: Path, n: int) -> None:
        super().__init__(JournalFileBackend(str(path)))
        self.barrier = threading.Barrier(n, timeout=10)
        self.reads = 0
        self.count_lock = threading.Lock()

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Any = None
    ) -> list[FrozenTrial]:
        trials = super().get_all_trials(study_id, deepcopy, states)
        with self.count_lock:
            self.reads += states is None
            racing = states is None and self.reads <= self.barrier.parties
        if racing:
            self.barrier.wait()
        return trials


def _ask_together(studies: list[optuna.Study]) -> None:
    threads = [threading.Thread(target=s.ask) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("method", [ExhaustiveMaskSampler, SLEBSampler])
def test_threads_of_one_process_propose_one_at_a_time(method: type) -> None:
    space = LayerMaskSpace(8, 3)
    study = optuna.create_study(sampler=method(space), storage=SlowReads())
    _ask_together([study] * 3)
    claimed = masks(study, space)
    assert len(claimed) == 3 and len(set(claimed)) == 3, claimed  # deterministic: all read alike


@pytest.mark.parametrize("method", [ExhaustiveMaskSampler, SLEBSampler])
def test_workers_that_propose_from_the_same_shared_storage_get_different_masks(
    method: type, tmp_path: Path
) -> None:
    space = LayerMaskSpace(8, 3)
    storage = RacingJournal(tmp_path / "journal.log", 3)
    optuna.create_study(storage=storage, study_name="s")
    workers = []
    for _ in range(3):  # one sampler each, as in separate processes
        sampler = method(space)
        sampler.poll_interval = 0.01
        workers.append(optuna.load_study(study_name="s", storage=storage, sampler=sampler))
    _ask_together(workers)
    claimed = masks(workers[0], space)
    assert len(claimed) == 3 and len(set(claimed)) == 3, claimed


def test_a_rival_that_claims_and_finishes_a_mask_between_read_and_claim_is_seen(
    tmp_path: Path,
) -> None:
    """The reread after a claim must see a rival's trial that is already told, not only running ones."""
    space = LayerMaskSpace(8, 3)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    optuna.create_study(storage=storage, study_name="s")
    slow, fast = (
        optuna.load_study(study_name="s", storage=storage, sampler=ExhaustiveMaskSampler(space))
        for _ in range(2)
    )
    slow.sampler.poll_interval = 0.01
    propose = slow.sampler._propose

    def propose_then_rival_runs(*args: Any) -> Any:
        proposal = propose(*args)
        if len(fast.trials) == 1:  # the rival read the study before this claim and tells at once
            rival = fast.ask()
            fast.tell(rival, 1.0)
        return proposal

    slow.sampler._propose = propose_then_rival_runs
    slow.ask()
    claimed = masks(slow, space)
    assert len(claimed) == 2 and len(set(claimed)) == 2, claimed


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_worker_killed_while_proposing_leaves_a_trial_that_is_retried(tmp_path: Path) -> None:
    """Optuna beats only from the objective on, and never fails a RUNNING trial without beats."""
    from optuna_prune.run.storage import open_storage

    space = LayerMaskSpace(8, 3)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=1)
    study = evop_study(space, storage=storage, name="s", population_size=4, seed=0)
    asked = study.ask()  # its process dies here: no objective, no heartbeat thread
    time.sleep(4.5)  # past the grace period of 3 heartbeats (SQLite keeps whole seconds)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[asked.number].state == TrialState.FAIL
    assert [t.state for t in trials[asked.number + 1 :]] == [TrialState.WAITING]  # its retry


def test_exhaustive_refuses_huge_spaces() -> None:
    with pytest.raises(SpaceError, match="max_candidates"):
        ExhaustiveMaskSampler(LayerMaskSpace(32, 8))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 14).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.data())
def test_exhaustive_rank_round_trip(nk: tuple[int, int], data: st.DataObject) -> None:
    import math

    n, k = nk
    rank = data.draw(st.integers(0, math.comb(n, k) - 1))
    combo = _unrank(rank, n, k)
    assert len(combo) == k and list(combo) == sorted(set(combo)) and combo[-1] < n
    assert _rank(combo, n) == rank


# --- SLEB --------------------------------------------------------------------------------------


def sleb_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.trials if STEP_KEY in t.system_attrs]


@pytest.mark.parametrize("honour_stop", [True, False])
def test_sleb_follows_the_greedy_sequence(honour_stop: bool) -> None:
    space = LayerMaskSpace(10, 4)
    toy = ToyLoss(10, seed=2, n_samples=8)
    study = optuna.create_study(sampler=SLEBSampler(space))
    study.optimize(make_objective(space, toy, honour_stop=honour_stop), n_trials=500)
    greedy = toy.greedy(range(1, 9), 4)  # the ends are protected
    assert len(study.trials) == 8 + 7 + 6 + 5  # then SLEB stopped the study
    assert sleb_result(study) == greedy[-1]
    previous: dict[int, float] = {}
    for step, base in enumerate([(), *greedy[:-1]]):
        trials = [t for t in sleb_trials(study) if t.system_attrs[STEP_KEY] == step]
        layers = [next(iter(set(trial_mask(t, space)) - set(base))) for t in trials]
        assert sorted(layers) == [i for i in range(1, 9) if i not in base]
        assert layers == sorted(layers, key=lambda i: (previous.get(i, np.inf), i))  # best first
        previous = {i: trial_loss(t)[0] for i, t in zip(layers, trials, strict=True)}
        partial = step < 3
        assert all(t.system_attrs.get(ALLOW_PARTIAL_KEY, False) == partial for t in trials)
        best = np.inf
        for t in trials:  # STOP_ABOVE = best exact loss so far in the step
            assert t.system_attrs.get(STOP_ABOVE_KEY, np.inf) == best
            loss, exact = trial_loss(t)
            if exact:
                best = min(best, loss)
        if not partial:
            assert {t.state for t in trials if not t.user_attrs["stopped_early"]} == {
                TrialState.COMPLETE
            }
    stopped = sum(t.user_attrs["stopped_early"] for t in study.trials)
    assert (stopped > 0) == honour_stop


def test_sleb_resumes_and_splits_a_step_between_samplers() -> None:
    space = LayerMaskSpace(9, 3)
    toy = ToyLoss(9, seed=14)
    objective = make_objective(space, toy)
    storage = InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=SLEBSampler(space))
    first.optimize(objective, n_trials=4)  # stops in the middle of step 0
    assert sleb_result(first) is None
    second = optuna.load_study(storage=storage, study_name="s", sampler=SLEBSampler(space))
    third = optuna.load_study(storage=storage, study_name="s", sampler=SLEBSampler(space))
    for i in range(30):
        (second if i % 2 else third).optimize(objective, n_trials=1)
    found = [trial_mask(t, space) for t in sleb_trials(second)]
    assert len(found) == 7 + 6 + 5 == len(set(found))
    assert sleb_result(second) == toy.greedy(range(1, 8), 3)[-1]


def test_sleb_without_protected_ends_and_with_retries() -> None:
    space = LayerMaskSpace(6, 2)
    toy = ToyLoss(6, seed=15)
    study = optuna.create_study(sampler=SLEBSampler(space, protect_ends=False))
    objective = make_objective(space, toy, fail_if=lambda trial, _: trial.number == 1)
    study.optimize(objective, n_trials=100, catch=(RuntimeError,))
    assert len(study.trials) == 6 + 5 + 1  # the failed candidate was proposed again
    assert sleb_result(study) == toy.greedy(range(6), 2)[-1]


def test_sleb_step_whose_candidates_all_fail_raises() -> None:
    space = LayerMaskSpace(6, 2)
    study = optuna.create_study(sampler=SLEBSampler(space, max_retries=1))
    objective = make_objective(space, ToyLoss(6), fail_if=lambda _, dropped: True)
    with pytest.raises(SLEBError, match="every candidate failed"):
        study.optimize(objective, n_trials=100, catch=(RuntimeError,))
    assert len(study.trials) == 2 * 4 + 1
    assert study.trials[-1].state == TrialState.FAIL


def test_sleb_refuses_multi_objective_studies() -> None:
    space = LayerMaskSpace(6, 2)
    study = optuna.create_study(directions=["minimize"] * 2, sampler=SLEBSampler(space))
    with pytest.raises(ValueError, match="one objective"):
        study.ask()


def test_sleb_result_seeds_evop_in_the_same_study() -> None:
    space = LayerMaskSpace(10, 3)
    toy = ToyLoss(10, seed=16)
    storage = InMemoryStorage()
    sleb = optuna.create_study(storage=storage, study_name="s", sampler=SLEBSampler(space))
    sleb.optimize(make_objective(space, toy), n_trials=100)
    found = sleb_result(sleb)
    assert found is not None
    evop = evop_study(space, storage=storage, name="s", population_size=5, seed=0)
    evop.enqueue_trial(space.to_params(found), user_attrs={"seeded_from": "sleb"})
    evop.optimize(make_objective(space, toy), n_trials=5)
    gen0 = generations(evop)[0]
    assert len(gen0) == 5 and trial_mask(gen0[0], space) == found
    # EvoP never re-proposes a mask SLEB already scored (enqueued seeds aside).
    sleb_masks = {trial_mask(t, space) for t in sleb_trials(evop)}
    assert not any(trial_mask(t, space) in sleb_masks for t in gen0[1:])


def _retry_stale(study: optuna.Study, trial: optuna.Trial) -> None:
    """What heartbeats do to a dead worker's trial: FAIL it, re-enqueue a copy."""
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, study._storage.get_trial(trial._trial_id))


def test_retried_stale_trials_keep_their_mask_and_generation() -> None:
    space = LayerMaskSpace(10, 3)
    toy = ToyLoss(10, seed=17)
    study = evop_study(space, population_size=4, seed=0)
    dead = study.ask()
    dropped = _suggest_all(dead, space)
    _retry_stale(study, dead)
    study.optimize(make_objective(space, toy), n_trials=5)
    retry = study.trials[1]
    assert retry.system_attrs["failed_trial"] == 0
    assert trial_mask(retry, space) == dropped == space.dropped_from_params(retry.params)
    assert retry.system_attrs[GEN_KEY] == 0 and retry.system_attrs[ORIGIN_KEY] == "random"
    assert [len(v) for v in generations(study).values()] == [4, 1]


def test_sleb_continues_a_retried_candidate() -> None:
    space = LayerMaskSpace(8, 2)
    toy = ToyLoss(8, seed=18)
    study = optuna.create_study(sampler=SLEBSampler(space))
    dead = study.ask()
    _suggest_all(dead, space)
    _retry_stale(study, dead)
    study.optimize(make_objective(space, toy), n_trials=100)
    assert study.trials[1].system_attrs[STEP_KEY] == 0
    assert len(study.trials) == 1 + 6 + 5
    assert sleb_result(study) == toy.greedy(range(1, 7), 2)[-1]
