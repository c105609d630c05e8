"""Many writes to one trial in one storage transaction: the door to Optuna's RDB internals.

Optuna's RDB storage commits every trial param and system attr on its own. A commit costs
milliseconds on SQLite (a file sync), so an exact-k mask of n params plus a sampler's half-dozen
attrs made a cheap objective some 150 times slower on SQLite than in memory. Here each group is
one commit; every other storage (in memory, journal, gRPC) gets the same calls one by one. The
RDB storage's private parts it writes through are reached via :mod:`optuna_prune.search.compat`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
    json_to_distribution,
)
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import Trial

from optuna_prune.search import compat

Param = tuple[str, float, BaseDistribution]
"""A param as storage keeps it: name, value in the distribution's internal repr, distribution."""


def set_trial_system_attrs(
    storage: BaseStorage, trial_id: int, attrs: Mapping[str, Any]
) -> None:
    """``storage.set_trial_system_attr`` for every item, in one transaction on RDB storage."""
    backend = compat.unwrap_storage(storage)
    if len(attrs) < 2 or not isinstance(backend, RDBStorage):
        for key, value in attrs.items():
            storage.set_trial_system_attr(trial_id, key, value)
        return
    models = compat.rdb_models()
    with compat.scoped_session(backend) as session:
        for key, value in attrs.items():
            compat.set_trial_attr_without_commit(
                backend, session, models.TrialSystemAttributeModel, trial_id, key, value
            )


def set_trial_params(storage: BaseStorage, trial_id: int, params: Sequence[Param]) -> None:
    """``storage.set_trial_param`` for every param, in one transaction on RDB storage.

    Checks what Optuna checks: the trial is still running, and each distribution agrees with
    the one the study already has under that name.
    """
    backend = compat.unwrap_storage(storage)
    if len(params) < 2 or not isinstance(backend, RDBStorage):
        for name, value, distribution in params:
            storage.set_trial_param(trial_id, name, value, distribution)
        return
    # Hold the cache's lock and update its known distributions as the cache's own set_trial_param
    # does: then no second query per param is needed, and threads cannot disagree on one.
    cached = compat.cached_storage(storage)
    with compat.cache_lock(cached):
        known = compat.known_distributions(cached, trial_id) if cached is not None else {}
        _insert_params(backend, trial_id, params, known)


def _insert_params(
    backend: RDBStorage, trial_id: int, params: Sequence[Param], known: dict[str, BaseDistribution]
) -> None:
    models = compat.rdb_models()
    with compat.scoped_session(backend) as session:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
        backend.check_trial_is_updatable(trial_id, trial.state)
        for name, value, distribution in params:
            previous = known.get(name)
            if previous is None:  # the first time this process sees the name: ask the study
                record = (
                    session.query(models.TrialParamModel)
                    .join(models.TrialModel)
                    .filter(models.TrialModel.study_id == trial.study_id)
                    .filter(models.TrialParamModel.param_name == name)
                    .first()
                )
                if record is not None:
                    previous = json_to_distribution(record.distribution_json)
            if previous is not None:
                check_distribution_compatibility(previous, distribution)
            session.add(
                models.TrialParamModel(
                    trial_id=trial_id,
                    param_name=name,
                    param_value=value,
                    distribution_json=distribution_to_json(distribution),
                )
            )
    for name, _, distribution in params:  # committed: later writes may skip the query
        known.setdefault(name, distribution)


class _ParamBuffer:
    """A trial's storage that keeps ``set_trial_param`` calls back; all else goes through."""

    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage
        self.params: list[Param] = []

    def set_trial_param(
        self, trial_id: int, name: str, value: float, distribution: BaseDistribution
    ) -> None:
        self.params.append((name, value, distribution))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)


@contextlib.contextmanager
def one_write_for_params(trial: Any) -> Iterator[None]:
    """Suggest many params of a live ``optuna.Trial`` and store them in one transaction.

    ``Trial._suggest`` samples, checks and caches each value as usual (so the objective and the
    sampler see it at once) and stores it through ``trial.storage``, which buffers here until
    the block ends. Params suggested before an error in the block are stored too, as they would
    be one by one. Other trials (frozen, fixed) suggest as usual.
    """
    if not isinstance(trial, Trial):
        yield
        return
    storage = trial.storage
    buffer = _ParamBuffer(storage)
    trial.storage = buffer
    try:
        yield
    except BaseException:
        trial.storage = storage
        with contextlib.suppress(Exception):  # keep the original error
            set_trial_params(storage, compat.trial_id(trial), buffer.params)
        raise
    trial.storage = storage
    set_trial_params(storage, compat.trial_id(trial), buffer.params)
