"""What a study found so far: the best mask of each method, and the trials still running.

Read by the CLI, the report, the figures, export and evaluation; :func:`summarise` writes the best
masks on the study when a search ends, for the dashboard.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from optuna.trial import TrialState

from optuna_prune.run.budget import FINISHED, method_trials
from optuna_prune.search.record import (
    BEST_BY_METHOD_ATTR,
    BEST_DROPPED_ATTR,
    DROPPED_ATTR,
    PERPLEXITY_ATTR,
    trial_dropped,
    trial_method,
)


def best_by_method(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """The best complete exact-k trial of each method (single-objective studies)."""
    best: dict[str, dict[str, Any]] = {}
    if len(study.directions) != 1:
        return best
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        method = trial_method(t, "unknown")
        if t.value is None or not math.isfinite(t.value):
            continue
        if method not in best or t.value < best[method]["value"]:
            best[method] = {
                "trial": t.number, "value": t.value, DROPPED_ATTR: trial_dropped(t),
                PERPLEXITY_ATTR: t.user_attrs.get(PERPLEXITY_ATTR),
            }
    for method, entry in best.items():
        entry["evaluations"] = len(method_trials(study, method, FINISHED))
    return best


def running_by_method(study: optuna.Study) -> dict[str, int]:
    """RUNNING trials per method: evaluations in progress, or left by a killed process until its
    heartbeat goes stale or the study is next opened. Never counted as evaluations."""
    running: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        method = trial_method(t, "unknown")
        running[method] = running.get(method, 0) + 1
    return running


def summarise(study: optuna.Study) -> dict[str, dict[str, Any]]:
    """Attach the best mask of each method to the study (user attrs + a dashboard note)."""
    best = best_by_method(study)
    if not best:
        return best
    study.set_user_attr(BEST_BY_METHOD_ATTR, best)
    overall = min(best.values(), key=lambda e: e["value"])
    study.set_user_attr(BEST_DROPPED_ATTR, overall[DROPPED_ATTR])
    lines = [
        f"# {study.study_name}", "",
        "| method | best trial | loss | perplexity | dropped layers | evaluations |",
        "|---|---|---|---|---|---|",
    ]
    for method, e in sorted(best.items(), key=lambda kv: kv[1]["value"]):
        ppl = f"{e[PERPLEXITY_ATTR]:.2f}" if e.get(PERPLEXITY_ATTR) else "-"
        lines.append(
            f"| {method} | {e['trial']} | {e['value']:.4f} | {ppl} | {e[DROPPED_ATTR]} | {e['evaluations']} |"
        )
    try:
        # deferred: loads optuna_dashboard only when this runs
        from optuna_dashboard import save_note

        save_note(study, "\n".join(lines))
    except Exception:  # the note is a convenience; the attrs above hold the same facts
        pass
    return best
