"""The study record: its readers and writers, and that one module spells its keys."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import optuna
import pytest

from optuna_prune.run.methods import SPACES
from optuna_prune.run.problem import default_study_name
from optuna_prune.search.record import (
    DROPPED_ATTR,
    METHOD_KEY,
    N_DROPPED_ATTR,
    problem_units,
    record_candidate,
    record_dropped,
    recorded_space,
    trial_dropped,
    trial_method,
    trial_worker,
    units_per_layer,
)

PACKAGE = Path(__file__).resolve().parents[1] / "optuna_prune"
PROBLEM = {"model": "org/tiny", "num_layers": 8, "num_drop": 3, "calibration": "pydoc", "ccds_clusters": 0,
           "fitness": "perplexity"}


def test_units_per_layer_of_each_space() -> None:
    assert units_per_layer(None) == units_per_layer("layers") == 1
    assert units_per_layer("sublayers") == 2
    assert units_per_layer("rates", 16) == 16
    with pytest.raises(ValueError, match="rate_resolution"):
        units_per_layer("rates")


def test_problem_units_and_the_study_name_count_the_same_units() -> None:
    blocks = {**PROBLEM, "space": "sublayers"}
    rates = {**PROBLEM, "space": "rates", "rate_resolution": 4}
    assert [problem_units(p) for p in (PROBLEM, blocks, rates)] == [8, 16, 32]
    assert default_study_name(PROBLEM) == "tiny-drop3of8-pydoc-perplexity"
    assert default_study_name(blocks) == "tiny-blocks3of16-pydoc-perplexity"
    assert default_study_name(rates) == "tiny-rates3of32-pydoc-perplexity"


def test_each_registered_space_records_what_its_readers_read_back() -> None:
    for name, kind in SPACES.items():
        problem = {**PROBLEM, **kind.record.problem_fields(rate_resolution=4)}
        assert recorded_space(problem) is kind.record, name
        assert problem.get("space") == kind.record.recorded_name  # layers: no key, as in old studies
    assert "space" not in {**PROBLEM, **SPACES["layers"].record.problem_fields(4)}
    assert recorded_space({**PROBLEM, "space": "rates", "rate_resolution": 4}).layer_mask is False
    assert recorded_space(None).unit == "layers" and recorded_space({"space": "sublayers"}).sub_blocks


def test_trial_readers_read_what_the_writers_wrote() -> None:
    study = optuna.create_study()
    trial = study.ask()
    record_candidate(trial, "evop")
    record_dropped(trial, (1, 3))
    study.tell(trial, 1.0)
    frozen = study.trials[0]
    assert frozen.user_attrs[DROPPED_ATTR] == [1, 3] and frozen.user_attrs[N_DROPPED_ATTR] == 2
    assert trial_dropped(frozen) == [1, 3]
    assert trial_worker(frozen) == f"{socket.gethostname()}:{os.getpid()}"
    assert trial_method(frozen) == "evop"


def test_the_samplers_tag_wins_over_the_objectives_and_a_default_fills_in() -> None:
    study = optuna.create_study()
    tagged, untagged = study.ask(), study.ask()
    study._storage.set_trial_system_attr(tagged._trial_id, METHOD_KEY, "sleb")
    record_candidate(tagged, "random")
    study.tell(tagged, 1.0)
    study.tell(untagged, 2.0)
    first, second = study.trials
    assert trial_method(first) == "sleb"
    assert trial_method(second) is None and trial_method(second, "unknown") == "unknown"


def test_only_the_record_module_spells_a_system_attr_key() -> None:
    spelled = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in PACKAGE.rglob("*.py") if path.name != "record.py"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"[\"']optuna_prune:", line)
    ]
    assert not spelled, f"system attr keys spelled outside optuna_prune/search/record.py: {spelled}"
