"""Where studies live: storage URLs, heartbeats, and the trials of workers that are gone.

Every storage optuna-prune opens records heartbeats (see :mod:`optuna_prune.run.heartbeat`), so a trial
whose process died or froze is failed with a reason and retried. This module finds such trials
(stale, orphaned or gone), refuses a second process on an SQLite study, and tells a worker when
another process has taken its trial.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_prune.outputs import OutputError, check_writable_folder
from optuna_prune.run.config import DEFAULT_STORAGE
from optuna_prune.run.heartbeat import (
    HeartbeatRDBStorage,
    LeasedJournalStorage,
    RetryStaleTrial,
    grace_of,
    stale_reason,
)
from optuna_prune.search import compat
from optuna_prune.search.record import CONFIG_ATTR, FAIL_REASON, LEASE_KEY, WORKER, trial_worker


class StorageError(ValueError):
    """The storage URL is malformed or the database cannot be reached."""


class ConcurrentSQLiteError(StorageError):
    """A second process tried to run a study stored in SQLite."""


def storage_file(url: str | None) -> Path | None:
    """The local file a storage URL names (an SQLite database or a journal), or None (a server, memory).

    Raises StorageError for a malformed URL.
    """
    url = url or DEFAULT_STORAGE
    if _is_journal(url):
        return Path(url).expanduser()
    try:
        parsed = sqlalchemy.engine.make_url(url)
        backend = parsed.get_backend_name()
    except (sqlalchemy.exc.ArgumentError, ValueError, TypeError):
        raise StorageError(
            f"storage URL {url!r} is malformed; use e.g. sqlite:///optuna_prune.db, "
            "postgresql://user@host:5432/db or a journal file path ending in .log"
        ) from None
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database).expanduser()
    return None


def _is_journal(url: str) -> bool:
    return url.endswith((".log", ".journal")) and "://" not in url


def open_storage(url: str | None, heartbeat: int = 20, create: bool = True) -> optuna.storages.BaseStorage:
    """An RDB storage or a journal file, both with heartbeats: killed workers' trials are failed and retried.

    A RUNNING trial whose process sent no heartbeat for ``3 * heartbeat`` seconds is failed with a
    ``fail_reason`` and re-queued with the same params (see :mod:`optuna_prune.run.heartbeat`). ``url``
    None is :data:`~optuna_prune.run.config.DEFAULT_STORAGE`.

    ``*.log`` / ``*.journal`` paths give a journal storage (many processes, no database server),
    whose heartbeats renew a lease on the trial. ``create=False`` (commands that only read a
    storage) refuses an SQLite or journal file that does not exist instead of creating an empty one.
    """
    url = url or DEFAULT_STORAGE
    path = storage_file(url)
    if path is not None:
        if path.is_dir():
            raise StorageError(f"storage {url!r} names the folder {path}; name a file, e.g. {path / 'optuna_prune.db'}")
        if not path.exists():
            if not create:
                raise StorageError(
                    f"no study database at {path} ({url}): the file does not exist; run optuna-prune search first, "
                    "or pass --storage with the URL your search used"
                )

            try:
                check_writable_folder(path.parent, f"storage {url!r}")
            except OutputError as exc:
                raise StorageError(str(exc)) from None
            path.parent.mkdir(parents=True, exist_ok=True)
    beats = dict(
        heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
        heartbeat_stale_trial_callback=RetryStaleTrial(),
    )
    if _is_journal(url):
        try:
            return LeasedJournalStorage(JournalFileBackend(str(path)), **beats)
        except OSError as exc:
            raise StorageError(f"cannot open journal {path}: {exc.strerror or exc}; check the path") from None
        except Exception as exc:  # the replay of a file that is not a journal fails in many ways
            raise StorageError(
                f"{path} is not an Optuna journal file ({type(exc).__name__}); pass a journal that "
                "optuna-prune wrote, or a new file name"
            ) from None
    shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    try:
        return HeartbeatRDBStorage(url, **beats)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {shown!r}: {first}; check the URL and that the database is up") from None


def refuse_concurrent_sqlite(study: optuna.Study) -> None:
    """Raise ConcurrentSQLiteError if another live process runs this SQLite study.

    SQLite ignores ``SELECT ... FOR UPDATE``, so two processes can pop the same enqueued trial and
    evaluate it twice. A process that is not gone (:func:`_gone`) and was active within the
    heartbeat grace period (a fresh heartbeat, a trial started or finished) may be running the
    study; it is if the study still changes a heartbeat interval later (a killed process's
    trials and heartbeats stand still). Cheap, not airtight: two processes starting together
    see nothing of each other.
    """
    storage = _beating_rdb(study)
    if storage is None or storage.engine.dialect.name != "sqlite":
        return
    grace = grace_of(storage)

    def snapshot() -> tuple[list[optuna.trial.FrozenTrial], dict[int, tuple[Any, float]]]:
        return storage.get_all_trials(compat.study_id(study)), _running_heartbeats(storage, compat.study_id(study))

    def active(t: optuna.trial.FrozenTrial) -> bool:
        if t.number in beats:
            return beats[t.number][1] <= grace
        last = t.datetime_complete or t.datetime_start  # local clock, as optuna writes them
        return last is not None and (datetime.now() - last).total_seconds() <= grace

    trials, beats = snapshot()
    suspects = [t for t in trials if active(t) and not _gone(trial_worker(t))]
    if not suspects:
        return
    time.sleep(storage.heartbeat_interval + 1.5)  # a live process records a newer heartbeat meanwhile
    later, later_beats = snapshot()
    changed = [t for t in later if t.number >= len(trials) or t.state != trials[t.number].state]
    if changed or {n: b for n, (b, _) in later_beats.items()} != {n: b for n, (b, _) in beats.items()}:
        workers = [w for t in changed + suspects if (w := trial_worker(t))]
        raise ConcurrentSQLiteError(
            f"study {study.study_name!r} in SQLite is being run by another process "
            f"(worker {workers[0] if workers else 'unknown'}); SQLite is for one process: "
            "use postgresql://... or a journal file (.log) for several workers"
        )


def fail_orphaned_trials(study: optuna.Study) -> None:
    """FAIL the RUNNING trials that never had a heartbeat and whose process is gone.

    Optuna fails a RUNNING trial once its heartbeat is stale, never one without any: a process
    killed between creating a trial and its sampler's first heartbeat leaves it RUNNING forever.
    In SQLite, after :func:`refuse_concurrent_sqlite` found no other live process, every such
    trial is an orphan; on a server or a journal file, one older than the grace period is (a live
    worker's sampler records a heartbeat right after creating the trial).
    """
    storage = _beating(study)
    if storage is None:
        return
    sqlite = isinstance(storage, RDBStorage) and storage.engine.dialect.name == "sqlite"
    grace = 0.0 if sqlite else grace_of(storage)
    beats = _last_heartbeats(study)
    now = datetime.now()  # local clock, as optuna writes datetime_start
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in beats or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > grace:
            compat.study_storage(study).set_trial_user_attr(
                compat.trial_id(t), FAIL_REASON, "orphaned: its process died before its first heartbeat"
            )
            compat.study_storage(study).set_trial_state_values(compat.trial_id(t), TrialState.FAIL)


def gone_trials(study: optuna.Study, grace: float | None = None) -> list[tuple[optuna.trial.FrozenTrial, str]]:
    """The RUNNING trials of ``study`` whose worker is gone, each with the ``fail_reason`` to record.

    A worker is gone when its heartbeat (on a journal file, its lease) is older than ``grace``
    seconds (default: the workers' grace period, 3 x the heartbeat the study's config recorded);
    when its trial never had a heartbeat and started longer than that ago; or when it is a process
    of this host that no longer exists (then at once, without waiting out the grace period; host
    names must tell the hosts apart). A trial of this very process is never gone. Works on every
    storage, with or without heartbeats.
    """
    if grace is None:
        heartbeat = (study.user_attrs.get(CONFIG_ATTR) or {}).get("heartbeat")
        backend = compat.unwrap_storage(compat.study_storage(study))
        if heartbeat:
            grace = 3.0 * heartbeat  # as open_storage gives the workers
        else:
            grace = grace_of(backend) if compat.is_heartbeat_enabled(backend) else 60.0  # open_storage's default
    beats = _last_heartbeats(study)
    me, now = f"{socket.gethostname()}:{os.getpid()}", datetime.now()
    gone = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial_worker(t)
        since, age = beats.get(t.number, (None, None))
        if worker != me and _gone(worker):
            last = "no heartbeat yet" if since is None else f"last heartbeat {since:%Y-%m-%d %H:%M:%S}"
            gone.append((t, f"worker {worker} gone: its process no longer exists ({last})"))
        elif age is not None and age > grace:
            gone.append((t, stale_reason(worker, since, age, grace)))
        elif age is None and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace:
            gone.append((t, f"orphaned: no heartbeat in the {(now - t.datetime_start).total_seconds():.0f} s "
                            f"since it started (grace period {grace:.0f} s)"))
    return gone


def fail_gone_trials(
    study: optuna.Study, gone: list[tuple[optuna.trial.FrozenTrial, str]] | None = None
) -> list[optuna.trial.FrozenTrial]:
    """FAIL the trials of gone workers (:func:`gone_trials`, or ``gone``) with their reasons, and
    re-queue each the way a stale heartbeat's trial is (same params and system attrs, so the same
    mask and generation). A trial that finished meanwhile is left alone. Returns the failed trials.
    """
    storage = compat.study_storage(study)
    backend = compat.unwrap_storage(storage)
    retry = (backend.get_heartbeat_stale_trial_callback() if compat.is_heartbeat_enabled(backend) else None) or RetryStaleTrial()
    failed = []
    for trial, reason in gone_trials(study) if gone is None else gone:
        try:
            storage.set_trial_user_attr(compat.trial_id(trial), FAIL_REASON, reason)
            if not storage.set_trial_state_values(compat.trial_id(trial), TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # its worker was alive after all, or another process failed it
            continue
        frozen = storage.get_trial(compat.trial_id(trial))
        retry(study, frozen)
        failed.append(frozen)
    return failed


def _beating(study: optuna.Study) -> Any:
    """The study's storage (unwrapped from optuna's cache) if it records heartbeats, else None."""
    storage = compat.unwrap_storage(compat.study_storage(study))
    return storage if compat.is_heartbeat_enabled(storage) else None


def _beating_rdb(study: optuna.Study) -> RDBStorage | None:
    """The study's RDB storage (unwrapped from optuna's cache) if it records heartbeats, else None."""
    storage = _beating(study)
    return storage if isinstance(storage, RDBStorage) else None


def _last_heartbeats(study: optuna.Study) -> dict[int, tuple[datetime, float]]:
    """Trial number -> (last heartbeat, its age in seconds) of the study's RUNNING trials that had one.

    On RDB, both come from the database server's clock (as optuna's stale check); on a journal
    file, the lease holds the renewing process's wall-clock time, compared with this one's.
    """
    storage = compat.unwrap_storage(compat.study_storage(study))
    if isinstance(storage, RDBStorage):
        return _running_heartbeats(storage, compat.study_id(study))
    now, beats = time.time(), {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lease = t.system_attrs.get(LEASE_KEY)
        if lease is not None:
            beats[t.number] = (datetime.fromtimestamp(lease), now - lease)
    return beats


def _running_heartbeats(storage: RDBStorage, study_id: int) -> dict[int, tuple[Any, float]]:
    """Trial number -> (last heartbeat, its age in seconds) of the study's RUNNING trials."""
    models = compat.rdb_models()
    trial, beat = models.TrialModel, models.TrialHeartbeatModel
    query = (
        sqlalchemy.select(trial.number, beat.heartbeat)
        .join(beat, beat.trial_id == trial.trial_id)
        .where(trial.study_id == study_id, trial.state == TrialState.RUNNING)
    )
    with storage.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
        now = now.replace(tzinfo=None)  # as optuna does: PostgreSQL's now() carries a zone
        return {n: (b, (now - b).total_seconds()) for n, b in conn.execute(query)}


def _gone(worker: str | None) -> bool:
    """True for this process, or a process of this host that no longer exists (``host:pid``)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class TrialTaken(BaseException):
    """This worker's trial was finished by another process while the objective ran: failed and
    re-queued because this worker was frozen (paused, swapped out, suspended) past the heartbeat
    grace period, so its heartbeat went stale.

    A BaseException, as KeyboardInterrupt is, so that optuna's trial loop lets it through without
    telling the trial: the trial is finished already, and its retry belongs to whoever runs it.
    """

    def __init__(self, trial: optuna.trial.FrozenTrial) -> None:
        super().__init__(f"trial {trial.number} is {trial.state.name}: another process finished it")
        self.trial = trial


class OwnTrials:
    """The objective, except that a trial another process finished meanwhile raises TrialTaken;
    counts the trials this process started (``started``)."""

    def __init__(self, objective: Callable[[optuna.Trial], Any]) -> None:
        self.objective = objective
        self.started = 0
        self.current: optuna.Trial | None = None

    def __call__(self, trial: optuna.Trial) -> Any:
        self.started += 1
        self.current = trial
        try:
            result = self.objective(trial)
        except Exception as exc:  # TrialPruned too; a write to the finished trial raises UpdateFinishedTrialError
            self._check(trial, exc)
            raise
        self._check(trial)
        return result

    @staticmethod
    def _check(trial: optuna.Trial, cause: BaseException | None = None) -> None:
        stored = compat.study_storage(trial.study).get_trial(compat.trial_id(trial))
        if stored.state.is_finished():
            raise TrialTaken(stored) from cause


def taken_trial(study: optuna.Study, exc: BaseException, own: OwnTrials) -> optuna.trial.FrozenTrial | None:
    """The trial of this process that ``exc`` (raised by ``study.optimize``) says another process
    finished, else None.

    Taken in the objective: TrialTaken. Taken while the sampler proposed its mask: the sampler's
    next write raises UpdateFinishedTrialError out of ``study.ask`` (the trial never reached the
    objective, so it is counted here). Taken between the objective's end and optuna's tell: the
    tell raises UpdateFinishedTrialError or "Cannot tell a FAIL trial", which optuna's cleanup may
    replace with an AssertionError of its own (the original is its ``__context__``).
    """
    while exc is not None:
        if isinstance(exc, TrialTaken):
            return exc.trial
        if isinstance(exc, UpdateFinishedTrialError) and (found := re.search(r"Trial#(\d+)", str(exc))):
            trial_id = compat.study_storage(study).get_trial_id_from_study_id_trial_number(compat.study_id(study), int(found[1]))
            trial = compat.study_storage(study).get_trial(trial_id)
            if not trial.state.is_finished():
                return None
            if own.current is None or compat.trial_id(own.current) != trial_id:
                own.started += 1
            return trial
        if isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a ") and own.current is not None:
            trial = compat.study_storage(study).get_trial(compat.trial_id(own.current))
            return trial if trial.state.is_finished() else None
        exc = exc.__context__
    return None


def interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is Ctrl-C, or an error raised while Ctrl-C unwound optuna (whose cleanup can
    fail on an interrupted storage call, e.g. an UnboundLocalError in ``_run_trial``)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False


def fail_own_running_trials(study: optuna.Study) -> None:
    """FAIL this process's RUNNING trials after Ctrl-C.

    Optuna fails the trial whose objective was interrupted, but Ctrl-C between two of its storage
    calls leaves the trial RUNNING, and other workers would wait for it until its heartbeat is stale.
    """
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial_worker(t) == WORKER:
            compat.study_storage(study).set_trial_state_values(compat.trial_id(t), TrialState.FAIL)
