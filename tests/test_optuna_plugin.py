"""The exact-k samplers as Optuna users meet them: Optuna's own sampler test cases, pickling,
seeds, threads, RDB resumption, ask-and-tell, and clear errors for masks asked the wrong way."""

from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.samplers import BaseSampler
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
)

from optuna_prune.search import (
    EvoPSampler,
    ExhaustiveMaskSampler,
    LevelSwitchSampler,
    MaskSampler,
    RandomMaskSampler,
    SpaceError,
    suggest_mask,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

N, K = 9, 3  # 84 subsets: more than any case's trials, so no sampler runs out
FACTORIES: dict[str, Callable[..., MaskSampler]] = {
    "evop": lambda seed=0: EvoPSampler.for_subset(N, K, seed=seed, population_size=6),
    "levelswitch": lambda seed=0: LevelSwitchSampler.for_subset(N, K, seed=seed, offspring=4),
    "random": lambda seed=0: RandomMaskSampler.for_subset(N, K, seed=seed),
    "exhaustive": lambda seed=0: ExhaustiveMaskSampler.for_subset(N, K, seed=seed),
}
WEIGHTS = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]


@pytest.fixture(params=sorted(FACTORIES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


class TestOptunaSamplerCases(
    BasicSamplerTestCase, RelativeSamplerTestCase, MultiObjectiveSamplerTestCase
):
    """Optuna's own cases: every param that is not part of the mask goes to the fallback
    sampler, so the samplers must behave like any Optuna sampler for them. None is skipped: the
    exact-k samplers support multi-objective studies (EvoP ranks by Pareto front), so
    ``SingleOnlySamplerTestCase`` does not apply."""

    @pytest.fixture
    def sampler(self, name: str) -> Callable[[], BaseSampler]:
        return FACTORIES[name]


def subset_objective(trial: optuna.Trial) -> float:
    chosen = suggest_mask(trial, N, K)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    return sum(WEIGHTS[i] for i in chosen) + lr


def history(study: optuna.Study) -> list[tuple[tuple[int, ...], float]]:
    return [
        (tuple(i for i in range(N) if t.params[f"layer_{i:02d}"]), t.params["lr"])
        for t in study.get_trials(deepcopy=False)
    ]


def test_same_seed_same_trials_and_exact_k(name: str) -> None:
    runs = []
    for _ in range(2):
        study = optuna.create_study(sampler=FACTORIES[name](seed=7))
        study.optimize(subset_objective, n_trials=15)
        runs.append(history(study))
    assert runs[0] == runs[1]
    assert all(len(chosen) == K for chosen, _ in runs[0])
    other = optuna.create_study(sampler=FACTORIES[name](seed=8))
    other.optimize(subset_objective, n_trials=15)
    assert history(other) != runs[0]  # the seed matters (at least for the fallback's lr)


def test_reseed_rng_changes_the_random_states(name: str) -> None:
    sampler = FACTORIES[name]()
    before = str(sampler._rng.rng.get_state()), str(sampler._random_sampler._rng.rng.get_state())
    sampler.reseed_rng()
    after = str(sampler._rng.rng.get_state()), str(sampler._random_sampler._rng.rng.get_state())
    assert before[0] != after[0] and before[1] != after[1]


@pytest.mark.parametrize("clone", [pickle.dumps, copy.deepcopy], ids=["pickle", "deepcopy"])
def test_pickled_or_copied_sampler_continues_the_same_search(
    name: str, clone: Callable[[object], object]
) -> None:
    whole = optuna.create_study(sampler=FACTORIES[name](seed=3))
    whole.optimize(subset_objective, n_trials=20)
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(sampler=FACTORIES[name](seed=3), storage=storage, study_name="s")
    first.optimize(subset_objective, n_trials=10)
    copied = clone(first.sampler)
    sampler = pickle.loads(copied) if isinstance(copied, bytes) else copied
    assert isinstance(sampler, MaskSampler) and sampler is not first.sampler
    resumed = optuna.load_study(study_name="s", storage=storage, sampler=sampler)
    resumed.optimize(subset_objective, n_trials=10)
    assert [m for m, _ in history(resumed)] == [m for m, _ in history(whole)]


def test_threads_share_one_search(name: str) -> None:
    study = optuna.create_study(sampler=FACTORIES[name](seed=1))
    study.optimize(subset_objective, n_trials=24, n_jobs=3)
    masks = [m for m, _ in history(study)]
    assert len(masks) == 24 and all(len(m) == K for m in masks)
    assert len(set(masks)) == 24  # no two threads got the same subset


def test_resuming_from_an_rdb_storage_continues_the_search(name: str, tmp_path: Path) -> None:
    # tmpfs where there is one: SQLite commits on a busy disk cost ~10 ms each.
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = folder / f"optuna_prune_resume_{name}_{id(tmp_path)}.db"
    url = f"sqlite:///{path}"
    try:
        first = optuna.create_study(sampler=FACTORIES[name](seed=5), storage=url, study_name="r")
        first.optimize(subset_objective, n_trials=8)
        del first  # a new process would start from storage alone
        resumed = optuna.load_study(study_name="r", storage=url, sampler=FACTORIES[name](seed=5))
        resumed.optimize(subset_objective, n_trials=8)
        whole = optuna.create_study(sampler=FACTORIES[name](seed=5))
        whole.optimize(subset_objective, n_trials=16)
        assert [m for m, _ in history(resumed)] == [m for m, _ in history(whole)]
    finally:
        path.unlink(missing_ok=True)


def test_batched_ask_and_tell_with_the_defaults_does_not_block(name: str) -> None:
    study = optuna.create_study(sampler=FACTORIES[name](seed=2))
    asked: list[optuna.Trial] = []

    def ask_batches() -> None:
        for _ in range(3):
            batch = [study.ask() for _ in range(12)]  # two generations' worth, none told
            asked.extend(batch)
            for trial in batch:
                study.tell(trial, subset_objective(trial))

    worker = threading.Thread(target=ask_batches, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "ask() blocked on trials that this thread holds"
    masks = [m for m, _ in history(study)]
    assert len(masks) == 36 and all(len(m) == K for m in masks)


def test_suggest_int_on_a_mask_param_names_the_fix() -> None:
    study = optuna.create_study(sampler=FACTORIES["evop"]())
    with pytest.raises(SpaceError, match=r"'layer_00'.*suggest_categorical\('layer_00', \[0, 1\]\)"):
        study.optimize(lambda t: t.suggest_int("layer_00", 0, 1), n_trials=1)


def test_mask_params_under_other_names_are_refused() -> None:
    study = optuna.create_study(sampler=FACTORIES["random"]())

    def own_names(trial: optuna.Trial) -> float:
        return sum(trial.suggest_categorical(f"x{i}", [0, 1]) for i in range(N))

    with pytest.raises(SpaceError, match=r"suggested \['x0', 'x1', 'x2'\]\.\.\. like mask params"):
        study.optimize(own_names, n_trials=1)
    study = optuna.create_study(sampler=FACTORIES["random"]())
    with pytest.raises(SpaceError, match="only part of the exact-k mask"):
        study.optimize(lambda t: t.suggest_categorical("layer_01", [0, 1]), n_trials=1)


def test_suggest_mask_refuses_a_sampler_of_another_size() -> None:
    study = optuna.create_study(sampler=FACTORIES["evop"]())
    with pytest.raises(SpaceError, match=r"for_subset\(9, 4\)"):
        study.optimize(lambda t: len(suggest_mask(t, N, K + 1)), n_trials=1)


def test_other_samplers_get_free_subsets_through_the_same_params() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: len(suggest_mask(t, N, K)), n_trials=20)
    assert {t.value for t in study.trials} != {K}  # any size: the objective must handle it
