"""Evaluate a study's masks against the dense model: perplexity, downstream accuracy, speed.

Reads the study, never a running search: the model comes from the study's recorded config, is loaded
once and masked in place for each trial. Results go back into the study as user attr ``"evaluations"``
(``{"dense" | "trial-<N>": entry}``, the schema the report module reads) and optionally to a JSON file.
Optuna refuses to change a finished trial's user attrs, so the study attr is where evaluations live.

Each part of an entry (one dataset's perplexity, one task's accuracy, the speed) is reused when it is
already stored under the same settings (``entry["settings"]``; a task's ``limit``), so the dense model is
measured once per study and a later call with more tasks runs only the new ones.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from optuna_prune.model.calibration import check_source
from optuna_prune.model.downstream import DEFAULT_TASKS, check_tasks, downstream
from optuna_prune.model.perplexity import perplexity
from optuna_prune.model.speed import compare_speed, measure_speed
from optuna_prune.outputs import check_out_file
from optuna_prune.results.export import TrialChoiceError, choose_trial, model_mask
from optuna_prune.run.config import ConfigError
from optuna_prune.run.problem import config_of
from optuna_prune.run.summary import best_by_method
from optuna_prune.search.record import (
    DROPPED_ATTR,
    EVALUATIONS_ATTR,
    METHOD_ATTR,
    PROBLEM_ATTR,
    study_problem,
    trial_dropped,
)

DEFAULT_DATASETS = ("wikitext2", "c4")
PER_METHOD = "best-per-method"
QUICK_LIMIT = 100
"""Items per downstream task in a quick first look (``optuna-prune evaluate --quick``)."""


@dataclass(frozen=True)
class EvalSettings:
    """How perplexity and speed are measured; a stored number is reused only under the same settings."""

    seq_len: int = 2048
    stride: int | None = None
    max_windows: int | None = None
    max_chars: int | None = None
    prompt_tokens: int = 256
    new_tokens: int = 32
    repeats: int = 5

    def perplexity(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "stride": self.stride, "max_windows": self.max_windows,
                "max_chars": self.max_chars}

    def speed(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "repeats": self.repeats}

    @classmethod
    def quick(cls) -> EvalSettings:
        """A first look in minutes on a CPU: 16 windows of 512 tokens per dataset (the shared data
        README's reference setting) instead of the whole evaluation split at 2048, 3 speed repeats."""
        return cls(seq_len=512, max_windows=16, repeats=3)


def chosen_trials(study: optuna.Study, trial: int | str | None = None, methods: str | None = None,
                  by: str = "validation") -> list[FrozenTrial]:
    """One trial (a number, or the best for None / "best", ``by`` as :func:`choose_trial` says), or
    with ``methods="best-per-method"`` the best trial of each method, best first."""
    if methods is None:
        return [choose_trial(study, trial, by)]
    if methods != PER_METHOD:
        raise TrialChoiceError(f"methods={methods!r} is not supported; use {PER_METHOD!r} or None")
    best = sorted(best_by_method(study).values(), key=lambda e: e["value"])
    return [choose_trial(study, e["trial"]) for e in best] if best else [choose_trial(study)]


def entry_key(trial: int | None) -> str:
    return "dense" if trial is None else f"trial-{trial}"


def _entry(stored: dict[str, Any], trial: FrozenTrial | None) -> dict[str, Any]:
    """The stored entry of the dense model or a trial, reset if it was made for another mask."""
    dropped = [] if trial is None else list(trial_dropped(trial))
    entry = dict(stored.get(entry_key(None if trial is None else trial.number)) or {})
    if entry.get(DROPPED_ATTR, dropped) != dropped:  # a study re-created under the same name
        entry = {}
    method = None if trial is None else trial.user_attrs.get(METHOD_ATTR)
    entry.update({
        "label": "dense" if trial is None else f"{method or 'trial'} (trial {trial.number})",
        METHOD_ATTR: method, "trial": None if trial is None else trial.number, DROPPED_ATTR: dropped,
    })
    for part in ("perplexity", "downstream", "settings"):
        entry[part] = dict(entry.get(part) or {})
    return entry


def evaluate_study(
    study: optuna.Study,
    trial: int | str | None = None,
    methods: str | None = None,
    datasets: Sequence[str] = DEFAULT_DATASETS,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    speed: bool = True,
    out_json: str | Path | None = None,
    settings: EvalSettings = EvalSettings(),
    device: str | None = None,
    batch_size: int = 1,
    recompute: bool = False,
    progress: bool = False,
    by: str = "validation",
) -> dict[str, Any]:
    """Evaluate the dense model and the chosen trial(s) of ``study``; store and return the results.

    ``trial`` picks one trial (a number, or the best for None / "best": the final pick unless ``by`` is
    "calibration"); ``methods="best-per-method"``
    evaluates the best trial of every method instead (for a table: dense, SLEB, EvoP, ...). ``data_dir``
    defaults to the study's; ``recompute`` ignores what is stored. ``progress`` shows a bar with the
    time left for every phase (each dataset's windows, each task's requests, the speed rounds). Returns
    ``{"study", "problem", "evaluations": {key: entry}}``, also written to ``out_json``.
    """
    # deferred: loads safetensors only when this runs
    from optuna_prune.model.models import load_model

    trials = chosen_trials(study, trial, methods, by)
    cfg = config_of(study)
    data_dir = data_dir if data_dir is not None else cfg.data_dir
    check_request(datasets, tasks, limit, data_dir, settings, batch_size, out_json)
    model, tokenizer = load_model(cfg.model, device=device or cfg.device, dtype=cfg.dtype)
    stored: dict[str, Any] = dict(study.user_attrs.get(EVALUATIONS_ATTR) or {})
    previous = {} if recompute else stored
    entries = [_entry(previous, None)] + [_entry(previous, t) for t in trials]

    def save(entry: dict[str, Any]) -> None:  # after every part, so an interrupted run keeps its work
        stored[entry_key(entry["trial"])] = entry
        study.set_user_attr(EVALUATIONS_ATTR, stored)

    ppl_settings = settings.perplexity()
    for entry in entries:
        if entry["settings"].get("perplexity") != ppl_settings:
            entry["perplexity"] = {}
        for dataset in datasets:
            if dataset not in entry["perplexity"]:
                entry["perplexity"][dataset] = perplexity(
                    model, tokenizer, dataset, data_dir=data_dir, dropped=model_mask(study, entry[DROPPED_ATTR]),
                    batch_size=batch_size, progress=f"{entry['label']}: {dataset} perplexity" if progress else None,
                    **ppl_settings,
                )
                entry["settings"]["perplexity"] = ppl_settings
                save(entry)
        todo = [t for t in tasks if t not in entry["downstream"] or entry["downstream"][t].get("limit") != limit]
        for n, task in enumerate(todo, 1):  # one task at a time: its own progress bar, stored when done
            if progress:
                print(f"{entry['label']}: {task} (task {n} of {len(todo)}, "
                      f"{'every item' if limit is None else f'first {limit} items'})", file=sys.stderr)
            entry["downstream"].update(downstream(
                model, tokenizer, [task], limit=limit, data_dir=data_dir, dropped=model_mask(study, entry[DROPPED_ATTR]),
                batch_size=batch_size, progress=progress,
            ))
            save(entry)
    if speed:
        masks = {entry_key(e["trial"]): model_mask(study, e[DROPPED_ATTR]) for e in entries}
        _measure_speeds(model, tokenizer, entries, masks, {**settings.speed(), "device": str(model.device)}, save,
                        progress)

    result = {
        "study": study.study_name,
        PROBLEM_ATTR: study_problem(study),
        EVALUATIONS_ATTR: {entry_key(e["trial"]): e for e in entries},
    }
    if out_json is not None:
        Path(out_json).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).expanduser().write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def check_request(
    datasets: Sequence[str], tasks: Sequence[str], limit: int | None, data_dir: str | Path | None,
    settings: EvalSettings, batch_size: int, out_json: str | Path | None,
) -> None:
    """Refuse, before the model loads, settings no evaluation can run with, naming the flag to fix."""
    bad = [
        (batch_size < 1, f"batch size {batch_size} must be >= 1; pass --batch-size 1 or more"),
        (settings.seq_len < 2, f"perplexity window of {settings.seq_len} tokens is too short; pass --seq-len 2 or more"),
        (settings.stride is not None and not 1 <= settings.stride <= settings.seq_len,
         f"stride {settings.stride} must lie in 1..seq_len ({settings.seq_len})"),
        (settings.max_windows is not None and settings.max_windows < 1,
         f"max_windows {settings.max_windows} must be >= 1; pass --max-windows 1 or more, or omit it for every window"),
        (settings.max_chars is not None and settings.max_chars < 1,
         f"max_chars {settings.max_chars} must be >= 1; pass --max-chars 1 or more, or omit it for the whole text"),
    ]
    for failed, message in bad:
        if failed:
            raise ConfigError(message)
    for dataset in datasets:
        check_source(dataset, "perplexity dataset")
    check_tasks(tasks, limit, data_dir)
    if out_json is not None:
        check_out_file(out_json)


def _measure_speeds(
    model: Any, tokenizer: Any, entries: list[dict[str, Any]], masks: dict[str, Sequence[int]],
    wanted: dict[str, Any], save: Callable[[dict[str, Any]], None], progress: bool = False,
) -> None:
    """Speed of each entry not yet measured under ``wanted``; a pruned mask is timed side by side with
    the dense model (``compare_speed``), whose numbers also fill the dense entry if it has none."""
    options = {k: v for k, v in wanted.items() if k != "device"}

    def record(entry: dict[str, Any], numbers: dict[str, Any], prefill: float, decode: float, where: str) -> None:
        entry["speed"] = {"prefill_ms": numbers["prefill_ms"], "decode_tokens_per_s": numbers["decode_tokens_per_s"],
                          "prefill_speedup": prefill, "decode_speedup": decode, "device": where}
        entry["settings"]["speed"] = wanted
        save(entry)

    dense, *pruned = entries
    for entry in pruned:
        if entry["settings"].get("speed") != wanted:
            both = compare_speed(model, tokenizer, masks[entry_key(entry["trial"])], **options,
                                 progress=f"speed: {entry['label']} and dense" if progress else None)
            record(entry, both["pruned"], both["prefill_speedup"], both["decode_speedup"], both["device"])
            if dense["settings"].get("speed") != wanted:
                record(dense, both["dense"], 1.0, 1.0, both["device"])
    if dense["settings"].get("speed") != wanted:
        alone = measure_speed(model, tokenizer, (), **options, progress="speed: dense" if progress else None)
        record(dense, alone, 1.0, 1.0, alone["device"])

