"""Optuna's private API, as ``optuna_prune.search.compat`` relies on it, and the package's use of it.

Each check names what changed in the installed Optuna and which compat function needs updating,
so an Optuna upgrade that breaks the package says where, before any search test fails obscurely.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import RDBStorage

from optuna_prune.search import compat

optuna.logging.set_verbosity(optuna.logging.WARNING)
PACKAGE = Path(compat.__file__).parent


def need(ok: object, thing: str, function: str) -> None:
    """Fails naming what changed and where to fix it."""
    assert ok, f"optuna {optuna.__version__} changed {thing}: optuna_prune.search.compat.{function} needs updating"


def params_of(obj: object) -> list[str]:
    return list(inspect.signature(obj).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("module", "names", "function"),
    [
        ("optuna.storages._cached_storage", ["_CachedStorage"], "unwrap_storage"),
        ("optuna.storages._rdb.storage", ["_create_scoped_session"], "scoped_session"),
        ("optuna.storages._heartbeat", ["BaseHeartbeat", "is_heartbeat_enabled"], "is_heartbeat_enabled"),
        ("optuna.samplers._lazy_random_state", ["LazyRandomState"], "LazyRandomState"),
        ("optuna.samplers._ga", ["BaseGASampler"], "BaseGASampler"),
        (
            "optuna.samplers.nsgaii._elite_population_selection_strategy",
            ["_rank_population", "_crowding_distance_sort"],
            "rank_population",
        ),
        ("optuna.study._constrained_optimization", ["_is_constrained_optimization"], "is_constrained_optimization"),
        ("optuna.study._optimize", ["_logger"], "OPTIMIZE_LOGGER"),
    ],
)
def test_private_modules_hold_what_compat_imports(module: str, names: list[str], function: str) -> None:
    try:
        found = importlib.import_module(module)
    except ImportError:
        need(False, f"module {module} (gone)", function)
    for name in names:
        need(hasattr(found, name), f"{module}.{name} (gone)", function)


@pytest.mark.parametrize(
    ("obj", "expected", "function"),
    [
        ("optuna.storages._rdb.storage._create_scoped_session", ["scoped_session", "ignore_integrity_error"], "scoped_session"),
        (
            "optuna.storages.RDBStorage._set_trial_attr_without_commit",
            ["self", "session", "model_cls", "trial_id", "key", "value"],
            "set_trial_attr_without_commit",
        ),
        ("optuna.storages._heartbeat.is_heartbeat_enabled", ["storage"], "is_heartbeat_enabled"),
        ("optuna.storages.RDBStorage._get_stale_trial_ids", ["self", "study_id"], "BaseHeartbeat"),
        ("optuna.storages._heartbeat.BaseHeartbeat._get_stale_trial_ids", ["self", "study_id"], "BaseHeartbeat"),
        ("optuna.samplers._lazy_random_state.LazyRandomState.__init__", ["self", "seed"], "LazyRandomState"),
        ("optuna.samplers._ga.BaseGASampler.__init__", ["self", "population_size"], "BaseGASampler"),
        ("optuna.samplers._ga.BaseGASampler._get_generation_key", [], "generation_key"),
        ("optuna.samplers._ga.BaseGASampler._get_parent_cache_key_prefix", [], "parent_cache_key_prefix"),
        (
            "optuna.samplers.nsgaii._elite_population_selection_strategy._rank_population",
            ["population", "directions", "is_constrained"],
            "rank_population",
        ),
        (
            "optuna.samplers.nsgaii._elite_population_selection_strategy._crowding_distance_sort",
            ["population"],
            "crowding_distance_sort",
        ),
        ("optuna.study._constrained_optimization._is_constrained_optimization", ["trials"], "is_constrained_optimization"),
    ],
)
def test_private_callables_keep_their_signature(obj: str, expected: list[str], function: str) -> None:
    module, _, rest = obj.partition(".")
    target: object = importlib.import_module(module)
    for part in rest.split("."):
        need(hasattr(target, part), f"{obj} (gone)", function)
        target = getattr(target, part)
    need(params_of(target) == expected, f"the signature of {obj} to {params_of(target)}", function)


def test_base_heartbeat_asks_what_leased_journal_storage_implements() -> None:
    abstract = compat.BaseHeartbeat.__abstractmethods__
    need(
        abstract == {"record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"},
        f"BaseHeartbeat's abstract methods to {sorted(abstract)}",
        "BaseHeartbeat (and heartbeat.LeasedJournalStorage)",
    )


def test_ga_sampler_keeps_its_lock_and_keys() -> None:
    concrete = dict.fromkeys(compat.BaseGASampler.__abstractmethods__, lambda *_args, **_kwargs: None)
    sampler = type("GA", (compat.BaseGASampler,), concrete)(4)
    need(hasattr(sampler, "_thread_lock"), "BaseGASampler._thread_lock (gone)", "BaseGASampler (and samplers.evop)")
    need(isinstance(compat.generation_key(compat.BaseGASampler), str), "BaseGASampler._get_generation_key", "generation_key")
    need(compat.keeps_parents(sampler), "BaseGASampler._get_parent_cache_key_prefix (gone)", "keeps_parents")
    need(
        isinstance(compat.parent_cache_key_prefix(compat.BaseGASampler), str),
        "BaseGASampler._get_parent_cache_key_prefix",
        "parent_cache_key_prefix",
    )


def test_lazy_random_state_has_an_rng() -> None:
    need(hasattr(compat.LazyRandomState(0), "rng"), "LazyRandomState.rng (gone)", "LazyRandomState")


def test_optimize_logs_on_the_named_logger() -> None:
    module = importlib.import_module("optuna.study._optimize")
    need(module._logger is logging.getLogger(compat.OPTIMIZE_LOGGER), "the logger of Study.optimize", "OPTIMIZE_LOGGER")


def test_trial_suggest_stores_through_trial_storage() -> None:
    source = inspect.getsource(optuna.trial.Trial._suggest)
    need(
        "self.storage" in source and ".set_trial_param(" in source,
        "how Trial._suggest stores a param (no longer trial.storage.set_trial_param)",
        "__doc__ (and samplers.batched_writes.one_write_for_params)",
    )


def test_study_and_trial_ids_and_storage() -> None:
    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    need(compat.study_storage(study) is trial.storage, "Study._storage", "study_storage")
    need(isinstance(compat.study_id(study), int), "Study._study_id", "study_id")
    frozen = study.trials[0]
    need(compat.trial_id(trial) == frozen._trial_id, "Trial._trial_id", "trial_id")
    need(
        compat.study_storage(study).get_trial(compat.trial_id(frozen)).number == trial.number,
        "FrozenTrial._trial_id",
        "trial_id",
    )
    need(
        compat.study_storage(study).get_all_trials(compat.study_id(study))[0].number == 0,
        "Study._study_id",
        "study_id",
    )


def test_cached_storage_wraps_rdb_storage(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/c.db")
    storage = compat.study_storage(study)
    cached = compat.cached_storage(storage)
    need(cached is not None, "the storage create_study makes for a URL (no longer _CachedStorage)", "cached_storage")
    need(isinstance(compat.unwrap_storage(storage), RDBStorage), "_CachedStorage._backend", "unwrap_storage")
    need(hasattr(cached, "_lock") and hasattr(cached._lock, "__enter__"), "_CachedStorage._lock", "cache_lock")
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    known = compat.known_distributions(cached, compat.trial_id(trial))
    need(
        known == {"x": FloatDistribution(0.0, 1.0)},
        "_CachedStorage._trial_id_to_study_id_and_number or _studies[...].param_distribution",
        "known_distributions",
    )
    with compat.cache_lock(cached):
        pass
    need(compat.unwrap_storage(optuna.storages.InMemoryStorage()) is not None, "unwrap_storage", "unwrap_storage")


def test_rdb_models_have_the_columns_used(tmp_path: Path) -> None:
    models = compat.rdb_models()
    columns = {
        "TrialModel": ["trial_id", "number", "study_id", "state"],
        "TrialParamModel": ["trial_id", "param_name", "param_value", "distribution_json"],
        "TrialSystemAttributeModel": ["trial_id", "key", "value_json"],
        "TrialHeartbeatModel": ["trial_id", "heartbeat"],
    }
    for model, names in columns.items():
        need(hasattr(models, model), f"optuna.storages._rdb.models.{model} (gone)", "rdb_models")
        for name in names:
            need(hasattr(getattr(models, model), name), f"the column {model}.{name} (gone)", "rdb_models")
    need(hasattr(models.TrialModel, "find_or_raise_by_id"), "TrialModel.find_or_raise_by_id (gone)", "rdb_models")
    need(isinstance(models.MAX_INDEXED_STRING_LENGTH, int), "models.MAX_INDEXED_STRING_LENGTH", "rdb_models")
    # The one-transaction write path works end to end through compat.
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/m.db")
    backend = compat.unwrap_storage(compat.study_storage(study))
    trial = study.ask()
    with compat.scoped_session(backend) as session:
        compat.set_trial_attr_without_commit(
            backend, session, models.TrialSystemAttributeModel, compat.trial_id(trial), "k", [1, 2]
        )
    need(backend.get_trial_system_attrs(compat.trial_id(trial))["k"] == [1, 2], "_set_trial_attr_without_commit", "set_trial_attr_without_commit")


def test_heartbeat_helper_tells_heartbeat_storage(tmp_path: Path) -> None:
    plain = RDBStorage(f"sqlite:///{tmp_path}/h.db")
    beating = RDBStorage(f"sqlite:///{tmp_path}/h.db", heartbeat_interval=60)
    need(not compat.is_heartbeat_enabled(plain) and compat.is_heartbeat_enabled(beating), "is_heartbeat_enabled", "is_heartbeat_enabled")


# --- the package reaches Optuna's private API only through compat -------------------------------

PRIVATE = re.compile(
    r"\._storage\b|\._study_id\b|\._trial_id\b|\boptuna\.[\w.]*\._\w|\b_CachedStorage\b|\._backend\b"
    r"|\b_create_scoped_session\b|\b_set_trial_attr_without_commit\b|\b_cached_frozen_trial\b"
    r"|\b_rank_population\b|\b_crowding_distance_sort\b|\b_is_constrained_optimization\b"
    r"|\b_get_generation_key\b|\b_get_parent_cache_key_prefix\b|\b_thread_lock\b"
    r"|\b_get_stale_trial_ids\b"
)
# The exceptions documented in compat's docstring: subclasses using their Optuna base's hooks.
# (sleb.py defines its own ``_get_generation_key`` so the generation pruner can read it like a GA's.)
ALLOWED = {
    "samplers/evop.py": {"_get_generation_key", "_get_parent_cache_key_prefix", "_thread_lock"},
    "samplers/sleb.py": {"_get_generation_key"},
    "heartbeat.py": {"_get_stale_trial_ids"},
}


def private_uses(package: Path) -> list[str]:
    """``file:line: text`` of each private Optuna use outside compat.py and the allowed ones."""
    hits = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = {m.group(0).lstrip(".") for m in PRIVATE.finditer(line)}
            if found - ALLOWED.get(name, set()):
                hits.append(f"{name}:{number}: {line.strip()}")
    return hits


def test_package_uses_optuna_private_api_only_through_compat() -> None:
    hits = private_uses(PACKAGE)
    assert not hits, "Optuna private API outside optuna_prune/search/compat.py (add a compat function):\n" + "\n".join(hits)


def test_private_uses_finds_a_planted_use(tmp_path: Path) -> None:
    (tmp_path / "samplers").mkdir()
    (tmp_path / "samplers" / "evop.py").write_text("x = self._thread_lock\ny = study._storage\n")
    (tmp_path / "compat.py").write_text("y = study._storage\n")
    (tmp_path / "a.py").write_text("from optuna.storages._heartbeat import BaseHeartbeat\n")
    assert private_uses(tmp_path) == [
        "a.py:1: from optuna.storages._heartbeat import BaseHeartbeat",
        "samplers/evop.py:2: y = study._storage",
    ]
