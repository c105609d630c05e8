"""Few commits per trial on SQLite, with the same trials and the same checks as one write at a time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import event

from optuna_prune.search import EvoPSampler, RandomMaskSampler, compat, suggest_mask
from optuna_prune.search.samplers.batched_writes import (
    one_write_for_params,
    set_trial_params,
    set_trial_system_attrs,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
N, K = 12, 4


def sqlite_study(tmp_path: Path, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/b.db", sampler=sampler)


@contextmanager
def commits(study: optuna.Study) -> Iterator[list[int]]:
    """Counts the commits that write (reads commit too, but cost no file sync) in the block."""
    engine = compat.unwrap_storage(compat.study_storage(study)).engine
    seen: list[int] = []
    writing: list[bool] = []

    def statement(_conn: object, _cursor: object, sql: str, *_args: object) -> None:
        if sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writing.append(True)

    def commit(_conn: object) -> None:
        if writing:
            seen.append(1)
        writing.clear()

    def rollback(_conn: object) -> None:
        writing.clear()

    listeners = [("before_cursor_execute", statement), ("commit", commit), ("rollback", rollback)]
    for name, fn in listeners:
        event.listen(engine, name, fn)
    try:
        yield seen
    finally:
        for name, fn in listeners:
            event.remove(engine, name, fn)


def cost(trial: optuna.Trial) -> float:
    return float(sum(i * i % 7 for i in suggest_mask(trial, N, K)))


def test_suggest_mask_stores_all_params_in_one_commit(tmp_path: Path) -> None:
    study = sqlite_study(tmp_path)
    trial = study.ask()
    with commits(study) as seen:
        chosen = suggest_mask(trial, N, K)
    assert len(seen) == 1
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.params == trial.params and len(stored.params) == N
    assert tuple(i for i in range(N) if stored.params[f"layer_{i:02d}"]) == chosen


@pytest.mark.parametrize("make", [EvoPSampler, RandomMaskSampler])
def test_a_cheap_trial_costs_four_commits(tmp_path: Path, make: type) -> None:
    """Create, the sampler's attrs, the mask's params, tell: one commit each (config once)."""
    study = sqlite_study(tmp_path, make.for_subset(N, K, seed=0, population_size=5)
                         if make is EvoPSampler else make.for_subset(N, K, seed=0))  # fmt: skip
    study.optimize(cost, n_trials=1)
    with commits(study) as seen:
        study.optimize(cost, n_trials=12)
    generations = 12 // 5 + 1  # EvoP stores a generation's parents, and its last slot once more
    assert len(seen) <= 4 * 12 + (2 * generations if make is EvoPSampler else 0)


def test_sqlite_stores_what_memory_stores(tmp_path: Path) -> None:
    runs = []
    for storage in (None, f"sqlite:///{tmp_path}/m.db"):
        study = optuna.create_study(
            storage=storage, sampler=EvoPSampler.for_subset(N, K, seed=3, population_size=5)
        )
        study.optimize(cost, n_trials=14)
        runs.append([(t.params, t.system_attrs, t.value) for t in study.trials])
    assert runs[0] == runs[1]


def test_a_mask_param_of_another_kind_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    study = sqlite_study(tmp_path)
    study.optimize(lambda t: t.suggest_float("layer_05", 0, 1), n_trials=1)
    trial = study.ask()
    with pytest.raises(ValueError, match="different distribution kind"):
        suggest_mask(trial, N, K)
    assert study._storage.get_trial(trial._trial_id).params == {}


def test_params_suggested_before_an_error_are_stored(tmp_path: Path) -> None:
    study = sqlite_study(tmp_path)
    trial = study.ask()
    with pytest.raises(KeyError), one_write_for_params(trial):
        trial.suggest_int("a", 0, 3)
        trial.suggest_float("b", 0, 1)
        raise KeyError("objective bug")
    assert set(study._storage.get_trial(trial._trial_id).params) == {"a", "b"}
    assert trial.storage is study._storage


def test_a_finished_trial_takes_no_writes(tmp_path: Path) -> None:
    study = sqlite_study(tmp_path)
    trial = study.ask()
    study.tell(trial, 1.0)
    dist = CategoricalDistribution([0, 1])
    with pytest.raises(UpdateFinishedTrialError):
        set_trial_params(study._storage, trial._trial_id, [("x", 0, dist), ("y", 1, dist)])
    with pytest.raises(UpdateFinishedTrialError):
        set_trial_system_attrs(study._storage, trial._trial_id, {"p": 1, "q": 2})


@pytest.mark.parametrize("where", ["memory", "sqlite"])
def test_batched_writes_read_back_as_single_ones(tmp_path: Path, where: str) -> None:
    study = sqlite_study(tmp_path) if where == "sqlite" else optuna.create_study()
    trial = study.ask()
    params = [("lr", 0.5, FloatDistribution(0, 1)), ("depth", 1.0, CategoricalDistribution([2, 3]))]
    set_trial_params(study._storage, trial._trial_id, params)
    set_trial_system_attrs(study._storage, trial._trial_id, {"a": [1, 2], "b": None})
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.params == {"lr": 0.5, "depth": 3}
    assert stored.system_attrs == {"a": [1, 2], "b": None}
    assert stored.state == TrialState.RUNNING
