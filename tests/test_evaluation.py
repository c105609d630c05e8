"""Evaluation compares the dense model with chosen trials, stores results in the study and reuses them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import optuna_prune.results.evaluation as evaluation
from optuna_prune.cli import main
from optuna_prune.results.evaluation import QUICK_LIMIT, EvalSettings, evaluate_study

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = EvalSettings(seq_len=16, max_windows=2, max_chars=4000, prompt_tokens=8, new_tokens=3, repeats=1)
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of the expensive measurements (they still run)."""
    calls = {"perplexity": 0, "downstream": 0, "speed": 0}

    def wrap(module, name, key):
        real = getattr(module, name)

        def counting(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    wrap(evaluation, "perplexity", "perplexity")
    wrap(evaluation, "downstream", "downstream")
    wrap(evaluation, "compare_speed", "speed")
    wrap(evaluation, "measure_speed", "speed")
    return calls


@pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"offline data not found at {DATA}")
def test_best_trial_against_dense_stored_in_the_study_and_json(recorded_study, tmp_path):
    out = tmp_path / "results.json"
    result = evaluate_study(recorded_study, datasets=["pydoc"], tasks=["arc_easy"], limit=2, data_dir=DATA,
                            settings=SMALL, out_json=out)
    evaluations = result["evaluations"]
    assert list(evaluations) == ["dense", "trial-2"]
    dense, best = evaluations["dense"], evaluations["trial-2"]
    assert best["label"] == "evop (trial 2)" and best["method"] == "evop" and best["dropped"] == [1, 3]
    assert dense["dropped"] == [] and dense["trial"] is None
    for entry in (dense, best):
        assert entry["perplexity"]["pydoc"] > 1
        assert entry["downstream"]["arc_easy"]["limit"] == 2 and 0 <= entry["downstream"]["arc_easy"]["acc"] <= 1
        assert entry["speed"]["prefill_ms"] > 0 and entry["speed"]["device"].startswith("cpu")
    assert dense["speed"]["decode_speedup"] == 1.0 and best["speed"]["decode_speedup"] > 0
    assert recorded_study.user_attrs["evaluations"] == evaluations
    assert json.loads(out.read_text())["evaluations"] == evaluations


def test_stored_parts_are_reused_and_new_settings_recomputed(recorded_study, counted):
    options = dict(datasets=["pydoc"], tasks=[], settings=SMALL)
    first = evaluate_study(recorded_study, trial=1, **options)
    assert counted == {"perplexity": 2, "downstream": 0, "speed": 1}  # dense + trial 1, one side-by-side timing
    again = evaluate_study(recorded_study, trial="best", **options)  # trial 2: only its own numbers are new
    assert counted == {"perplexity": 3, "downstream": 0, "speed": 2}
    assert again["evaluations"]["dense"] == first["evaluations"]["dense"]
    evaluate_study(recorded_study, trial=1, **options)
    assert counted == {"perplexity": 3, "downstream": 0, "speed": 2}  # all stored
    longer = EvalSettings(**{**SMALL.__dict__, "max_windows": 3})
    evaluate_study(recorded_study, trial=1, datasets=["pydoc"], tasks=[], settings=longer, speed=False)
    assert counted == {"perplexity": 5, "downstream": 0, "speed": 2}
    stored = recorded_study.user_attrs["evaluations"]
    assert set(stored) == {"dense", "trial-1", "trial-2"}
    assert stored["trial-1"]["settings"]["perplexity"]["max_windows"] == 3
    evaluate_study(recorded_study, trial=1, datasets=["pydoc"], tasks=[], settings=longer, speed=False,
                   recompute=True)
    assert counted == {"perplexity": 7, "downstream": 0, "speed": 2}
    assert set(recorded_study.user_attrs["evaluations"]) == {"dense", "trial-1", "trial-2"}


def test_cli_per_method_table_and_errors(recorded_study, tmp_path, capsys):
    storage = recorded_study.user_attrs["config"]["storage"]
    args = ["evaluate", "recorded", "--storage", storage, "--datasets", "pydoc", "--tasks", "", "--no-speed",
            "--seq-len", "16", "--max-windows", "2", "--max-chars", "4000"]
    out = tmp_path / "per-method.json"
    assert main([*args, "--per-method", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("dense", "evop (trial 2)", "sleb (trial 1)", "ppl pydoc"):
        assert row in table, row
    assert set(json.loads(out.read_text())["evaluations"]) == {"dense", "trial-1", "trial-2"}
    assert main([*args, "--trial", "0"]) == 2  # SLEB's partial step
    err = capsys.readouterr().err
    assert err.startswith("optuna-prune: error: trial 0") and err.count("\n") == 1


@pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"offline data not found at {DATA}")
def test_cli_shows_every_phase_with_time_left_and_quick_is_a_short_first_look(recorded_study, capsys, monkeypatch):
    storage = recorded_study.user_attrs["config"]["storage"]
    base = ["evaluate", "recorded", "--storage", storage, "--datasets", "pydoc", "--max-chars", "4000",
            "--data-dir", str(DATA), "--quick"]
    assert main([*base, "--seq-len", "16", "--tasks", "arc_easy", "--limit", "2"]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    quick = EvalSettings.quick()
    for label in ("dense", "evop (trial 2)"):  # every window set: done of total, elapsed<left
        assert re.search(rf"{re.escape(label)}: pydoc perplexity: 100%\|.*\| {quick.max_windows}/{quick.max_windows} "
                         r"\[\d\d:\d\d<\d\d:\d\d", err), err
        assert f"{label}: arc_easy (task 1 of 1, first 2 items)" in err
    assert re.search(r"Running loglikelihood requests: 100%\|.*\[\d\d:\d\d<\d\d:\d\d", err)  # each task's requests
    rounds = 2 * (1 + quick.repeats)  # dense and pruned, a warm-up and the repeats
    assert re.search(rf"speed: evop \(trial 2\) and dense: 100%\|.*\| {rounds}/{rounds} \[", err), err
    dense = recorded_study.user_attrs["evaluations"]["dense"]
    assert dense["settings"]["perplexity"]["seq_len"] == 16  # a flag given wins over --quick
    assert dense["settings"]["perplexity"]["max_windows"] == quick.max_windows
    assert dense["downstream"]["arc_easy"]["limit"] == 2

    limits = []

    def fake(model, tokenizer, tasks, limit=None, **kwargs):
        limits.append(limit)
        return {t: {"acc": 0.5, "acc_stderr": None, "limit": limit} for t in tasks}

    monkeypatch.setattr(evaluation, "downstream", fake)
    assert main([*base, "--tasks", "winogrande,piqa", "--no-speed", "--no-progress"]) == 0
    assert limits == [QUICK_LIMIT] * 4  # dense and trial 2, each task on its own
    assert capsys.readouterr().err == ""  # --no-progress: silent

    assert main(["evaluate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{quick.max_windows} windows of {quick.seq_len} tokens" in help_text
    assert f"first {QUICK_LIMIT} items of each task, {quick.repeats} speed repeats" in help_text
    assert "--limit N downstream tasks only" in help_text
