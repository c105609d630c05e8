"""The problem a study is bound to: what it records, how it is named, and the checks on resume.

A study is one pruning problem (model, k, calibration set, fitness, space). Re-running the same
command resumes the study its problem names; a study made for another problem is refused before
anything is written. Every method's trials live in it, tagged with their method.
"""

from __future__ import annotations

import platform
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from optuna_prune import __version__
from optuna_prune.run.config import DEFAULT_STORAGE, ConfigError, SearchConfig, from_record
from optuna_prune.run.methods import space_of
from optuna_prune.run.storage import fail_orphaned_trials, open_storage, refuse_concurrent_sqlite
from optuna_prune.search import compat
from optuna_prune.search.record import (
    CONFIG_ATTR,
    PROBLEM_ATTR,
    VERSIONS_ATTR,
    problem_units,
    recorded_space,
    study_problem,
)

# The parts of a problem a resumed study must share with the one that created it.
PROBLEM_KEYS = (
    "model", "num_layers", "num_drop", "calibration", "validation_samples", "calibration_sha256",
    "fitness", "objective_mode", "ccds_clusters", "space",
)
# What a problem that does not record a key means (studies made before the key existed).
PROBLEM_DEFAULTS = {"validation_samples": 0}


class StudyMismatchError(ValueError):
    """A study is being resumed with a different model, sparsity, calibration or fitness."""


def problem_of(cfg: SearchConfig, model_id: str, num_layers: int, num_drop: int, calibration: Any) -> dict[str, Any]:
    """What a study is bound to (checked on resume) plus what reproduces it (recorded only)."""
    problem = {
        "model": model_id,
        "num_layers": num_layers,
        "num_drop": num_drop,
        "sparsity": None,  # set below: num_drop over the units of the space
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
    problem.update(space_of(cfg.space).record.problem_fields(cfg.rate_resolution))  # what num_drop counts
    problem["sparsity"] = round(num_drop / problem_units(problem), 4)
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
    problem = study_problem(study)
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
    kind = recorded_space(problem).study_kind
    return f"{model}-{kind}{problem['num_drop']}of{problem_units(problem)}-{calib}{ccds}-{problem['fitness']}"


def versions() -> dict[str, str]:
    # deferred: loads torch, transformers only when this runs
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
    return open_or_create_study(storage, name, problem, directions, sampler, new_study, pruner)[0]


def free_study_name(storage: optuna.storages.BaseStorage, name: str, new_study: bool = False) -> str:
    """``name``, or with ``new_study`` the first of ``NAME``, ``NAME-2``, ``NAME-3``... not in ``storage``."""
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    base, n = name, 2
    while new_study and name in existing:
        name, n = f"{base}-{n}", n + 1
    return name


def open_or_create_study(
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
                return open_or_create_study(storage, base, problem, directions, sampler, new_study, pruner)
        else:
            study.set_user_attr(PROBLEM_ATTR, problem)
            study.set_user_attr(VERSIONS_ATTR, versions())
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
    if not name.strip() or len(name) > compat.rdb_models().MAX_INDEXED_STRING_LENGTH:
        raise ConfigError(
            f"study name of {len(name)} characters {name[:40]!r}{'...' if len(name) > 40 else ''} is "
            f"{'empty' if not name.strip() else 'too long'}; pass a --study name of 1 to "
            f"{compat.rdb_models().MAX_INDEXED_STRING_LENGTH} characters"
        )


def require_problem(study: optuna.Study, wait: float = 5.0, fix: str | None = None) -> dict[str, Any]:
    """The problem ``study`` records, or StudyMismatchError if optuna-prune did not make it.

    A study without trials may have been created a moment ago by a process started with this
    one, which records the problem right after: wait up to ``wait`` seconds for it.
    """
    deadline = time.monotonic() + wait
    while (stored := study_problem(study)) is None and time.monotonic() < deadline:
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


def check_resume(study: optuna.Study, sampler: optuna.samplers.BaseSampler) -> None:
    """Refuse, writing nothing, a resume the study would reject once trials run: a sampler set up
    unlike the run that started its method in the study (e.g. another --population)."""
    check = getattr(sampler, "check_resume", None)
    if check is not None:
        check(study)


def config_of(study: optuna.Study) -> SearchConfig:
    """The SearchConfig recorded on a study (for workers, export and evaluation)."""

    data = study.user_attrs.get(CONFIG_ATTR)
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
