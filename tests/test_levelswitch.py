"""EvoPress's (1 + lambda) level-switch search on a toy loss with a known optimum."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import optuna
import pytest
from _toy import ToyLoss, make_objective
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_prune.run.config import ConfigError, SearchConfig
from optuna_prune.run.study import make_sampler
from optuna_prune.search.record import METHOD_KEY, ORIGIN_KEY, PARENTS_KEY, STOP_ABOVE_KEY
from optuna_prune.search.samplers import (
    LevelSwitchSampler,
    RandomMaskSampler,
    trial_mask,
)
from optuna_prune.search.space import LayerMaskSpace, SpaceError

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROUND_KEY = LevelSwitchSampler._get_generation_key()
PARENT_PREFIX = LevelSwitchSampler._get_parent_cache_key_prefix()


def ls_study(space: LayerMaskSpace, *, storage=None, name=None, **kwargs) -> optuna.Study:
    sampler = LevelSwitchSampler(space, **kwargs)
    sampler.poll_interval = 0.01
    return optuna.create_study(
        sampler=sampler, storage=storage, study_name=name, load_if_exists=name is not None
    )


def parents_by_round(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    by_id = {t._trial_id: t for t in study.trials}
    return {
        int(k[len(PARENT_PREFIX) :]): by_id[v[0]]
        for k, v in attrs.items()
        if k.startswith(PARENT_PREFIX)
    }


def test_offspring_are_exact_k_and_one_to_three_swaps_from_the_parent() -> None:
    space = LayerMaskSpace(16, 6, protected=(0, 15))
    study = ls_study(space, offspring=8, seed=0)
    study.optimize(make_objective(space, ToyLoss(16, seed=1)), n_trials=120)
    trials = study.trials
    by_number = {t.number: t for t in trials}
    parents = parents_by_round(study)
    swaps = Counter()
    for t in trials:
        mask = trial_mask(t, space)
        assert space.is_valid(mask)  # exact k, protected layers kept
        assert t.system_attrs[METHOD_KEY] == "levelswitch"
        if t.system_attrs[ROUND_KEY] == 0:
            assert t.system_attrs[ORIGIN_KEY] == "random"
            continue
        assert t.system_attrs[ORIGIN_KEY] == "offspring"
        parent, again = t.system_attrs[PARENTS_KEY]
        assert parent == again
        assert parent == parents[t.system_attrs[ROUND_KEY]].number
        diff = set(mask) ^ set(trial_mask(by_number[parent], space))
        swaps[len(diff) // 2] += 1
    assert set(swaps) == {1, 2, 3}  # uniform: all three counts occur
    assert min(swaps.values()) > 0.15 * sum(swaps.values())
    assert len({trial_mask(t, space) for t in trials}) == len(trials)  # no repeats


def test_parent_never_gets_worse_and_is_the_best_complete_trial() -> None:
    space = LayerMaskSpace(16, 6)
    toy = ToyLoss(16, seed=5, n_samples=8, spread=10.0)
    study = ls_study(space, offspring=8, seed=2)
    study.optimize(make_objective(space, toy), n_trials=120)
    parents = parents_by_round(study)
    assert sorted(parents) == list(range(1, 15))
    states = Counter(t.state for t in study.trials)
    assert states[TrialState.PRUNED] > 0  # the best value so far was the stop threshold
    for r, parent in parents.items():
        assert parent.state == TrialState.COMPLETE
        earlier = [t for t in study.trials if t.system_attrs[ROUND_KEY] < r]
        assert parent.value == min(t.value for t in earlier if t.state == TrialState.COMPLETE)
        if r > 1:
            assert parent.value <= parents[r - 1].value
        assert all(  # each offspring may stop as soon as it cannot beat the round's best
            t.system_attrs[STOP_ABOVE_KEY] <= parent.value
            for t in study.trials
            if t.system_attrs[ROUND_KEY] == r
        )


def test_finds_the_optimum_of_a_toy_problem() -> None:
    """Mostly: an elitist (1 + lambda) search can stay on a local optimum, as EvoPress can."""
    space = LayerMaskSpace(16, 6)  # 8008 masks
    toy = ToyLoss(16, seed=1)
    optimum, _ = toy.optimum(space)
    found = []
    for seed in range(3):
        study = ls_study(space, offspring=8, seed=seed)
        study.optimize(make_objective(space, toy), n_trials=300)
        found.append(study.best_value)
    assert sum(v <= optimum + 1e-9 for v in found) >= 2
    rand = optuna.create_study(sampler=RandomMaskSampler(space, seed=0))
    rand.optimize(make_objective(space, toy), n_trials=300)
    assert rand.best_value > max(found)


def test_a_seeded_mask_is_the_first_parent_when_it_is_best() -> None:
    space = LayerMaskSpace(12, 4)
    toy = ToyLoss(12, seed=6)
    _, best = toy.optimum(space)
    study = ls_study(space, offspring=6, seed=0)
    study.enqueue_trial(space.to_params(best), user_attrs={"seeded_from": "sleb"})
    study.optimize(make_objective(space, toy), n_trials=20)
    seed = study.trials[0]
    assert seed.system_attrs[ORIGIN_KEY] == "seed" and seed.system_attrs[ROUND_KEY] == 0
    assert all(p.number == seed.number for p in parents_by_round(study).values())


def test_resume_and_alternating_workers_continue_the_same_search(tmp_path: Path) -> None:
    space = LayerMaskSpace(12, 4)
    objective = make_objective(space, ToyLoss(12, seed=8))
    reference = ls_study(space, offspring=6, seed=4)
    reference.optimize(objective, n_trials=40)

    path = str(tmp_path / "journal.log")
    first = ls_study(space, storage=JournalStorage(JournalFileBackend(path)), name="s", offspring=6, seed=4)
    first.optimize(objective, n_trials=17)
    other = ls_study(space, storage=JournalStorage(JournalFileBackend(path)), name="s", offspring=6, seed=4)
    for i in range(23):
        (first if i % 2 else other).optimize(objective, n_trials=1)
    assert [trial_mask(t, space) for t in other.trials] == [
        trial_mask(t, space) for t in reference.trials
    ]
    assert Counter(t.system_attrs[ROUND_KEY] for t in other.trials) == {
        **{r: 6 for r in range(6)}, 6: 4,
    }


def test_two_threads_make_full_rounds() -> None:
    space = LayerMaskSpace(12, 4)
    study = ls_study(space, offspring=6, seed=5)
    study.optimize(make_objective(space, ToyLoss(12, seed=9)), n_trials=36, n_jobs=2)
    assert all(space.is_valid(trial_mask(t, space)) for t in study.trials)
    rounds = Counter(t.system_attrs[ROUND_KEY] for t in study.trials)
    assert all(6 <= rounds[r - 1] <= 7 for r in parents_by_round(study))


def test_settings_are_checked_and_bound_to_the_study() -> None:
    space = LayerMaskSpace(12, 4)
    for bad in (dict(offspring=1), dict(offspring=True), dict(max_swaps=0)):
        with pytest.raises(ValueError):
            LevelSwitchSampler(space, **bad)
    sampler = LevelSwitchSampler(space, offspring=5, max_swaps=2)
    assert sampler.offspring == sampler.population_size == 5 and sampler.n_elite == 1
    assert sampler.config()["max_swaps"] == 2
    study = optuna.create_study(sampler=sampler)
    study.optimize(make_objective(space, ToyLoss(12)), n_trials=2)
    study.sampler = LevelSwitchSampler(space, offspring=5, max_swaps=3)
    with pytest.raises(SpaceError, match="max_swaps"):
        study.optimize(make_objective(space, ToyLoss(12)), n_trials=1)
    # A swap count larger than the kept layers is capped, not an error.
    tight = LayerMaskSpace(5, 4)
    small = ls_study(tight, offspring=2, max_swaps=3, seed=0)
    small.optimize(make_objective(tight, ToyLoss(5)), n_trials=5)
    assert all(tight.is_valid(trial_mask(t, tight)) for t in small.trials)


def test_config_names_the_sampler() -> None:
    space = LayerMaskSpace(30, 6)
    cfg = SearchConfig(sparsity=0.2, sampler="levelswitch", population=12, seed=3)
    sampler = make_sampler(cfg, space)
    assert isinstance(sampler, LevelSwitchSampler) and sampler.offspring == 12
    assert make_sampler(cfg.replace(population=None), space).offspring == 16
    with pytest.raises(ConfigError, match="one parent"):
        make_sampler(cfg, space, n_objectives=2)
