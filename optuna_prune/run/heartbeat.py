"""Heartbeats on every shared storage: a dead or frozen worker's trial is failed, says why, and is retried.

Optuna's heartbeat mechanism: while a trial runs, a thread of its process records a heartbeat
every ``heartbeat_interval`` seconds; any process that checks (``optuna.storages.fail_stale_trials``,
which optuna runs before every trial and the samplers and ``MethodBudget`` run while they wait)
fails a RUNNING trial whose heartbeat is older than ``grace_period`` and hands it to the storage's
``heartbeat_stale_trial_callback``, here :class:`RetryStaleTrial`: the same params and system
attrs re-queued as a WAITING trial, so the same mask in the same generation. Two gaps are filled:

- RDB storage fails the trial without a word. :class:`HeartbeatRDBStorage` writes the trial's
  ``fail_reason`` ("heartbeat stale: worker HOST:PID gone since T ...") just before optuna fails it.
- Journal storage has no heartbeats, so a killed worker's trial stayed RUNNING and every other
  worker waited for it forever. :class:`LeasedJournalStorage` implements optuna's heartbeat
  interface on a journal: a heartbeat renews the trial's lease, the system attr ``LEASE_KEY``
  holding the wall-clock time of the renewal, and a trial whose lease is older than the grace
  period is stale. Optuna's own heartbeat thread, stale check and callback then work unchanged.
  Leases compare the clocks of the processes that share the file: hosts sharing one journal file
  need synchronised clocks (NTP), as they would for any lease.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.search import compat
from optuna_prune.search.record import FAIL_REASON, LEASE_KEY, WORKER_ATTR, trial_worker

MAX_RETRY = 2  # a candidate whose worker died three times is left FAIL


def stale_reason(worker: str | None, since: datetime, age: float, grace: float) -> str:
    """The ``fail_reason`` of a trial failed for a stale heartbeat."""
    return (
        f"heartbeat stale: worker {worker or 'unknown'} gone since {since:%Y-%m-%d %H:%M:%S} "
        f"(no heartbeat for {age:.0f} s, grace period {grace:.0f} s)"
    )


def grace_of(storage: Any) -> float:
    """Seconds without a heartbeat after which a RUNNING trial counts as dead (optuna's rule)."""
    return storage.grace_period or 2 * storage.heartbeat_interval


def _mark(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Write ``reason`` on a RUNNING trial about to be failed; False if it finished meanwhile."""
    try:
        storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
    except UpdateFinishedTrialError:  # its worker finished it, or another one failed it first
        return False
    return True


class RetryStaleTrial:
    """optuna's ``RetryHeartbeatStaleTrialCallback`` (same params, system and user attrs, so the same
    mask and generation), without what belonged to the failed attempt: its ``fail_reason`` (the
    retry is a fresh attempt), its ``worker`` (the dead one; the next owner's objective records
    itself) and its journal lease (an inherited lease would make the retry look stale the moment
    a worker picks it up, before its first renewal)."""

    def __init__(self, max_retry: int | None = MAX_RETRY) -> None:
        self.max_retry = max_retry
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (FAIL_REASON, WORKER_ATTR)}
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != LEASE_KEY}
        self._retry(study, trial)


class HeartbeatRDBStorage(RDBStorage):
    """RDB storage whose stale trials carry a ``fail_reason`` naming the worker and its last heartbeat.

    Optuna asks ``_get_stale_trial_ids`` for the trials it is about to fail; the reason is written
    here, while they are still RUNNING (a finished trial can no longer take attrs).
    """

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        if not stale:
            return stale
        beat = compat.rdb_models().TrialHeartbeatModel
        with self.engine.connect() as conn:
            now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
            now = now.replace(tzinfo=None)  # as optuna does: PostgreSQL's now() carries a zone
            beats = dict(conn.execute(
                sqlalchemy.select(beat.trial_id, beat.heartbeat).where(beat.trial_id.in_(stale))
            ).all())
        grace = grace_of(self)
        marked = []
        for trial_id in stale:
            since = beats.get(trial_id, now)
            worker = trial_worker(self.get_trial(trial_id))
            if _mark(self, trial_id, stale_reason(worker, since, (now - since).total_seconds(), grace)):
                marked.append(trial_id)
        return marked


class LeasedJournalStorage(JournalStorage, compat.BaseHeartbeat):
    """A journal storage with optuna's heartbeats: each heartbeat renews the trial's lease.

    ``heartbeat_interval``, ``grace_period`` and ``heartbeat_stale_trial_callback`` mean what they
    mean for :class:`optuna.storages.RDBStorage`. A trial that never had a lease is never stale
    (as on RDB, where a trial without a heartbeat never is): ``storage.fail_orphaned_trials`` handles
    those. Renewals closer together than half an interval are skipped, so a sampler that beats
    while it polls (every 0.5 s) does not grow the file faster than the heartbeat thread does.
    """

    def __init__(
        self,
        log_storage: BaseJournalBackend,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("The value of `heartbeat_interval` should be a positive integer.")
        if grace_period is not None and grace_period <= 0:
            raise ValueError("The value of `grace_period` should be a positive integer.")
        super().__init__(log_storage)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback
        self._renewed: dict[int, float] = {}  # trial id -> time.monotonic() of this process's last renewal

    def record_heartbeat(self, trial_id: int) -> None:
        now = time.monotonic()
        if now - self._renewed.get(trial_id, -float("inf")) < (self.heartbeat_interval or 0) / 2:
            return
        # A trial finished by another worker meanwhile (this one was frozen): nothing to renew. The
        # heartbeat thread must not die of it; the trial's next write tells its worker.
        with contextlib.suppress(UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, LEASE_KEY, time.time())
        self._renewed[trial_id] = now

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace, now, stale = grace_of(self), time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            lease = t.system_attrs.get(LEASE_KEY)
            if lease is None or now - lease <= grace:
                continue
            reason = stale_reason(trial_worker(t), datetime.fromtimestamp(lease), now - lease, grace)
            if _mark(self, compat.trial_id(t), reason):
                stale.append(compat.trial_id(t))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback
