"""Scale a search out: create the study once, then run any number of workers on it.

Users who outgrow one GPU start one worker per GPU, on as many machines as they like, all on one
PostgreSQL (or MySQL) storage. A worker needs only the storage URL and the study name: model,
calibration set, sampler and budget come from the config the study recorded, so every worker
scores masks with the same fitness. Nothing is coordinated in memory: the evolution keeps its
generations and parents in storage (samplers/evop.py), the method's trial budget is counted in
storage (``MethodBudget``), and a killed worker's trial is failed after its heartbeat grace
period and re-queued with the same mask for another worker (on a journal file, heartbeats renew a
lease: see optuna_prune.run.heartbeat). A worker frozen past that period drops the trial taken from it
and goes on. SQLite is for one process.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from optuna_prune.run.config import ConfigError, SearchConfig
from optuna_prune.run.problem import config_of, load_existing_study
from optuna_prune.run.storage import refuse_concurrent_sqlite
from optuna_prune.run.study import prepare, run_search


def create_study(cfg: SearchConfig, new_study: bool = False) -> optuna.Study:
    """Create (or update) the study ``cfg`` describes and record its config, running no trial.

    The model and calibration set are loaded once, to record what workers must match (number of
    layers, calibration hash); enqueued seeds (``seed_with``) wait in the study for the workers.
    Local paths are recorded absolute, so workers started in another directory find them.
    """
    # deferred: loads safetensors, torch, transformers only when this runs
    from optuna_prune.model.calibration import NAMED_SOURCES
    from optuna_prune.model.models import model_identity

    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path

    portable = cfg.replace(
        model=model_identity(cfg.model),
        calibration=cfg.calibration if cfg.calibration in NAMED_SOURCES else absolute(cfg.calibration),
        data_dir=absolute(cfg.data_dir),
    )
    return prepare(portable, new_study=new_study).study


def run_worker(
    storage_url: str | None,
    study_name: str,
    n_trials: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> optuna.Study:
    """Join ``study_name`` and evaluate candidates until the method's budget is reached.

    ``n_trials`` caps this worker's own trials; ``device`` (e.g. ``cuda:1``) picks its GPU. Every
    other setting is the study's recorded config, which the worker leaves as it found it.
    """
    # deferred: loads torch only when this runs
    from optuna_prune.model.devices import pick_device

    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"n_trials {n_trials} must be >= 1; omit --n-trials to run until the budget is reached")
    if device is not None:
        pick_device(device)  # before waiting on storage or loading a model
    study = load_existing_study(study_name, storage_url)
    refuse_concurrent_sqlite(study)  # before loading a model for nothing
    recorded = config_of(study)
    cfg = recorded.replace(
        storage=storage_url, study=study_name, device=device if device is not None else recorded.device
    )
    return run_search(cfg, progress=progress, max_trials=n_trials, record_config=False)
