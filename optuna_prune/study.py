"""Studies that persist and resume: storage, the problem a study is bound to, and running a search.

A study is one pruning problem (model, k, calibration set, fitness). Every method's trials live in
it, tagged with a ``method``, so the dashboard and the figures compare them on one axis. Re-running
the same command resumes: finished trials are kept, the evolution continues from storage.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_prune import __version__
from optuna_prune.config import DEFAULT_STORAGE, ConfigError, SearchConfig
from optuna_prune.heartbeat import (
    FAIL_REASON,
    LEASE_KEY,
    HeartbeatRDBStorage,
    LeasedJournalStorage,
    RetryStaleTrial,
    grace_of,
    stale_reason,
)
from optuna_prune.methods import missing_run, missing_run_error, seed_methods, space_of
from optuna_prune.samplers import trial_mask
from optuna_prune.samplers.base import storage_backend
from optuna_prune.space import (
    METHOD_KEY,
    LayerMaskSpace,
    SpaceError,
)

_logger = logging.getLogger(__name__)
log = logging.getLogger("optuna_prune.plan")  # what a search is about to do (the CLI shows it)

PROBLEM_ATTR = "problem"
# The parts of a problem a resumed study must share with the one that created it.
PROBLEM_KEYS = (
    "model", "num_layers", "num_drop", "calibration", "validation_samples", "calibration_sha256",
    "fitness", "objective_mode", "ccds_clusters", "space",
)
# What a problem that does not record a key means (studies made before the key existed).
PROBLEM_DEFAULTS = {"validation_samples": 0}


class StorageError(ValueError):
    """The storage URL is malformed or the database cannot be reached."""


class StudyMismatchError(ValueError):
    """A study is being resumed with a different model, sparsity, calibration or fitness."""


class ConcurrentSQLiteError(StorageError):
    """A second process tried to run a study stored in SQLite."""


class BudgetReached(RuntimeError):
    """A trial started while other workers' trials already filled the method's budget."""


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
    ``fail_reason`` and re-queued with the same params (see :mod:`optuna_prune.heartbeat`). ``url``
    None is :data:`~optuna_prune.config.DEFAULT_STORAGE`.

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
            from optuna_prune.outputs import OutputError, check_writable_folder

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


def problem_of(cfg: SearchConfig, model_id: str, num_layers: int, num_drop: int, calibration: Any) -> dict[str, Any]:
    """What a study is bound to (checked on resume) plus what reproduces it (recorded only)."""
    problem = {
        "model": model_id,
        "num_layers": num_layers,
        "num_drop": num_drop,
        "sparsity": round(num_drop / num_layers, 4),
        "calibration": calibration.source,
        "calibration_sha256": calibration.sha256,
        "n_samples": calibration.n_samples,
        "seq_len": calibration.seq_len,
        "ccds_clusters": cfg.ccds_clusters,
        "fitness": cfg.fitness,
        "objective_mode": cfg.objective_mode,
        "seed": cfg.seed,
    }
    if cfg.validation_samples:  # the last windows of the draw are held out of the search (final_pick)
        problem["validation_samples"] = cfg.validation_samples
    if cfg.space == "rates":  # num_drop counts MLP-width units of 1/rate_resolution over all layers
        problem.update(space="rates", rate_resolution=cfg.rate_resolution,
                       sparsity=round(num_drop / (num_layers * cfg.rate_resolution), 4))
    if cfg.space == "sublayers":  # num_drop counts attention and MLP blocks, 2 per layer
        problem.update(space="sublayers", sparsity=round(num_drop / (2 * num_layers), 4))
    return problem



def metric_names(problem: dict[str, Any]) -> list[str]:
    """What each objective of a study is, for the dashboard's axes (instead of "Objective 0")."""
    what = "KL to the dense model" if problem.get("fitness") == "kl" else "calibration NLL"
    mode = problem.get("objective_mode", "mean")
    if mode == "clusters":
        return [f"cluster {c} {what}" for c in range(int(problem["ccds_clusters"]))]
    return [f"worst-cluster {what}" if mode == "worst" else what]


def name_metrics(study: optuna.Study) -> None:
    """Name the objectives of an optuna-prune study that has no names yet (made by an older version)."""
    problem = study.user_attrs.get(PROBLEM_ATTR)
    if problem is None or study.metric_names is not None:
        return
    names = metric_names(problem)
    if len(names) == len(study.directions):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(names)


def default_study_name(problem: dict[str, Any]) -> str:
    """A name derived from the problem, so that re-running the same command resumes the same study."""
    model = Path(str(problem["model"])).name or str(problem["model"])
    calib = Path(str(problem["calibration"])).stem
    ccds = f"-ccds{problem['ccds_clusters']}" if problem["ccds_clusters"] else ""
    kind = {"rates": "rates", "sublayers": "blocks"}.get(problem.get("space"), "drop")
    per_layer = {"rates": problem.get("rate_resolution", 1), "sublayers": 2}.get(problem.get("space"), 1)
    units = problem["num_layers"] * per_layer
    return f"{model}-{kind}{problem['num_drop']}of{units}-{calib}{ccds}-{problem['fitness']}"


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "optuna_prune": __version__, "optuna": optuna.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    problem: dict[str, Any],
    directions: list[str],
    sampler: optuna.samplers.BaseSampler | None = None,
    new_study: bool = False,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create the study, or load it after checking it was made for the same problem.

    ``new_study`` never deletes anything: it picks the first free name ``NAME-2``, ``NAME-3``...
    """
    return _open_or_create(storage, name, problem, directions, sampler, new_study, pruner)[0]


def free_study_name(storage: optuna.storages.BaseStorage, name: str, new_study: bool = False) -> str:
    """``name``, or with ``new_study`` the first of ``NAME``, ``NAME-2``, ``NAME-3``... not in ``storage``."""
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    base, n = name, 2
    while new_study and name in existing:
        name, n = f"{base}-{n}", n + 1
    return name


def _open_or_create(
    storage: optuna.storages.BaseStorage,
    name: str,
    problem: dict[str, Any],
    directions: list[str],
    sampler: optuna.samplers.BaseSampler | None = None,
    new_study: bool = False,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool]:
    """:func:`open_study`, and whether this call created the study."""
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    base, name = name, free_study_name(storage, name, new_study)
    if name not in existing:
        check_study_name(name)
        try:
            study = optuna.create_study(
                study_name=name, storage=storage, sampler=sampler, pruner=pruner, directions=directions
            )
        except optuna.exceptions.DuplicatedStudyError:  # a process started with this one made it
            if new_study:
                return _open_or_create(storage, base, problem, directions, sampler, new_study, pruner)
        else:
            study.set_user_attr(PROBLEM_ATTR, problem)
            study.set_user_attr("versions", versions())
            name_metrics(study)
            return study, True
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    check_problem(study, problem)
    name_metrics(study)
    refuse_concurrent_sqlite(study)
    fail_orphaned_trials(study)
    return study, False


def check_study_name(name: str) -> None:
    """ConfigError unless ``name`` fits every storage (RDB storages index 512 characters)."""
    if not name.strip() or len(name) > rdb_models.MAX_INDEXED_STRING_LENGTH:
        raise ConfigError(
            f"study name of {len(name)} characters {name[:40]!r}{'...' if len(name) > 40 else ''} is "
            f"{'empty' if not name.strip() else 'too long'}; pass a --study name of 1 to "
            f"{rdb_models.MAX_INDEXED_STRING_LENGTH} characters"
        )


def require_problem(study: optuna.Study, wait: float = 5.0, fix: str | None = None) -> dict[str, Any]:
    """The problem ``study`` records, or StudyMismatchError if optuna-prune did not make it.

    A study without trials may have been created a moment ago by a process started with this
    one, which records the problem right after: wait up to ``wait`` seconds for it.
    """
    deadline = time.monotonic() + wait
    while (stored := study.user_attrs.get(PROBLEM_ATTR)) is None and time.monotonic() < deadline:
        if study.get_trials(deepcopy=False):
            break
        time.sleep(0.1)
    if stored is None:
        raise StudyMismatchError(
            f"study {study.study_name!r} was not created by optuna-prune (it records no problem); "
            + (fix or "pass a study that optuna-prune search or create made (optuna-prune studies lists them)")
        )
    return stored


def check_problem(study: optuna.Study, problem: dict[str, Any], wait: float = 5.0,
                  keys: tuple[str, ...] = PROBLEM_KEYS) -> None:
    """Raise StudyMismatchError unless ``study`` was made for ``problem`` (compared on ``keys``).

    A study without trials may have been created a moment ago by a process started with this
    one, which records the problem right after: wait up to ``wait`` seconds for it.
    """
    stored = require_problem(study, wait, fix="use another --study name")
    for key in keys:
        was, now = (p.get(key, PROBLEM_DEFAULTS.get(key)) for p in (stored, problem))
        if was != now:
            raise StudyMismatchError(
                f"study {study.study_name!r} was created with {key}={was!r}, not "
                f"{now!r}; resume with the same settings, or pass --new-study or another --study"
            )


def check_resume(cfg: SearchConfig, study: optuna.Study, sampler: optuna.samplers.BaseSampler) -> None:
    """Refuse, writing nothing, a resume the study would reject once trials run: a sampler set up
    unlike the run that started its method in the study (e.g. another --population), or seeds
    from a SLEB run the study does not have."""
    check = getattr(sampler, "check_resume", None)
    if check is not None:
        check(study)
    if (missing := missing_run(cfg, study)) is not None:
        raise missing_run_error(missing, study.study_name)


def method_trials(study: optuna.Study, method: str, states: tuple[TrialState, ...] | None = None) -> list[optuna.trial.FrozenTrial]:
    """Trials that ``method`` proposed (tagged by its sampler, or by the objective as user attr)."""
    return [
        t for t in study.get_trials(deepcopy=False, states=states)
        if t.system_attrs.get(METHOD_KEY, t.user_attrs.get("method")) == method
    ]


_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # a method's evaluations
_COUNTED = (*_FINISHED, TrialState.RUNNING)


@dataclass
class MethodBudget:
    """Stop the study once ``method`` has ``n_trials`` finished trials, exactly, across all workers.

    A worker starts no trial while running ones would fill the budget: it waits, since one of them
    may still fail (a killed worker's, after its heartbeat grace period) and need a replacement.
    Two workers that start a trial at the same moment are settled by trial number: the later one
    is not evaluated (:meth:`guard`) and recorded FAIL, so it counts nowhere.
    """

    method: str
    n_trials: int
    poll_interval: float = 0.5

    def done(self, study: optuna.Study) -> int:
        return len(method_trials(study, self.method, _FINISHED))

    def has_room(self, study: optuna.Study) -> bool:
        """False once the budget is reached; True as soon as one more trial fits beside the running ones."""
        while True:
            counted = method_trials(study, self.method, _COUNTED)
            done = sum(t.state != TrialState.RUNNING for t in counted)
            if done >= self.n_trials:
                return False
            if len(counted) < self.n_trials:
                return True
            if not is_heartbeat_enabled(study._storage):
                return False  # dead workers cannot be told from slow ones: leave the rest to them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            time.sleep(self.poll_interval)

    def admits(self, study: optuna.Study, trial: optuna.trial.BaseTrial) -> bool:
        """Whether fewer than ``n_trials`` earlier trials of the method are finished or running."""
        earlier = [t for t in method_trials(study, self.method, _COUNTED) if t.number < trial.number]
        return len(earlier) < self.n_trials

    def guard(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        """``objective``, except for a trial beyond the budget: FAIL with a reason, not evaluated."""

        def run(trial: optuna.Trial) -> Any:
            if not self.admits(trial.study, trial):
                reason = f"not evaluated: other workers' trials fill the {self.method} budget of {self.n_trials}"
                trial.set_user_attr("fail_reason", reason)
                raise BudgetReached(reason)
            return objective(trial)

        return run

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.has_room(study):
            study.stop()


class SearchProgress:
    """An ``optimize`` callback that shows a method's progress: evaluations done of its budget (all
    workers' finished trials, as :class:`MethodBudget` counts them), the best loss so far, elapsed
    time and the time left. The total is the budget, or what a self-stopping method (SLEB,
    exhaustive) plans; without either (a timeout only) the bar counts without an estimate.

    Reading every trial after each one would cost a storage scan per trial, so this process's own
    trials are counted as they finish and the study is recounted every ``recount`` seconds.
    """

    def __init__(self, study: optuna.Study, method: str, total: int | None, enabled: bool = True,
                 perplexity: bool = False, recount: float = 5.0) -> None:
        from optuna_prune.progress import progress_bar

        self.method = method
        self.perplexity = perplexity
        self.recount = recount
        self.bar = progress_bar(total, method, "eval", enabled=enabled)
        self.done = self.failed = 0
        self.best: float | None = None
        self.counted_at = -math.inf
        self(study, None)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        if time.monotonic() - self.counted_at >= self.recount:
            self.done = self.failed = 0
            self.best = None
            for t in method_trials(study, self.method, (*_FINISHED, TrialState.FAIL)):
                self._count(t)
            self.counted_at = time.monotonic()
        elif trial is not None and trial.system_attrs.get(METHOD_KEY, trial.user_attrs.get("method")) == self.method:
            self._count(trial)
        parts = [] if self.best is None else [f"best loss {self.best:.4f}"]
        if self.best is not None and self.perplexity:
            parts.append(f"ppl {math.exp(self.best):.2f}")
        if self.failed:
            parts.append(f"{self.failed} failed")
        self.bar.n = self.done
        self.bar.set_postfix_str(", ".join(parts), refresh=False)
        self.bar.refresh()

    def _count(self, t: optuna.trial.FrozenTrial) -> None:
        if t.state == TrialState.FAIL:
            self.failed += 1
            return
        self.done += 1
        if t.state == TrialState.COMPLETE and t.values:
            loss = float(np.mean(t.values))
            if math.isfinite(loss) and (self.best is None or loss < self.best):
                self.best = loss

    def close(self) -> None:
        self.bar.close()


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
    grace = _grace(storage)

    def snapshot() -> tuple[list[optuna.trial.FrozenTrial], dict[int, tuple[Any, float]]]:
        return storage.get_all_trials(study._study_id), _running_heartbeats(storage, study._study_id)

    def active(t: optuna.trial.FrozenTrial) -> bool:
        if t.number in beats:
            return beats[t.number][1] <= grace
        last = t.datetime_complete or t.datetime_start  # local clock, as optuna writes them
        return last is not None and (datetime.now() - last).total_seconds() <= grace

    trials, beats = snapshot()
    suspects = [t for t in trials if active(t) and not _gone(t.user_attrs.get("worker"))]
    if not suspects:
        return
    time.sleep(storage.heartbeat_interval + 1.5)  # a live process records a newer heartbeat meanwhile
    later, later_beats = snapshot()
    changed = [t for t in later if t.number >= len(trials) or t.state != trials[t.number].state]
    if changed or {n: b for n, (b, _) in later_beats.items()} != {n: b for n, (b, _) in beats.items()}:
        workers = [t.user_attrs.get("worker") for t in changed + suspects if t.user_attrs.get("worker")]
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
    grace = 0.0 if sqlite else _grace(storage)
    beats = _last_heartbeats(study)
    now = datetime.now()  # local clock, as optuna writes datetime_start
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in beats or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > grace:
            study._storage.set_trial_user_attr(
                t._trial_id, FAIL_REASON, "orphaned: its process died before its first heartbeat"
            )
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


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
        heartbeat = (study.user_attrs.get("config") or {}).get("heartbeat")
        backend = storage_backend(study._storage)
        if heartbeat:
            grace = 3.0 * heartbeat  # as open_storage gives the workers
        else:
            grace = _grace(backend) if is_heartbeat_enabled(backend) else 60.0  # open_storage's default
    beats = _last_heartbeats(study)
    me, now = f"{socket.gethostname()}:{os.getpid()}", datetime.now()
    gone = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
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
    storage = study._storage
    backend = storage_backend(storage)
    retry = (backend.get_heartbeat_stale_trial_callback() if is_heartbeat_enabled(backend) else None) or RetryStaleTrial()
    failed = []
    for trial, reason in gone_trials(study) if gone is None else gone:
        try:
            storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, reason)
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # its worker was alive after all, or another process failed it
            continue
        frozen = storage.get_trial(trial._trial_id)
        retry(study, frozen)
        failed.append(frozen)
    return failed


def _beating(study: optuna.Study) -> Any:
    """The study's storage (unwrapped from optuna's cache) if it records heartbeats, else None."""
    storage = storage_backend(study._storage)
    return storage if is_heartbeat_enabled(storage) else None


def _beating_rdb(study: optuna.Study) -> RDBStorage | None:
    """The study's RDB storage (unwrapped from optuna's cache) if it records heartbeats, else None."""
    storage = _beating(study)
    return storage if isinstance(storage, RDBStorage) else None


def _grace(storage: Any) -> float:
    """Seconds without a heartbeat after which a RUNNING trial counts as dead (optuna's rule)."""
    return grace_of(storage)


def _last_heartbeats(study: optuna.Study) -> dict[int, tuple[datetime, float]]:
    """Trial number -> (last heartbeat, its age in seconds) of the study's RUNNING trials that had one.

    On RDB, both come from the database server's clock (as optuna's stale check); on a journal
    file, the lease holds the renewing process's wall-clock time, compared with this one's.
    """
    storage = storage_backend(study._storage)
    if isinstance(storage, RDBStorage):
        return _running_heartbeats(storage, study._study_id)
    now, beats = time.time(), {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        lease = t.system_attrs.get(LEASE_KEY)
        if lease is not None:
            beats[t.number] = (datetime.fromtimestamp(lease), now - lease)
    return beats


def _running_heartbeats(storage: RDBStorage, study_id: int) -> dict[int, tuple[Any, float]]:
    """Trial number -> (last heartbeat, its age in seconds) of the study's RUNNING trials."""
    trial, beat = rdb_models.TrialModel, rdb_models.TrialHeartbeatModel
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


def best_by_method(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best complete exact-k trial of each method (single-objective studies)."""
    best: dict[str, dict[str, Any]] = {}
    if len(study.directions) != 1:
        return best
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        method = t.user_attrs.get("method", "unknown")
        if t.value is None or not math.isfinite(t.value):
            continue
        if method not in best or t.value < best[method]["value"]:
            best[method] = {
                "trial": t.number, "value": t.value, "dropped": t.user_attrs.get("dropped"),
                "perplexity": t.user_attrs.get("perplexity"),
            }
    for method, entry in best.items():
        entry["evaluations"] = len(method_trials(study, method, _FINISHED))
    return best


def running_by_method(study: optuna.Study) -> dict[str, int]:
    """RUNNING trials per method: evaluations in progress, or left by a killed process until its
    heartbeat goes stale or the study is next opened. Never counted as evaluations."""
    running: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        method = t.system_attrs.get(METHOD_KEY, t.user_attrs.get("method", "unknown"))
        running[method] = running.get(method, 0) + 1
    return running


def summarise(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Attach the best mask of each method to the study (user attrs + a dashboard note)."""
    best = best_by_method(study)
    if not best:
        return best
    study.set_user_attr("best_by_method", best)
    overall = min(best.values(), key=lambda e: e["value"])
    study.set_user_attr("best_dropped", overall["dropped"])
    lines = [
        f"# {study.study_name}", "",
        "| method | best trial | loss | perplexity | dropped layers | evaluations |",
        "|---|---|---|---|---|---|",
    ]
    for method, e in sorted(best.items(), key=lambda kv: kv[1]["value"]):
        ppl = f"{e['perplexity']:.2f}" if e.get("perplexity") else "-"
        lines.append(
            f"| {method} | {e['trial']} | {e['value']:.4f} | {ppl} | {e['dropped']} | {e['evaluations']} |"
        )
    try:
        from optuna_dashboard import save_note

        save_note(study, "\n".join(lines))
    except Exception:  # the note is a convenience; the attrs above hold the same facts
        pass
    return best


@dataclass
class SearchSetup:
    """Everything a search process holds: the study and the objective that scores its masks."""

    study: optuna.Study
    objective: Any
    budget: MethodBudget | None
    catch: tuple[type[BaseException], ...]
    model: Any
    tokenizer: Any
    calibration: Any
    fitness: Any
    space: LayerMaskSpace
    validation: Any = None  # the held-out calibration windows (CalibrationSet) of a validation split


def make_space(cfg: SearchConfig, num_layers: int) -> LayerMaskSpace:
    """The candidates a config searches: exact-k layer or sub-block masks, or per-layer width rates."""
    return space_of(cfg.space).build(cfg, num_layers)


def make_sampler(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    """The sampler a config names (search side only: no model needed)."""
    method = cfg.method
    if n_objectives > 1 and method.single_objective:
        raise ConfigError(f"{method.name} {method.single_objective}: use objective_mode mean or worst")
    return method.sampler(cfg, space, n_objectives)


def make_pruner(cfg: SearchConfig, sampler: optuna.samplers.BaseSampler) -> optuna.pruners.BasePruner | None:
    """The method's pruner: multi-fidelity selection within generations when ``cfg.fidelity_stages()``
    has stages (the GA samplers rank a candidate in its generation, SLEB in its greedy step), darwin's
    survivor schedule, or None (every candidate scored on all samples)."""
    return cfg.method.pruner(cfg, sampler)


def default_budget(cfg: SearchConfig, sampler: optuna.samplers.BaseSampler) -> MethodBudget | None:
    """The method's budget from n_trials or its default (e.g. SLEB and exhaustive stop by themselves:
    None; ShortGPT is one evaluation; the GA samplers ten generations)."""
    n_trials = cfg.method.budget(cfg.n_trials, sampler)
    return None if n_trials is None else MethodBudget(cfg.sampler, n_trials)


def n_objectives_of(cfg: SearchConfig) -> int:
    """One objective, or one per CCDS cluster with ``objective_mode = "clusters"``."""
    return cfg.ccds_clusters if cfg.objective_mode == "clusters" else 1


def _existing_storage(cfg: SearchConfig) -> optuna.storages.BaseStorage | None:
    """The storage if it exists (opened, so a bad URL or an unreachable server fails now), else None
    after checking that its file can be created: a refused search leaves no empty database behind."""
    path = storage_file(cfg.storage)
    if path is not None and not path.exists():
        from optuna_prune.outputs import OutputError, check_writable_folder

        if path.is_symlink():
            raise StorageError(f"storage {cfg.storage!r} is a broken symbolic link; fix it or name another file")
        try:
            check_writable_folder(path.parent, f"storage {cfg.storage or DEFAULT_STORAGE!r}")
        except OutputError as exc:
            raise StorageError(str(exc)) from None
        return None
    return open_storage(cfg.storage, cfg.heartbeat)


def precheck(cfg: SearchConfig, storage: optuna.storages.BaseStorage | None, new_study: bool) -> None:
    """Refuse before any model is loaded what a resume would refuse after: a ``--study`` made for
    another model, k, calibration source, fitness or sampler settings, or seeds it cannot give."""
    from optuna_prune.calibration import source_label
    from optuna_prune.models import model_identity

    name = None
    if storage is not None and cfg.study is not None:
        name = free_study_name(storage, cfg.study, new_study)
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        name = name if name in names else None
    if name is None:  # a new study, unless the derived name finds one once the model is loaded
        if (new_study or cfg.study is not None) and (missing := missing_run(cfg, None)) is not None:
            raise missing_run_error(missing)
        return
    study = optuna.load_study(study_name=name, storage=storage)
    stored = require_problem(study, fix="use another --study name")
    partial = {"model": model_identity(cfg.model), "calibration": source_label(cfg.calibration),
               "fitness": cfg.fitness, "objective_mode": cfg.objective_mode,
               "ccds_clusters": cfg.ccds_clusters, "space": space_of(cfg.space).recorded_as,
               "validation_samples": cfg.validation_samples}
    check_problem(study, partial, wait=0, keys=tuple(partial))
    num_layers = stored.get("num_layers")
    if not isinstance(num_layers, int):
        return
    try:
        space = make_space(cfg, num_layers)
    except SpaceError as exc:
        raise ConfigError(str(exc)) from None
    check_problem(study, {"num_drop": space.num_drop}, wait=0, keys=("num_drop",))
    check_resume(cfg, study, make_sampler(cfg, space, n_objectives_of(cfg)))


def announce_plan(cfg: SearchConfig, space: LayerMaskSpace) -> None:
    """Say how many layers (blocks, width units) the search drops and the real sparsity; name the
    ``--drop`` that gives exactly what ``--sparsity`` asked for when it does not divide evenly."""
    units = space_of(cfg.space)
    kind, total, k = units.unit, units.total_units(space), space.num_drop
    line = f"{units.verb} {k} of {total} {kind}: sparsity {k / total:.1%}"
    if cfg.sparsity is not None and units.rounds_to_drop and abs(cfg.sparsity * total - k) > 1e-6:
        other = k + 1 if cfg.sparsity * total > k else k - 1
        line += f" (--sparsity {cfg.sparsity} asks for {cfg.sparsity * total:.2f} {kind}, which rounds to {k}"
        if 0 < other < total:
            line += f"; --drop {other} gives {other / total:.1%}"
        line += f"; --drop {k} keeps this without rounding)"
        log.warning(line)
    else:
        log.info(line)


def prepare(cfg: SearchConfig, new_study: bool = False, record_config: bool = True) -> SearchSetup:
    """Load the model and calibration set, open (or resume) the study, build sampler and objective.

    ``record_config=False`` (a worker joining the study) keeps the config its creator recorded.
    Every check that can refuse the search runs before anything is written: first the ones that
    need no model (storage, device, a resumed --study's settings), then the model's and the
    calibration corpus's; a study this call created is removed again if its setup fails.
    """
    from optuna_prune.calibration import build_calibration
    from optuna_prune.ccds import CCDSConfig
    from optuna_prune.devices import pick_device
    from optuna_prune.layers import find_layer_stack
    from optuna_prune.models import load_model, model_identity

    storage = _existing_storage(cfg)  # fail on a bad URL before loading anything heavy
    pick_device(cfg.device)
    precheck(cfg, storage, new_study)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    num_layers = find_layer_stack(model).num_layers
    try:
        space = make_space(cfg, num_layers)
    except SpaceError as exc:
        raise ConfigError(str(exc)) from None
    num_drop = space.num_drop
    ccds = CCDSConfig(n_clusters=cfg.ccds_clusters) if cfg.ccds_clusters else None
    calibration = build_calibration(
        tokenizer, cfg.calibration, n_samples=cfg.n_samples, seq_len=cfg.seq_len,
        seed=cfg.seed, data_dir=cfg.data_dir, ccds=ccds,
    )
    method = cfg.method  # what its objective needs must be there too, before a study is created
    inputs = None if method.inputs is None else method.inputs(cfg, calibration, tokenizer)
    problem = problem_of(cfg, model_identity(cfg.model), num_layers, num_drop, calibration)
    n_objectives = n_objectives_of(cfg)
    sampler = make_sampler(cfg, space, n_objectives)
    pruner = make_pruner(cfg, sampler)
    new_file = storage_file(cfg.storage) if storage is None else None
    new_folders = [] if new_file is None else _missing_folders(new_file.parent)
    if storage is None:
        storage = open_storage(cfg.storage, cfg.heartbeat)
    try:
        name = free_study_name(storage, cfg.study or default_study_name(problem), new_study)
        if name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            existing = optuna.load_study(study_name=name, storage=storage)
            check_problem(existing, problem)
            check_resume(cfg, existing, sampler)  # before opening it fails orphaned trials
        elif (missing := missing_run(cfg, None)) is not None:
            raise missing_run_error(missing)
        study, created = _open_or_create(storage, name, problem, ["minimize"] * n_objectives, sampler, new_study, pruner)
        if not created:
            check_resume(cfg, study, sampler)  # a process started with this one may have made it
    except BaseException:
        _remove_new_storage(storage, new_file, new_folders)
        raise
    search_windows, validation = calibration, None
    if cfg.validation_samples:
        from optuna_prune.calibration import split_validation

        search_windows, validation = split_validation(calibration, cfg.validation_samples)
    try:
        setup = _set_up(cfg, study, sampler, pruner, space, model, tokenizer, search_windows, record_config,
                        inputs)
    except BaseException:
        if created:
            _discard_new_study(study, new_file, new_folders)
        raise
    setup.validation = validation
    return setup


def _missing_folders(folder: Path) -> list[Path]:
    from optuna_prune.outputs import missing_folders

    return missing_folders(folder)


def _discard_new_study(study: optuna.Study, new_file: Path | None, new_folders: list[Path]) -> None:
    """Remove a study this process created whose setup failed (and its storage file if this process
    made that too), unless another worker has meanwhile started trials in it."""
    try:
        if study.get_trials(deepcopy=False):
            return
        optuna.delete_study(study_name=study.study_name, storage=study._storage)
    except Exception:  # the setup's own error is the one to report
        return
    _remove_new_storage(study._storage, new_file, new_folders)


def _remove_new_storage(storage: optuna.storages.BaseStorage, new_file: Path | None, new_folders: list[Path]) -> None:
    """Remove a storage file this process created, if it holds no study."""
    if new_file is None:
        return
    try:
        if optuna.get_all_study_summaries(storage):
            return
        backend = storage_backend(storage)
        if isinstance(backend, RDBStorage):
            backend.engine.dispose()
        new_file.unlink(missing_ok=True)
        for suffix in ("-journal", "-wal", "-shm", ".lock"):  # SQLite's side files, the journal's lock
            new_file.with_name(new_file.name + suffix).unlink(missing_ok=True)
    except Exception:
        return
    from optuna_prune.outputs import remove_empty_folders

    remove_empty_folders(new_folders)


def _set_up(
    cfg: SearchConfig, study: optuna.Study, sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner | None, space: LayerMaskSpace, model: Any, tokenizer: Any,
    calibration: Any, record_config: bool, inputs: Any = None,
) -> SearchSetup:
    """The part of :func:`prepare` that writes: config and clusters on the study, the fitness (the
    dense pass), the objective, and the seeds enqueued (``inputs``: what the method's own objective
    needs, see :attr:`~optuna_prune.methods.Method.inputs`)."""
    from optuna_prune.objective import CANDIDATE_FAILURES

    method, units = cfg.method, space_of(cfg.space)
    if record_config:  # a search or create; a worker joins a study whose k was announced when it was made
        announce_plan(cfg, space)
        study.set_user_attr("config", cfg.replace(study=study.study_name).to_dict())
    if calibration.clusters is not None:
        study.set_user_attr("ccds", calibration.clusters)
    fitness = units.fitness(cfg, model, calibration)
    if method.objective is not None:
        objective = method.objective(cfg, fitness, space, tokenizer, inputs)
    else:
        objective = units.objective_class()(
            fitness, space, method=cfg.sampler, cluster_ids=calibration.cluster_ids,
            mode=cfg.objective_mode, invalid=cfg.invalid_masks,
            stages=cfg.fidelity_stages() if pruner is not None else (),
        )
    budget = default_budget(cfg, sampler)

    seeders = seed_methods(cfg)
    influence = None
    if any(m.needs_influence for _, m in seeders):
        from optuna_prune.importance import block_influence  # model side (torch)

        influence = block_influence(fitness)
        study.set_user_attr("block_influence", [round(v, 6) for v in influence])
    seeds: dict[str, tuple[int, ...]] = {}
    for origin, seeder in seeders:
        found = seeder.seed(study, influence, space.num_drop)
        if found is None:
            raise missing_run_error(seeder)
        seeds[origin] = found
    own = {trial_mask(t, space) for t in method_trials(study, cfg.sampler)}
    waiting = {trial_mask(t, space) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for origin, dropped in seeds.items():
        if dropped not in own and dropped not in waiting:
            attrs = {"seeded_from": origin.split(":", 1)[1]} if origin.startswith("seed:") else {}
            study.enqueue_trial(space.to_params(dropped), user_attrs=attrs)
    return SearchSetup(
        study, objective, budget, CANDIDATE_FAILURES, model, tokenizer, calibration, fitness, space
    )


def run_search(
    cfg: SearchConfig,
    new_study: bool = False,
    progress: bool = True,
    on_study: Callable[[optuna.Study], None] | None = None,
    max_trials: int | None = None,
    record_config: bool = True,
) -> optuna.Study:
    """Run (or resume) the search ``cfg`` describes and return its study.

    config -> model and calibration samples -> study -> sampler proposes masks -> objective scores
    them -> storage. ``n_trials`` is this method's budget in the study, so a re-run after a crash only
    does what is missing. ``max_trials`` caps the trials of this process (one of several workers).
    """
    setup = prepare(cfg, new_study=new_study, record_config=record_config)
    study = setup.study
    if on_study is not None:
        on_study(study)
    budget = setup.budget
    own = _OwnTrials(setup.objective if budget is None else budget.guard(setup.objective))
    shown: SearchProgress | None = None
    started, rounds = time.monotonic(), 0
    try:
        while True:  # one round, and one more after each trial taken from this worker
            remaining = None if budget is None else budget.n_trials - budget.done(study)
            if max_trials is not None:
                mine = max_trials - own.started
                remaining = mine if remaining is None else min(remaining, mine)
            timeout = cfg.timeout
            if rounds and timeout is not None:
                timeout -= time.monotonic() - started
                if timeout <= 0:
                    break
            if (remaining is not None and remaining <= 0) or (budget is not None and not budget.has_room(study)):
                break
            rounds += 1
            if shown is None:
                method = budget.method if budget is not None else cfg.sampler
                total = budget.n_trials if budget is not None else getattr(study.sampler, "planned_trials", lambda: None)()
                shown = SearchProgress(study, method, total, enabled=progress,
                                       perplexity=cfg.fitness == "perplexity" and cfg.objective_mode == "mean")
            try:
                study.optimize(
                    own,
                    n_trials=remaining,
                    timeout=timeout,
                    catch=(*setup.catch, BudgetReached),
                    callbacks=[shown] + ([budget] if budget is not None else []),
                )
            except BaseException as exc:
                if interrupted(exc):
                    fail_own_running_trials(study)
                    raise
                taken = _taken_trial(study, exc, own)
                if taken is None:
                    raise
                _logger.warning(
                    "optuna-prune: trial %d was taken from this worker (%s), which was frozen past the "
                    "heartbeat grace period; another worker failed and re-queued it: this worker's "
                    "result for it is dropped, going on with the next trial",
                    taken.number, taken.user_attrs.get(FAIL_REASON, taken.state.name),
                )
                continue
            break
    finally:
        if shown is not None:
            shown.close()
    if setup.validation is not None:
        from optuna_prune.final_pick import pick_on_validation

        pick_on_validation(study, setup.model, setup.validation, cfg, progress=progress)
    summarise(study)
    return study


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


class _OwnTrials:
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
        stored = trial.study._storage.get_trial(trial._trial_id)
        if stored.state.is_finished():
            raise TrialTaken(stored) from cause


def _taken_trial(study: optuna.Study, exc: BaseException, own: _OwnTrials) -> optuna.trial.FrozenTrial | None:
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
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(found[1]))
            trial = study._storage.get_trial(trial_id)
            if not trial.state.is_finished():
                return None
            if own.current is None or own.current._trial_id != trial_id:
                own.started += 1
            return trial
        if isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a ") and own.current is not None:
            trial = study._storage.get_trial(own.current._trial_id)
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
    from optuna_prune.objective import WORKER

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == WORKER:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def config_of(study: optuna.Study) -> SearchConfig:
    """The SearchConfig recorded on a study (for workers, export and evaluation)."""
    from optuna_prune.config import from_record

    data = study.user_attrs.get("config")
    if data is None:
        raise ConfigError(f"study {study.study_name!r} has no recorded optuna-prune config")
    return from_record(data, origin=f"study {study.study_name}")


def load_existing_study(name: str, storage_url: str | None) -> optuna.Study:
    """Load a study by name, with a one-line error listing what the storage holds if it is absent."""
    storage = open_storage(storage_url, create=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        shown = names if len(names) <= 10 else [*names[:10], f"... {len(names) - 10} more"]
        raise StudyMismatchError(
            f"no study {name!r} in {storage_url or DEFAULT_STORAGE}; it holds {shown or 'no studies'} "
            "(optuna-prune studies --storage URL lists them)"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    require_problem(study)
    return study
