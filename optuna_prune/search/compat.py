"""The one door to Optuna's private API: every private module and attribute the package uses.

Optuna keeps a study's storage and ids, a trial's id, the RDB models, the heartbeat helpers and
the GA/NSGA-II helpers private, and may change them in any release. Reading them only here means
an upgrade breaks one file, and ``tests/test_compat.py`` names what changed and which function
here needs updating. Optuna + stdlib only (the search floor): sqlalchemy is imported only by the
RDB helpers, when a study actually uses RDB storage.

What the package relies on:

- ``Study._storage``, ``Study._study_id``, ``Trial._trial_id`` / ``FrozenTrial._trial_id``:
  :func:`study_storage`, :func:`study_id`, :func:`trial_id`.
- ``optuna.storages._cached_storage._CachedStorage`` with ``_backend``, ``_lock``,
  ``_trial_id_to_study_id_and_number`` and ``_studies[...].param_distribution``:
  :func:`unwrap_storage`, :func:`cached_storage`, :func:`cache_lock`, :func:`known_distributions`.
- ``optuna.storages._rdb.models`` (``TrialModel``, ``TrialParamModel``,
  ``TrialSystemAttributeModel``, ``TrialHeartbeatModel``, ``MAX_INDEXED_STRING_LENGTH``),
  ``optuna.storages._rdb.storage._create_scoped_session`` and
  ``RDBStorage._set_trial_attr_without_commit``: :func:`rdb_models`, :func:`scoped_session`,
  :func:`set_trial_attr_without_commit`.
- ``optuna.storages._heartbeat``: :func:`is_heartbeat_enabled`, :data:`BaseHeartbeat`.
- ``optuna.samplers._lazy_random_state.LazyRandomState``: :data:`LazyRandomState`.
- ``optuna.samplers._ga.BaseGASampler`` and its classmethods ``_get_generation_key`` /
  ``_get_parent_cache_key_prefix``: :data:`BaseGASampler`, :func:`generation_key`,
  :func:`parent_cache_key_prefix`, :func:`keeps_parents`.
- ``optuna.samplers.nsgaii._elite_population_selection_strategy`` (``_rank_population``,
  ``_crowding_distance_sort``) and ``optuna.study._constrained_optimization
  ._is_constrained_optimization``: :func:`rank_population`, :func:`crowding_distance_sort`,
  :func:`is_constrained_optimization`.
- The logger name ``optuna.study._optimize`` (where Optuna logs each trial's end):
  :data:`OPTIMIZE_LOGGER`.
- ``Trial._suggest`` storing each param through the public ``trial.storage``'s
  ``set_trial_param`` (``samplers/batched_writes.one_write_for_params`` swaps in a buffer).

Exceptions, where subclassing an Optuna class means using its private hooks directly:

- ``samplers/evop.py`` (``EvoPSampler(BaseGASampler)``): calls ``self._get_generation_key()`` /
  ``self._get_parent_cache_key_prefix()`` and sets ``self._thread_lock`` (BaseGASampler's lock).
- ``heartbeat.py``: overrides ``_get_stale_trial_ids`` (``RDBStorage`` and ``BaseHeartbeat``;
  ``HeartbeatRDBStorage`` also calls ``super()._get_stale_trial_ids``).
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from optuna.samplers._ga import BaseGASampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.samplers.nsgaii._elite_population_selection_strategy import (
    _crowding_distance_sort,
    _rank_population,
)
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.study import Study
from optuna.study._constrained_optimization import _is_constrained_optimization
from optuna.trial import BaseTrial, FrozenTrial

if TYPE_CHECKING:
    import threading

    from optuna.distributions import BaseDistribution

__all__ = [
    "OPTIMIZE_LOGGER",
    "BaseGASampler",
    "BaseHeartbeat",
    "LazyRandomState",
    "cache_lock",
    "cached_storage",
    "crowding_distance_sort",
    "generation_key",
    "is_constrained_optimization",
    "is_heartbeat_enabled",
    "keeps_parents",
    "known_distributions",
    "parent_cache_key_prefix",
    "rank_population",
    "rdb_models",
    "scoped_session",
    "set_trial_attr_without_commit",
    "study_id",
    "study_storage",
    "trial_id",
    "unwrap_storage",
]

OPTIMIZE_LOGGER = "optuna.study._optimize"
"""The logger Optuna reports each finished trial on (``Study.optimize``'s private module)."""

rank_population = _rank_population
crowding_distance_sort = _crowding_distance_sort
is_constrained_optimization = _is_constrained_optimization


def study_storage(study: Study) -> BaseStorage:
    """The storage a study reads and writes (Optuna offers no public accessor)."""
    return study._storage


def study_id(study: Study) -> int:
    """The study's id in its storage: every storage call takes it."""
    return study._study_id


def trial_id(trial: BaseTrial | FrozenTrial) -> int:
    """The trial's id in its storage (a live or frozen trial): every storage call takes it."""
    return trial._trial_id  # type: ignore[union-attr]


def cached_storage(storage: BaseStorage) -> _CachedStorage | None:
    """Optuna's private cache that wraps RDB storage, when ``storage`` is one."""
    return storage if isinstance(storage, _CachedStorage) else None


def unwrap_storage(storage: BaseStorage) -> BaseStorage:
    """The storage that ``storage`` stands for: optuna wraps RDB storage in a private cache.

    (Only that cache is unwrapped: a journal storage's ``_backend`` is its log file, not a storage.)
    """
    cached = cached_storage(storage)
    return cached._backend if cached is not None else storage


def cache_lock(cached: _CachedStorage | None) -> threading.Lock | contextlib.nullcontext[None]:
    """The cache's lock, held by its own writes (a no-op context without a cache)."""
    return cached._lock if cached is not None else contextlib.nullcontext()


def known_distributions(cached: _CachedStorage, trial_id: int) -> dict[str, BaseDistribution]:
    """The distributions the cache knows for the trial's study (live dict; empty if uncached)."""
    if trial_id not in cached._trial_id_to_study_id_and_number:
        return {}
    study_id, _ = cached._trial_id_to_study_id_and_number[trial_id]
    return cached._studies[study_id].param_distribution


def rdb_models() -> ModuleType:
    """Optuna's SQLAlchemy models, imported on first use."""
    from optuna.storages._rdb import (
        models,  # deferred: loads sqlalchemy, which only RDB storage needs
    )

    return models


def scoped_session(backend: RDBStorage) -> contextlib.AbstractContextManager[Any]:
    """One session that commits on leaving, as Optuna's own RDB writes use."""
    return _create_scoped_session(backend.scoped_session)


def set_trial_attr_without_commit(
    backend: RDBStorage, session: Any, model: type, trial_id: int, key: str, value: Any
) -> None:
    """Writes one trial attr row in ``session`` without committing it."""
    backend._set_trial_attr_without_commit(session, model, trial_id, key, value)


def generation_key(sampler: BaseGASampler | type[BaseGASampler]) -> str:
    """The trial system attr a GA sampler stores each trial's generation under."""
    return sampler._get_generation_key()


def parent_cache_key_prefix(sampler: BaseGASampler | type[BaseGASampler]) -> str:
    """The study system attr prefix a GA sampler caches each generation's parents under."""
    return sampler._get_parent_cache_key_prefix()


def keeps_parents(sampler: object) -> bool:
    """Whether a sampler (or sampler class) caches parents as a GA sampler does (SLEB does not)."""
    return hasattr(sampler, "_get_parent_cache_key_prefix")
