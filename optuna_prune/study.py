"""Studies that persist and resume: storage, the problem a study is bound to, and running a search.

A study is one pruning problem (model, k, calibration set, fitness). Every method's trials live in
it, tagged with a ``method``, so the dashboard and the figures compare them on one axis. Re-running
the same command resumes: finished trials are kept, the evolution continues from storage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_prune import __version__
from optuna_prune.config import ConfigError, SearchConfig
from optuna_prune.samplers import sleb_result, trial_mask
from optuna_prune.samplers.base import storage_backend
from optuna_prune.space import (
    METHOD_KEY,
    LayerMaskSpace,
    SpaceError,
    SubBlockSpace,
    resolve_num_drop,
)

log = logging.getLogger("optuna_prune.plan")  # what a search is about to do (the CLI shows it)

DEFAULT_STORAGE = "sqlite:///optuna_prune.db"
PROBLEM_ATTR = "problem"
# The parts of a problem a resumed study must share with the one that created it.
PROBLEM_KEYS = (
    "model", "num_layers", "num_drop", "calibration", "calibration_sha256",
    "fitness", "objective_mode", "ccds_clusters", "space",
)


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
    """An RDB storage with heartbeats (killed workers' trials are failed and retried), or a journal file.

    A RUNNING trial whose process sent no heartbeat for ``3 * heartbeat`` seconds is failed and
    re-queued with the same params.

    ``*.log`` / ``*.journal`` paths give a JournalStorage (many processes, no database server).
    ``create=False`` (commands that only read a storage) refuses an SQLite or journal file that
    does not exist instead of creating an empty one.
    """
    url = url or DEFAULT_STORAGE
    path = storage_file(url)
    if path is not None:
        if path.is_dir():
            raise StorageError(f"storage {url!r} names the folder {path}; name a file, e.g. {path / 'optuna_prune.db'}")
        if not path.exists():
            if not create:
                raise StorageError(
                    f"no storage at {path}: the file does not exist; check --storage (a search or "
                    "create makes it)"
                )
            from optuna_prune.outputs import OutputError, check_writable_folder

            try:
                check_writable_folder(path.parent, f"storage {url!r}")
            except OutputError as exc:
                raise StorageError(str(exc)) from None
            path.parent.mkdir(parents=True, exist_ok=True)
    if _is_journal(url):
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise StorageError(f"cannot open journal {path}: {exc.strerror or exc}; check the path") from None
        except Exception as exc:  # the replay of a file that is not a journal fails in many ways
            raise StorageError(
                f"{path} is not an Optuna journal file ({type(exc).__name__}); pass a journal that "
                "optuna-prune wrote, or a new file name"
            ) from None
    parsed = sqlalchemy.engine.make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername == "postgresql" and not find_spec("psycopg") and find_spec("psycopg2"):
        # SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3; the postgres extra installs psycopg2.
        url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    try:
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=3 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )
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
    if cfg.space == "rates":  # num_drop counts MLP-width units of 1/rate_resolution over all layers
        problem.update(space="rates", rate_resolution=cfg.rate_resolution,
                       sparsity=round(num_drop / (num_layers * cfg.rate_resolution), 4))
    if cfg.space == "sublayers":  # num_drop counts attention and MLP blocks, 2 per layer
        problem.update(space="sublayers", sparsity=round(num_drop / (2 * num_layers), 4))
    return problem



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
            return study, True
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    check_problem(study, problem)
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
        if stored.get(key) != problem.get(key):
            raise StudyMismatchError(
                f"study {study.study_name!r} was created with {key}={stored.get(key)!r}, not "
                f"{problem.get(key)!r}; resume with the same settings, or pass --new-study or another --study"
            )


def check_resume(cfg: SearchConfig, study: optuna.Study, sampler: optuna.samplers.BaseSampler) -> None:
    """Refuse, writing nothing, a resume the study would reject once trials run: a sampler set up
    unlike the run that started its method in the study (e.g. another --population), or seeds
    from a SLEB run the study does not have."""
    check = getattr(sampler, "check_resume", None)
    if check is not None:
        check(study)
    if "sleb" in cfg.seed_with and sleb_result(study) is None:
        raise ConfigError(
            f"seed_with sleb needs a finished SLEB run in study {study.study_name!r}: run --sampler sleb first"
        )


def method_trials(study: optuna.Study, method: str, states: tuple[TrialState, ...] | None = None) -> list[optuna.trial.FrozenTrial]:
    """Trials that ``method`` proposed (tagged by its sampler, or by the objective as user attr)."""
    return [
        t for t in study.get_trials(deepcopy=False, states=states)
        if t.system_attrs.get(METHOD_KEY, t.user_attrs.get("method")) == method
    ]


_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


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
        return len(method_trials(study, self.method, (TrialState.COMPLETE, TrialState.PRUNED)))

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
    trial is an orphan; on a server, one older than the grace period is (a live worker's sampler
    records a heartbeat right after creating the trial).
    """
    storage = _beating_rdb(study)
    if storage is None:
        return
    grace = 0.0 if storage.engine.dialect.name == "sqlite" else _grace(storage)
    beats = _running_heartbeats(storage, study._study_id)
    now = datetime.now()  # local clock, as optuna writes datetime_start
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in beats or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > grace:
            study._storage.set_trial_user_attr(
                t._trial_id, "fail_reason", "orphaned: its process died before its first heartbeat"
            )
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _beating_rdb(study: optuna.Study) -> RDBStorage | None:
    """The study's RDB storage (unwrapped from optuna's cache) if it records heartbeats, else None."""
    storage = storage_backend(study._storage)
    return storage if isinstance(storage, RDBStorage) and is_heartbeat_enabled(storage) else None


def _grace(storage: RDBStorage) -> float:
    """Seconds without a heartbeat after which a RUNNING trial counts as dead (optuna's rule)."""
    return storage.grace_period or 2 * storage.heartbeat_interval


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
        entry["evaluations"] = len(method_trials(study, method))
    return best


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


def make_space(cfg: SearchConfig, num_layers: int) -> LayerMaskSpace:
    """The candidates a config searches: exact-k layer or sub-block masks, or per-layer width rates."""
    if cfg.space == "rates":
        from optuna_prune.rate_space import RateSpace

        return RateSpace.for_sparsity(num_layers, cfg.sparsity, resolution=cfg.rate_resolution)
    if cfg.space == "sublayers":
        return SubBlockSpace(num_layers, resolve_num_drop(2 * num_layers, cfg.sparsity, cfg.drop))
    return LayerMaskSpace(num_layers, resolve_num_drop(num_layers, cfg.sparsity, cfg.drop))


def make_sampler(cfg: SearchConfig, space: LayerMaskSpace, n_objectives: int = 1) -> optuna.samplers.BaseSampler:
    """The sampler a config names (search side only: no model needed)."""
    from optuna_prune.samplers import (
        EvoPSampler,
        ExhaustiveMaskSampler,
        LevelSwitchSampler,
        RandomMaskSampler,
        SLEBSampler,
    )

    if cfg.sampler == "evop":
        return EvoPSampler(space, population_size=cfg.population, seed=cfg.seed)
    if cfg.sampler == "levelswitch":
        if n_objectives > 1:
            raise ConfigError("levelswitch keeps one parent: use objective_mode mean or worst")
        return LevelSwitchSampler(space, offspring=cfg.population or 16, seed=cfg.seed)
    if cfg.sampler == "darwin":
        from optuna_prune.samplers.darwin import DarwinSampler

        if n_objectives > 1:
            raise ConfigError("darwin keeps one parent: use objective_mode mean")
        schedule = {k: getattr(cfg, k) for k in ("train_tokens", "train_loss", "lr", "lora", "fidelity", "seq_len")}
        return DarwinSampler(space, survivors=cfg.survivors, seed=cfg.seed, schedule=schedule)
    if cfg.sampler == "random":
        return RandomMaskSampler(space, seed=cfg.seed)
    if cfg.sampler == "exhaustive":
        return ExhaustiveMaskSampler(space)
    if cfg.sampler == "sleb":
        if n_objectives > 1:
            raise ConfigError("SLEB is single-objective; use objective_mode mean or worst")
        return SLEBSampler(space, protect_ends=cfg.protect_ends)
    if cfg.sampler == "selfpruner":
        from optuna_prune.llm import make_llm
        from optuna_prune.samplers import SelfPrunerSampler

        if n_objectives > 1:
            raise ConfigError("selfpruner shows the LLM one loss per candidate: use objective_mode mean or worst")
        llm = make_llm(cfg.llm, cfg.llm_model, cfg.llm_timeout, device=cfg.device)
        return SelfPrunerSampler(space, llm, population_size=cfg.population, seed=cfg.seed)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed)
    return optuna.samplers.RandomSampler(seed=cfg.seed)  # shortgpt: its one mask is enqueued


def make_pruner(cfg: SearchConfig, sampler: optuna.samplers.BaseSampler) -> optuna.pruners.BasePruner | None:
    """Multi-fidelity selection within generations when ``cfg.fidelity_stages()`` has stages, else None.

    The GA samplers (evop, levelswitch) rank a candidate in its generation, SLEB in its greedy step
    (only with explicit ``fidelity``: by default SLEB scores every candidate exactly); the other
    methods score every candidate on all samples.
    """
    from optuna_prune.pruners import GenerationHalvingPruner
    from optuna_prune.samplers import EvoPSampler, SLEBSampler
    from optuna_prune.samplers.darwin import DarwinSampler

    if isinstance(sampler, DarwinSampler):  # its stages are training stages, its survivors the keep
        return sampler.pruner()
    if not cfg.fidelity_stages() or not isinstance(sampler, (EvoPSampler, SLEBSampler)):
        return None
    return GenerationHalvingPruner(sampler, keep=cfg.fidelity_keep)


def default_budget(cfg: SearchConfig, sampler: optuna.samplers.BaseSampler) -> MethodBudget | None:
    """n_trials, or a default: SLEB and exhaustive stop by themselves, ShortGPT is one evaluation."""
    if cfg.sampler in ("sleb", "exhaustive") and cfg.n_trials is None:
        return None
    if cfg.sampler == "shortgpt":
        return MethodBudget("shortgpt", 1)
    if cfg.n_trials is not None:
        return MethodBudget(cfg.sampler, cfg.n_trials)
    population = getattr(sampler, "population_size", None) or 20
    return MethodBudget(cfg.sampler, population * 10)


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
        if "sleb" in cfg.seed_with and (new_study or cfg.study is not None):
            raise ConfigError("seed_with sleb needs a finished SLEB run in this study: run --sampler sleb first")
        return
    study = optuna.load_study(study_name=name, storage=storage)
    stored = require_problem(study, fix="use another --study name")
    space_name = None if cfg.space == "layers" else cfg.space
    partial = {"model": model_identity(cfg.model), "calibration": source_label(cfg.calibration),
               "fitness": cfg.fitness, "objective_mode": cfg.objective_mode,
               "ccds_clusters": cfg.ccds_clusters, "space": space_name}
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
    kind = {"sublayers": "attention/MLP blocks", "rates": "MLP-width units"}.get(cfg.space, "layers")
    total = space.n_layers * space.resolution if cfg.space == "rates" else space.num_layers
    k = space.num_drop
    line = f"{'pruning' if cfg.space == 'rates' else 'dropping'} {k} of {total} {kind}: sparsity {k / total:.1%}"
    if cfg.sparsity is not None and cfg.space != "rates" and abs(cfg.sparsity * total - k) > 1e-6:
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
    train_windows = None
    if cfg.sampler == "darwin":  # its training text must suffice too, before a study is created
        from optuna_prune.darwin import darwin_training_windows

        train_windows = darwin_training_windows(cfg, calibration, tokenizer)
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
        elif "sleb" in cfg.seed_with:
            raise ConfigError("seed_with sleb needs a finished SLEB run in this study: run --sampler sleb first")
        study, created = _open_or_create(storage, name, problem, ["minimize"] * n_objectives, sampler, new_study, pruner)
        if not created:
            check_resume(cfg, study, sampler)  # a process started with this one may have made it
    except BaseException:
        _remove_new_storage(storage, new_file, new_folders)
        raise
    try:
        setup = _set_up(cfg, study, sampler, pruner, space, model, tokenizer, calibration, record_config,
                        train_windows)
    except BaseException:
        if created:
            _discard_new_study(study, new_file, new_folders)
        raise
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
    calibration: Any, record_config: bool, train_windows: Any = None,
) -> SearchSetup:
    """The part of :func:`prepare` that writes: config and clusters on the study, the fitness (the
    dense pass), the objective, and the seeds enqueued."""
    from optuna_prune.fitness import make_fitness
    from optuna_prune.importance import block_influence, lowest
    from optuna_prune.objective import CANDIDATE_FAILURES, MaskObjective

    num_drop = space.num_drop
    if record_config:  # a search or create; a worker joins a study whose k was announced when it was made
        announce_plan(cfg, space)
        study.set_user_attr("config", cfg.replace(study=study.study_name).to_dict())
    if calibration.clusters is not None:
        study.set_user_attr("ccds", calibration.clusters)
    if cfg.space == "rates":
        from optuna_prune.rate_objective import RateObjective
        from optuna_prune.width import WidthFitness

        fitness = WidthFitness(model, calibration, cfg.rate_resolution)
        objective = RateObjective(
            fitness, space, method=cfg.sampler, cluster_ids=calibration.cluster_ids,
            mode=cfg.objective_mode, invalid=cfg.invalid_masks,
        )
    else:
        fitness = make_fitness(
            cfg.fitness, model, calibration, batch_size=cfg.batch_size, cache_bytes=cfg.cache_mb << 20,
            sub_blocks=cfg.space == "sublayers",
        )
    if cfg.sampler == "darwin":
        from optuna_prune.darwin import make_darwin_objective

        objective = make_darwin_objective(cfg, fitness, space, tokenizer, train_windows)
    elif cfg.space != "rates":
        objective = MaskObjective(
            fitness, space, method=cfg.sampler, cluster_ids=calibration.cluster_ids,
            mode=cfg.objective_mode, invalid=cfg.invalid_masks,
            stages=cfg.fidelity_stages() if pruner is not None else (),
        )
    budget = default_budget(cfg, sampler)

    influence = None
    if cfg.sampler == "shortgpt" or "shortgpt" in cfg.seed_with:
        influence = block_influence(fitness)
        study.set_user_attr("block_influence", [round(v, 6) for v in influence])
    seeds: dict[str, tuple[int, ...]] = {}
    if cfg.sampler == "shortgpt":
        seeds["shortgpt"] = lowest(influence, num_drop)
    if "shortgpt" in cfg.seed_with and cfg.sampler != "shortgpt":
        seeds["seed:shortgpt"] = lowest(influence, num_drop)
    if "sleb" in cfg.seed_with:
        found = sleb_result(study)
        if found is None:
            raise ConfigError("seed_with sleb needs a finished SLEB run in this study: run --sampler sleb first")
        seeds["seed:sleb"] = found
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
    remaining = None if budget is None else budget.n_trials - budget.done(study)
    if max_trials is not None:
        remaining = max_trials if remaining is None else min(remaining, max_trials)
    if (remaining is None or remaining > 0) and (budget is None or budget.has_room(study)):
        try:
            study.optimize(
                setup.objective if budget is None else budget.guard(setup.objective),
                n_trials=remaining,
                timeout=cfg.timeout,
                catch=(*setup.catch, BudgetReached),
                callbacks=[budget] if budget is not None else None,
                show_progress_bar=progress,
            )
        except BaseException as exc:
            if interrupted(exc):
                fail_own_running_trials(study)
            raise
    summarise(study)
    return study


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
    from optuna_prune.config import from_dict

    data = study.user_attrs.get("config")
    if data is None:
        raise ConfigError(f"study {study.study_name!r} has no recorded optuna-prune config")
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    return from_dict({k: v for k, v in data.items() if k in known}, origin=f"study {study.study_name}")


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
