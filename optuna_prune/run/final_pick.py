"""The study's final mask, picked on a validation split of the calibration windows.

A search that scores masks on a few calibration windows overfits them: on SmolLM2-135M the held-out
perplexity of the best mask by search loss swings up to 30% with the calibration draw. With
``validation_samples`` the last windows of the draw are held out of the search
(:func:`optuna_prune.model.calibration.split_validation`); when the search ends, the ``pick_top`` best distinct
complete masks by search loss (whatever method made them) are scored on those windows, and the lowest
validation loss is the study's final pick, which ``show``, ``export --best`` and ``evaluate --best`` use.
Only calibration data takes part: the held-out test text never steers the choice.

Glue: reads trials (search side) and scores masks with a fitness (model side, imported when a mask
needs scoring). Optuna refuses to change a finished trial, so each candidate's validation loss lives
in the record, a study system attr written and read here only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.progress import progress_bar
from optuna_prune.run.config import PICK_BY
from optuna_prune.run.methods import space_of
from optuna_prune.search import compat
from optuna_prune.search.record import FINAL_PICK_KEY, study_problem, trial_dropped, trial_method

if TYPE_CHECKING:
    from optuna_prune.model.calibration import CalibrationSet
    from optuna_prune.run.config import SearchConfig

_logger = logging.getLogger(__name__)

def search_loss(trial: FrozenTrial) -> float:
    """A trial's loss on the search windows (the mean of its objectives: one per cluster in a
    multi-objective study)."""
    return float(np.mean(trial.values))


def top_masks(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The ``top`` distinct complete exact-k masks with the lowest search loss, each as its first
    trial with that loss, best first."""
    k = (study_problem(study) or {}).get("num_drop")
    best: dict[tuple[int, ...], FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        dropped = trial_dropped(t)
        if dropped is None or not t.values or (k is not None and len(dropped) != k):
            continue
        loss, mask = search_loss(t), tuple(dropped)
        if math.isfinite(loss) and (mask not in best or loss < search_loss(best[mask])):
            best[mask] = t
    return sorted(best.values(), key=lambda t: (search_loss(t), t.number))[:top]


def pick_final(
    study: optuna.Study, score: Callable[[tuple[int, ...]], float], top: int = 5,
    validation: dict[str, Any] | None = None, progress: bool = True,
) -> dict[str, Any] | None:
    """Score the study's ``top`` best masks with ``score`` (their validation loss), record the one with
    the lowest and return the record (None: no complete mask yet).

    Masks the study's previous pick scored on the same validation windows (``validation``: their
    ``n_samples`` and ``sha256``, recorded) are not scored again, so a resumed search only pays for
    the masks that entered the top since. Ties go to the lower search loss.
    """
    candidates = top_masks(study, top)
    if not candidates:
        return None
    validation = validation or {}
    previous = final_pick(study) or {}
    known: dict[tuple[int, ...], float] = {}
    if previous.get("validation_sha256") == validation.get("sha256"):
        known = {tuple(c["dropped"]): c["validation_loss"] for c in previous.get("candidates", [])}
    masks = {t.number: tuple(trial_dropped(t) or ()) for t in candidates}
    todo = [masks[t.number] for t in candidates if masks[t.number] not in known]
    if todo:
        bar = progress_bar(len(todo), "validation pick", "mask", enabled=progress)
        for mask in todo:
            known[mask] = float(score(mask))
            bar.update()
        bar.close()
    rows = [
        {"trial": t.number, "method": trial_method(t), "dropped": list(masks[t.number]),
         "search_loss": search_loss(t), "validation_loss": known[masks[t.number]]}
        for t in candidates
    ]
    chosen = min(rows, key=lambda r: (r["validation_loss"], r["search_loss"], r["trial"]))
    record = {
        **chosen, "top": top, "validation_samples": validation.get("n_samples"),
        "validation_sha256": validation.get("sha256"), "candidates": rows,
    }
    compat.study_storage(study).set_study_system_attr(compat.study_id(study), FINAL_PICK_KEY, record)
    _logger.info("final pick by validation loss: trial %d (%s) of the top %d masks, validation %.4f, search %.4f",
                 chosen["trial"], chosen["method"], len(rows), chosen["validation_loss"], chosen["search_loss"])
    return record


def pick_on_validation(
    study: optuna.Study, model: Any, validation: CalibrationSet, cfg: SearchConfig, progress: bool = True
) -> dict[str, Any] | None:
    """:func:`pick_final` with the search's fitness on the validation windows; its dense pass runs
    only when a mask needs scoring."""
    fitness = None

    def score(mask: tuple[int, ...]) -> float:
        nonlocal fitness
        # deferred: loads torch, transformers only when this runs
        from optuna_prune.model.fitness import NonFiniteLossError, make_fitness

        if fitness is None:
            fitness = make_fitness(cfg.fitness, model, validation, batch_size=cfg.batch_size,
                                   cache_bytes=cfg.cache_mb << 20, sub_blocks=space_of(cfg.space).record.sub_blocks, verify=False)
        try:
            return fitness.evaluate(mask).value
        except NonFiniteLossError:  # e.g. fp16 overflow: never the pick
            return math.inf

    meta = {"n_samples": validation.n_samples, "sha256": validation.sha256}
    return pick_final(study, score, top=cfg.pick_top, validation=meta, progress=progress)


def final_pick(study: optuna.Study) -> dict[str, Any] | None:
    """The study's recorded final pick (trial, method, dropped, both losses, the candidates), or None
    when it has no validation split or no complete mask yet."""
    return compat.study_storage(study).get_study_system_attrs(compat.study_id(study)).get(FINAL_PICK_KEY)


def picked_trial(study: optuna.Study, by: str = "validation") -> int | None:
    """The trial ``--best`` means when the study has a final pick and ``by`` is "validation"; None
    means the best by search loss."""
    if by not in PICK_BY:
        raise ValueError(f"unknown choice by {by!r}; use one of {', '.join(PICK_BY)}")
    pick = final_pick(study) if by == "validation" else None
    return None if pick is None else int(pick["trial"])
