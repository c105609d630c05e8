"""The study record: every attribute optuna-prune writes on studies and trials, and how to read it.

A study is the whole state of a search (see CONVENTIONS: "state lives in the study"), so its attribute
keys are a file format. They are spelled here and nowhere else; the rest of the package reads and
writes them through these names and the typed readers below, so a format change is one edit.

Search-side level: only the standard library and optuna, so samplers import it without torch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

# --- Study user attrs ------------------------------------------------------------------------
PROBLEM_ATTR = "problem"
"""What the study is bound to (model, k, calibration, fitness, space; see ``problem.problem_of``)."""
VERSIONS_ATTR = "versions"
"""The package versions of the process that created the study."""
CONFIG_ATTR = "config"
"""The ``SearchConfig.to_dict()`` of the last search or create (workers rebuild it)."""
CCDS_ATTR = "ccds"
"""The CCDS clustering of the calibration corpus, for the figures."""
BLOCK_INFLUENCE_ATTR = "block_influence"
"""ShortGPT's block influence per layer."""
BEST_BY_METHOD_ATTR = "best_by_method"
"""``{method: {"trial", "value", "dropped", "perplexity", "evaluations"}}`` (see ``summary.summarise``)."""
BEST_DROPPED_ATTR = "best_dropped"
"""The dropped units of the best trial over all methods."""
EVALUATIONS_ATTR = "evaluations"
"""``{"dense" | "trial-<N>": entry}`` of held-out evaluations (see ``evaluation.evaluate_study``)."""
FINETUNE_ATTR = "finetune"
"""``{"trial-<N>": entry}`` of post-compression trainings (see ``export.finetune_trial``)."""

# --- Trial user attrs (written by the objective; what a user inspects) --------------------------
METHOD_ATTR = "method"
"""The method that proposed the trial (a copy of ``METHOD_KEY`` the dashboard shows)."""
WORKER_ATTR = "worker"
"""``host:pid`` of the process that evaluates the trial."""
WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""This process's ``WORKER_ATTR``."""
DROPPED_ATTR = "dropped"
"""The units the objective dropped (after any repair), a sorted list of ints."""
N_DROPPED_ATTR = "n_dropped"
FAIL_REASON = "fail_reason"
"""Why a trial failed: the objective's exception, a stale heartbeat, a full budget."""
STOPPED_EARLY_ATTR = "stopped_early"
"""True when a PRUNED trial's loss is a lower bound (scoring stopped), False when it is exact."""
LAYER_FORWARDS_ATTR = "layer_forwards"
EVAL_SECONDS_ATTR = "eval_seconds"
PER_SAMPLE_ATTR = "per_sample"
PERPLEXITY_ATTR = "perplexity"
PER_CLUSTER_ATTR = "per_cluster"
INVALID_MASK_ATTR = "invalid_mask"
"""The mask a rejected candidate asked for (``invalid = "reject"``)."""
REPAIRED_FROM_ATTR = "repaired_from"
"""The mask (or units) a repaired candidate asked for."""
UNITS_ATTR = "units"
RATES_ATTR = "rates"
INTERMEDIATE_SIZES_ATTR = "intermediate_sizes"
MLP_SPARSITY_ATTR = "mlp_sparsity"
SEEDED_FROM_ATTR = "seeded_from"
"""On an enqueued seed: the method whose mask it is ("shortgpt", "sleb")."""
DARWIN_STAGES_ATTR = "darwin"
"""Per training stage of a darwin trial: tokens trained so far, samples scored, loss, training loss."""

# --- Trial system attrs (written by samplers and storages; how processes talk) -----------------
METHOD_KEY = "optuna_prune:method"
"""The method that proposed a trial ("evop", "random", "exhaustive", "sleb"), set in before_trial."""
STOP_ABOVE_KEY = "optuna_prune:stop_above"
"""A loss above which the candidate can no longer be selected: the objective may stop scoring."""
ALLOW_PARTIAL_KEY = "optuna_prune:allow_partial"
"""True when a sampler deliberately proposes fewer than k drops (SLEB's intermediate steps)."""
MASK_KEY = "optuna_prune:mask"
"""The dropped layers the sampler proposed (sorted list of ints)."""
SURPLUS_KEY = "optuna_prune:surplus"
"""True on a trial asked for after the search was exhausted (see ``MaskSampler._surplus``)."""
PARENTS_KEY = "optuna_prune:parents"
"""Numbers of the two trials an offspring was bred from (EvoP and its subclasses)."""
ORIGIN_KEY = "optuna_prune:origin"
"""How an EvoP-family candidate was made: "seed" (enqueued), "random" (generation 0), "offspring" or
"fallback"."""
STEP_KEY = "optuna_prune:sleb_step"
"""The greedy step (0-based) a SLEB candidate belongs to."""
LLM_KEY = "optuna_prune:llm"
"""``{"outcome", "attempts", "answer"}``: what Self-Pruner's LLM said for this trial."""
LEASE_KEY = "optuna_prune:lease"
"""On journal storage: when the trial's owner last renewed it (``time.time()``)."""
FIXED_PARAMS_KEY = "fixed_params"
"""Optuna's own: where ``enqueue_trial`` keeps the enqueued params."""


def sampler_config_key(method: str) -> str:
    """The study system attr holding the sampler config of the first run of ``method``."""
    return f"optuna_prune:{method}:config"


FINAL_PICK_KEY = "optuna_prune:final_pick"
"""Study system attr: the final mask picked by validation loss among the top masks (final_pick.py)."""


# --- Readers and writers ------------------------------------------------------------------------
def trial_method(trial: FrozenTrial, default: str | None = None) -> str | None:
    """The method that proposed ``trial``: its sampler's tag, else the objective's user attr."""
    return trial.system_attrs.get(METHOD_KEY, trial.user_attrs.get(METHOD_ATTR, default))


def trial_dropped(trial: FrozenTrial) -> list[int] | None:
    """The units the objective dropped for ``trial``, or None if it never got that far."""
    return trial.user_attrs.get(DROPPED_ATTR)


def record_candidate(trial: optuna.Trial, method: str) -> None:
    """Tag a trial the objective starts with its method and this process as its worker."""
    trial.set_user_attr(METHOD_ATTR, method)
    trial.set_user_attr(WORKER_ATTR, WORKER)


def record_dropped(trial: optuna.Trial, dropped: Sequence[int]) -> None:
    """Record the units a trial drops (and their count)."""
    trial.set_user_attr(DROPPED_ATTR, list(dropped))
    trial.set_user_attr(N_DROPPED_ATTR, len(dropped))


def trial_worker(trial: FrozenTrial) -> str | None:
    """``host:pid`` of the process that evaluates ``trial``, if its objective started."""
    return trial.user_attrs.get(WORKER_ATTR)


def study_problem(study: optuna.Study) -> dict[str, Any] | None:
    """The problem ``study`` is bound to, or None for a study optuna-prune did not make."""
    return study.user_attrs.get(PROBLEM_ATTR)


@dataclass(frozen=True)
class RecordedSpace:
    """What a problem's ``space`` key says about its masks: the units they count and how a reader
    names and applies them."""

    name: str
    """As recorded; a study that records no space searched whole layers (made before the others)."""
    unit: str
    """What ``num_drop`` counts, plural."""
    study_kind: str
    """Its word in default study names (``...-drop3of30-...``)."""
    per_layer: int | None = 1
    """Units per decoder layer; None: the problem's ``rate_resolution``."""
    sub_blocks: bool = False
    """The units are attention and MLP blocks, 2 per layer (``layers.SubBlocks``)."""
    layer_mask: bool = True
    """A trial's dropped units are a mask that export and evaluate apply (not width rates)."""

    @property
    def recorded_name(self) -> str | None:
        """The problem's ``space`` value: None for layers, as in studies made before spaces existed."""
        return None if self is LAYERS else self.name

    def problem_fields(self, rate_resolution: int | None = None) -> dict[str, Any]:
        """The keys this space adds to a study's problem."""
        if self.recorded_name is None:
            return {}
        return {"space": self.name, **({} if self.per_layer else {"rate_resolution": rate_resolution})}


LAYERS = RecordedSpace("layers", "layers", "drop")
SUB_BLOCKS = RecordedSpace("sublayers", "blocks", "blocks", per_layer=2, sub_blocks=True)
RATES = RecordedSpace("rates", "width units", "rates", per_layer=None, layer_mask=False)
RECORDED_SPACES: dict[str, RecordedSpace] = {s.name: s for s in (LAYERS, SUB_BLOCKS, RATES)}


def recorded_space(problem: Mapping[str, Any] | None) -> RecordedSpace:
    """The space a study's problem records (layers when it records none)."""
    return RECORDED_SPACES[(problem or {}).get("space") or LAYERS.name]


def units_per_layer(space: str | None, rate_resolution: int | None = None) -> int:
    """Mask units per decoder layer in a search space: a layer, its 2 blocks (attention and MLP), or
    ``rate_resolution`` width units of its MLP."""
    kind = RECORDED_SPACES[space or LAYERS.name]
    if kind.per_layer is not None:
        return kind.per_layer
    if not rate_resolution:
        raise ValueError(f"space {kind.name!r} needs its rate_resolution (units per layer)")
    return int(rate_resolution)


def problem_units(problem: Mapping[str, Any]) -> int:
    """How many units a problem's masks choose from: layers, blocks or width units."""
    return int(problem["num_layers"]) * units_per_layer(problem.get("space"), problem.get("rate_resolution"))
