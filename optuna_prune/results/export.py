"""Ship a trial's mask: the pruned model as a plain Hugging Face checkpoint.

The study says everything needed: its recorded config names the model (and how it was loaded), its
problem the calibration set and sparsity, the trial the dropped layers and their score. The export is a
normal safetensors folder with an updated config, the tokenizer and a model card, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it with no custom code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.outputs import check_out_folder, output_folder
from optuna_prune.run.final_pick import final_pick, picked_trial
from optuna_prune.run.problem import config_of
from optuna_prune.run.summary import best_by_method
from optuna_prune.search.record import (
    METHOD_ATTR,
    PERPLEXITY_ATTR,
    recorded_space,
    study_problem,
    trial_dropped,
)


class TrialChoiceError(ValueError):
    """The trial asked for does not exist or has no complete exact-k mask to export or evaluate."""


def choose_trial(study: optuna.Study, trial: int | str | None = None, by: str = "validation") -> FrozenTrial:
    """The trial numbered ``trial``, or for None / ``"best"`` the study's final pick by validation loss
    (:mod:`optuna_prune.run.final_pick`; ``by="calibration"`` or a study without one: the best complete
    exact-k trial by search loss).

    Only COMPLETE trials that dropped exactly the study's k layers qualify: a PRUNED trial is a partial
    SLEB step or a candidate stopped early, whose mask or score is not the final one.
    """
    if (trial is None or trial == "best") and (picked := picked_trial(study, by)) is not None:
        trial = picked
    if trial is None or trial == "best":
        best = best_by_method(study)
        if not best:
            detail = "it is multi-objective; pass --trial N" if len(study.directions) > 1 else "it has none"
            raise TrialChoiceError(f"study {study.study_name!r} has no best complete trial: {detail}")
        trial = min(best.values(), key=lambda e: e["value"])["trial"]
    number = int(trial)
    trials = study.get_trials(deepcopy=False)
    found = next((t for t in trials if t.number == number), None)
    if found is None:
        raise TrialChoiceError(
            f"study {study.study_name!r} has no trial {number}; its trials are numbered 0..{len(trials) - 1}"
        )
    problem = study_problem(study) or {}
    k = problem.get("num_drop")
    dropped = trial_dropped(found)
    if found.state != TrialState.COMPLETE or dropped is None or (k is not None and len(dropped) != k):
        space = recorded_space(problem)
        if found.state != TrialState.COMPLETE:
            why = f"it is {found.state.name}" + (
                f" and drops {len(dropped)} of the study's {k} {space.unit}" if dropped is not None and k is not None
                and len(dropped) != k else ""
            )
        elif dropped is None:
            why = "it is COMPLETE but records no dropped layers"
        elif not space.layer_mask:
            why = f"it is a trial of space {space.name} ({space.unit}), not a layer mask"
        else:
            why = f"it is COMPLETE but drops {len(dropped)} of the study's {k} {space.unit}"
        raise TrialChoiceError(
            f"trial {number} of study {study.study_name!r} is not a complete exact-k mask: {why}; "
            "pick a COMPLETE trial (optuna-prune show lists the best ones) or use --best"
        )
    return found


def model_mask(study: optuna.Study, dropped: Sequence[int]) -> Sequence[int]:
    """A trial's stored ``dropped`` list as ``layers.masked`` and ``save_pruned`` read it: unit
    indices as :class:`~optuna_prune.model.layers.SubBlocks` in a sub-block study, else layer indices."""
    # deferred: loads torch, transformers only when this runs
    from optuna_prune.model.layers import SubBlocks

    if recorded_space(study_problem(study)).sub_blocks:
        return SubBlocks(dropped)
    return tuple(dropped)


def trial_card(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """What a model card should say about where a mask came from and how good it was."""
    problem = study_problem(study) or {}
    card: dict[str, Any] = {
        "source model": problem.get("model"),
        "study": study.study_name,
        "trial": trial.number,
        "method": trial.user_attrs.get(METHOD_ATTR),
        "sparsity": problem.get("sparsity"),
        "calibration": problem.get("calibration"),
        "calibration sha256": problem.get("calibration_sha256"),
        "calibration samples": f"{problem.get('n_samples')} x {problem.get('seq_len')} tokens",
        "fitness": problem.get("fitness"),
        "value (mean loss per token)": trial.values[0] if trial.values and len(trial.values) == 1 else trial.values,
    }
    if trial.user_attrs.get(PERPLEXITY_ATTR) is not None:
        card["calibration perplexity"] = round(trial.user_attrs[PERPLEXITY_ATTR], 4)
    pick = final_pick(study)
    if pick is not None and pick["trial"] == trial.number:
        card["chosen by"] = (f"validation loss {pick['validation_loss']:.4f} on {pick['validation_samples']} held-out "
                             f"calibration windows, the lowest of the top {len(pick['candidates'])} masks by search loss")
    return {k: v for k, v in card.items() if v is not None}


def export_trial(
    study: optuna.Study,
    trial_number: int | str | None = None,
    out_dir: str | Path = "pruned-model",
    device: str | None = "cpu",
    overwrite: bool = False,
    by: str = "validation",
) -> Path:
    """Write the model pruned by a trial's mask (default: the best trial, ``by`` as
    :func:`choose_trial` says) to ``out_dir``; return it.

    The model is loaded from the study's recorded config (its model and dtype; on the CPU by default,
    which saving needs no more than), pruned with ``layers.save_pruned`` and saved with its tokenizer and
    a model card listing the dropped layers, the source model and the search that chose them. An
    existing file or non-empty folder ``out_dir`` is refused unless ``overwrite``, which replaces it;
    the folder is written under a temporary name and renamed when complete. A
    sub-block study's half-dropped layers keep their shape with the dropped block's weights zeroed.
    """
    # deferred: loads safetensors, torch, transformers only when this runs
    from optuna_prune.model.layers import save_pruned
    from optuna_prune.model.models import load_model

    trial = choose_trial(study, trial_number, by)
    cfg = config_of(study)
    check_out_folder(out_dir, overwrite)  # before the model loads
    model, tokenizer = load_model(cfg.model, device=device, dtype=cfg.dtype)
    dropped = model_mask(study, trial_dropped(trial))
    with output_folder(out_dir, overwrite) as tmp:  # written whole or not at all
        save_pruned(model, dropped, tmp, tokenizer, trial_card(study, trial))
    return Path(out_dir)
