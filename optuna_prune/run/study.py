"""Building and running a search: config -> model and calibration -> study -> sampler and objective.

:func:`prepare` checks everything that can refuse a search before it writes anything, then opens
(or resumes) the study; :func:`run_search` runs the method until its budget in the study is
reached. Where studies live is :mod:`optuna_prune.run.storage`, what they are bound to
:mod:`optuna_prune.run.problem`, how budgets are counted :mod:`optuna_prune.run.budget`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from optuna_prune.outputs import (
    OutputError,
    check_writable_folder,
    missing_folders,
    remove_empty_folders,
)
from optuna_prune.run.budget import (
    BudgetReached,
    Deadline,
    MethodBudget,
    SearchProgress,
    method_trials,
    wait_for_running,
)
from optuna_prune.run.config import DEFAULT_STORAGE, ConfigError, SearchConfig
from optuna_prune.run.final_pick import pick_on_validation
from optuna_prune.run.methods import seed_methods, seed_runs, space_of
from optuna_prune.run.problem import (
    check_problem,
    check_resume,
    default_study_name,
    free_study_name,
    open_or_create_study,
    problem_of,
    require_problem,
)
from optuna_prune.run.storage import (
    OwnTrials,
    StorageError,
    fail_own_running_trials,
    interrupted,
    open_storage,
    storage_file,
    taken_trial,
)
from optuna_prune.run.summary import summarise
from optuna_prune.search import compat
from optuna_prune.search.record import (
    BLOCK_INFLUENCE_ATTR,
    CCDS_ATTR,
    CONFIG_ATTR,
    FAIL_REASON,
    SEEDED_FROM_ATTR,
)
from optuna_prune.search.samplers import trial_mask
from optuna_prune.search.space import LayerMaskSpace, SpaceError

_logger = logging.getLogger(__name__)
log = logging.getLogger("optuna_prune.plan")  # what a search is about to do (the CLI shows it)


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
    another model, k, calibration source, fitness or sampler settings."""
    # deferred: loads safetensors, torch, transformers only when this runs
    from optuna_prune.model.calibration import source_label
    from optuna_prune.model.models import model_identity

    name = None
    if storage is not None and cfg.study is not None:
        name = free_study_name(storage, cfg.study, new_study)
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        name = name if name in names else None
    if name is None:  # a new study, unless the derived name finds one once the model is loaded
        return
    study = optuna.load_study(study_name=name, storage=storage)
    stored = require_problem(study, fix="use another --study name")
    partial = {"model": model_identity(cfg.model), "calibration": source_label(cfg.calibration),
               "fitness": cfg.fitness, "objective_mode": cfg.objective_mode,
               "ccds_clusters": cfg.ccds_clusters, "space": space_of(cfg.space).record.recorded_name,
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
    check_resume(study, make_sampler(cfg, space, n_objectives_of(cfg)))


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


def prepare(
    cfg: SearchConfig, new_study: bool = False, record_config: bool = True, previous: SearchSetup | None = None
) -> SearchSetup:
    """Load the model and calibration set, open (or resume) the study, build sampler and objective.

    ``record_config=False`` (a worker joining the study) keeps the config its creator recorded;
    ``previous`` is an earlier phase of the same search (a seed run): its model, and its fitness with
    the dense pass and prefix caches when the windows are the same, are used again.
    Every check that can refuse the search runs before anything is written: first the ones that
    need no model (storage, device, a resumed --study's settings), then the model's and the
    calibration corpus's; a study this call created is removed again if its setup fails.
    """
    # deferred: loads safetensors, torch, transformers only when this runs
    from optuna_prune.model.calibration import build_calibration
    from optuna_prune.model.ccds import CCDSConfig
    from optuna_prune.model.devices import pick_device
    from optuna_prune.model.layers import find_layer_stack
    from optuna_prune.model.models import load_model, model_identity

    storage = _existing_storage(cfg)  # fail on a bad URL before loading anything heavy
    pick_device(cfg.device)
    precheck(cfg, storage, new_study)
    if previous is not None:
        model, tokenizer = previous.model, previous.tokenizer
    else:
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
            check_resume(existing, sampler)  # before opening it fails orphaned trials
        study, created = open_or_create_study(storage, name, problem, ["minimize"] * n_objectives, sampler, new_study, pruner)
        if not created:
            check_resume(study, sampler)  # a process started with this one may have made it
    except BaseException:
        _remove_new_storage(storage, new_file, new_folders)
        raise
    search_windows, validation = calibration, None
    if cfg.validation_samples:
        # deferred: loads torch only when this runs
        from optuna_prune.model.calibration import split_validation

        search_windows, validation = split_validation(calibration, cfg.validation_samples)
    same_windows = previous is not None and previous.calibration.sha256 == search_windows.sha256
    try:
        setup = _set_up(cfg, study, sampler, pruner, space, model, tokenizer, search_windows, record_config,
                        inputs, fitness=previous.fitness if same_windows else None)
    except BaseException:
        if created:
            _discard_new_study(study, new_file, new_folders)
        raise
    setup.validation = validation
    return setup


def _missing_folders(folder: Path) -> list[Path]:
    return missing_folders(folder)


def _discard_new_study(study: optuna.Study, new_file: Path | None, new_folders: list[Path]) -> None:
    """Remove a study this process created whose setup failed (and its storage file if this process
    made that too), unless another worker has meanwhile started trials in it."""
    try:
        if study.get_trials(deepcopy=False):
            return
        optuna.delete_study(study_name=study.study_name, storage=compat.study_storage(study))
    except Exception:  # the setup's own error is the one to report
        return
    _remove_new_storage(compat.study_storage(study), new_file, new_folders)


def _remove_new_storage(storage: optuna.storages.BaseStorage, new_file: Path | None, new_folders: list[Path]) -> None:
    """Remove a storage file this process created, if it holds no study."""
    if new_file is None:
        return
    try:
        if optuna.get_all_study_summaries(storage):
            return
        backend = compat.unwrap_storage(storage)
        if isinstance(backend, RDBStorage):
            backend.engine.dispose()
        new_file.unlink(missing_ok=True)
        for suffix in ("-journal", "-wal", "-shm", ".lock"):  # SQLite's side files, the journal's lock
            new_file.with_name(new_file.name + suffix).unlink(missing_ok=True)
    except Exception:
        return

    remove_empty_folders(new_folders)


def _record_config(study: optuna.Study, cfg: SearchConfig) -> None:
    """The config workers, export and evaluation read back (:func:`~optuna_prune.run.problem.config_of`)."""
    study.set_user_attr(CONFIG_ATTR, cfg.replace(study=study.study_name).to_dict())


def _set_up(
    cfg: SearchConfig, study: optuna.Study, sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner | None, space: LayerMaskSpace, model: Any, tokenizer: Any,
    calibration: Any, record_config: bool, inputs: Any = None, fitness: Any = None,
) -> SearchSetup:
    """The part of :func:`prepare` that writes: config and clusters on the study, the fitness (the
    dense pass, unless an earlier phase's ``fitness`` on the same windows is given), the objective, and
    the seeds enqueued (``inputs``: what the method's own objective needs, see
    :attr:`~optuna_prune.run.methods.Method.inputs`)."""
    # deferred: loads torch, transformers only when this runs
    from optuna_prune.run.objective import CANDIDATE_FAILURES

    method, units = cfg.method, space_of(cfg.space)
    if record_config:  # a search or create; a worker joins a study whose k was announced when it was made
        announce_plan(cfg, space)
        _record_config(study, cfg)
    if calibration.clusters is not None:
        study.set_user_attr(CCDS_ATTR, calibration.clusters)
    if fitness is None:
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
        from optuna_prune.model.importance import block_influence  # model side (torch)

        influence = block_influence(fitness)
        study.set_user_attr(BLOCK_INFLUENCE_ATTR, [round(v, 6) for v in influence])
    seeds: dict[str, tuple[int, ...]] = {}
    for origin, seeder in seeders:  # a seed run not finished yet (``create``): the workers run it first
        if (found := seeder.seed(study, influence, space.num_drop)) is not None:
            seeds[origin] = found
    own = {trial_mask(t, space) for t in method_trials(study, cfg.sampler)}
    waiting = {trial_mask(t, space) for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))}
    for origin, dropped in seeds.items():
        if dropped not in own and dropped not in waiting:
            attrs = {SEEDED_FROM_ATTR: origin.split(":", 1)[1]} if origin.startswith("seed:") else {}
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
    does what is missing. ``max_trials`` caps the trials of this process (one of several workers),
    its seed runs' included.
    A method seeded with another's finished run (``seed_with`` SLEB, on by default on CCDS windows)
    runs that one first in the same study, unless the study has its result (:func:`seed_runs`); a
    worker whose part of it ends while other workers score its last candidates waits for them.
    ``cfg.timeout`` counts from this call, so the preparation (model, calibration windows, CCDS
    clustering) is inside it, and so are the seed runs, the last trial and the validation pick
    (:class:`Deadline`): a user's time budget is the command's wall time, not the trials' alone.
    """
    started, setup, left, before = time.monotonic(), None, max_trials, "the preparation"
    deadline = None if cfg.timeout is None else started + cfg.timeout
    for phase in [*seed_runs(cfg), cfg]:
        first = setup is None
        setup = prepare(phase, new_study=new_study and first, record_config=record_config and first, previous=setup)
        if first and on_study is not None:
            on_study(setup.study)
        if phase is cfg:
            _optimize(setup, cfg, started, progress, left, before=before)
            break
        if record_config:  # the study's config is the user's search, not its seed run
            _record_config(setup.study, cfg)
        seeder = phase.method
        mask = seeder.seed(setup.study, None, setup.space.num_drop)
        if mask is None:
            log.info("%s runs first, %s starts from its mask (--seed-with '' turns this off)", seeder.name, cfg.sampler)
            before = f"the preparation and {seeder.name}'s run"
            while True:  # other workers may still score the run's last candidates: wait for them
                ran = _optimize(setup, phase, started, progress, left)
                left = None if left is None else left - ran
                mask = seeder.seed(setup.study, None, setup.space.num_drop)
                if mask is not None or left == 0 or not wait_for_running(setup.study, seeder.name, deadline):
                    break
        if mask is None:
            _logger.warning("optuna-prune: %s's run ended before its mask (the --timeout, or this worker's "
                            "--n-trials); %s did not run: raise it, or run again to resume", seeder.name, cfg.sampler)
            break
    study = setup.study
    if setup.validation is not None:
        pick_on_validation(study, setup.model, setup.validation, cfg, progress=progress)
    summarise(study)
    return study


def _optimize(setup: SearchSetup, cfg: SearchConfig, started: float, progress: bool, max_trials: int | None,
              before: str = "the preparation") -> int:
    """Run ``cfg``'s method in the prepared study until its budget, ``max_trials`` or the timeout
    (counted from ``started``; ``before``: what ran since then) ends it; return how many trials this
    process started."""
    study, budget, rounds = setup.study, setup.budget, 0
    own = OwnTrials(setup.objective if budget is None else budget.guard(setup.objective))
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [] if budget is None else [budget]
    if cfg.timeout is not None:  # the last trial and the validation pick end inside the timeout
        windows = 0 if setup.validation is None else setup.validation.n_samples
        masks = cfg.pick_top + int(cfg.fitness != "perplexity")  # KL's validation fitness runs the dense model first
        callbacks.append(Deadline(started + cfg.timeout, windows, masks))
    shown: SearchProgress | None = None
    try:
        while True:  # one round, and one more after each trial taken from this worker
            remaining = None if budget is None else budget.n_trials - budget.done(study)
            if max_trials is not None:
                mine = max_trials - own.started
                remaining = mine if remaining is None else min(remaining, mine)
            timeout = cfg.timeout
            if timeout is not None:
                timeout -= time.monotonic() - started
                if timeout <= 0:
                    if not rounds:
                        _logger.warning(
                            "optuna-prune: %s took the whole --timeout %.0f s; no %s trial ran: "
                            "raise --timeout", before, cfg.timeout, cfg.sampler,
                        )
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
                    callbacks=[shown, *callbacks],
                )
            except BaseException as exc:
                if interrupted(exc):
                    fail_own_running_trials(study)
                    raise
                taken = taken_trial(study, exc, own)
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
    return own.started
