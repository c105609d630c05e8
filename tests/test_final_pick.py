"""A validation split: the search never sees the held-out calibration windows, the final mask is the one
of the top distinct masks with the lowest loss on them, and show / export / evaluate --best use it."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from transformers import AutoModelForCausalLM

from optuna_prune.cli import main
from optuna_prune.model.calibration import (
    CalibrationSet,
    build_calibration,
    ids_sha256,
    split_validation,
)
from optuna_prune.model.fitness import plain_forward_loss
from optuna_prune.model.models import load_model
from optuna_prune.results.evaluation import evaluate_study
from optuna_prune.results.export import choose_trial, export_trial
from optuna_prune.run.config import ConfigError, SearchConfig, from_record, load_config
from optuna_prune.run.final_pick import final_pick, pick_final, top_masks
from optuna_prune.run.problem import StudyMismatchError
from optuna_prune.run.study import run_search

pytestmark = pytest.mark.filterwarnings("ignore")

# recorded_study's complete masks by search loss: trial 2 [1, 3] 10.8, trial 1 [3, 6] 10.9, trial 3 [2, 5] 11.0.
VALIDATION = {(1, 3): 5.0, (3, 6): 4.0, (2, 5): 1.0}


def tiny_config(checkpoint: Path, storage: str, **changes) -> SearchConfig:
    base = dict(
        model=str(checkpoint), drop=3, sampler="evop", calibration="pydoc", n_samples=3, seq_len=32,
        validation_samples=1, population=4, n_trials=8, seed=0, storage=storage, study="val", heartbeat=1,
    )
    base.update(changes)
    return SearchConfig(**base)


def counting(losses: dict[tuple[int, ...], float]):
    calls: list[tuple[int, ...]] = []

    def score(mask: tuple[int, ...]) -> float:
        calls.append(mask)
        return losses[mask]

    return score, calls


def add_duplicate(study: optuna.Study, dropped: list[int], value: float) -> None:
    names = [f"layer_{i:02d}" for i in range(8)]
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, value=value, params={n: int(i in dropped) for i, n in enumerate(names)},
        distributions={n: CategoricalDistribution([0, 1]) for n in names},
        user_attrs={"method": "random", "dropped": dropped, "n_dropped": len(dropped)},
    ))


def test_split_holds_the_last_windows_out_and_keeps_every_ccds_cluster():
    ids = torch.arange(5 * 4).view(5, 4)
    full = CalibrationSet(input_ids=ids, source="x", seed=3, sha256=ids_sha256(ids), cluster_ids=(0, 1, 0, 1, 0))
    search, validation = split_validation(full, 2)
    assert torch.equal(search.input_ids, ids[:3]) and torch.equal(validation.input_ids, ids[3:])
    assert search.cluster_ids == (0, 1, 0) and validation.cluster_ids == (1, 0)
    assert search.sha256 == ids_sha256(ids[:3]) != validation.sha256
    with pytest.raises(ValueError, match="1..4"):
        split_validation(full, 5)


def test_the_search_never_scores_the_validation_windows(tiny_checkpoint, tmp_path):
    """Every method of the study (SLEB, ShortGPT, EvoP) scores the same first windows only; the
    pick's validation loss is the plain forward loss on the held-out window."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    for sampler in ("sleb", "shortgpt", "evop"):
        study = run_search(tiny_config(tiny_checkpoint, storage, sampler=sampler,
                                       n_trials=8 if sampler == "evop" else None), progress=False)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert {t.user_attrs["method"] for t in complete} == {"sleb", "shortgpt", "evop"}
    assert all(len(t.user_attrs["per_sample"]) == 2 for t in complete)  # 3 windows, 1 held out

    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    drawn = build_calibration(tokenizer, "pydoc", n_samples=3, seq_len=32, seed=0)
    search, validation = split_validation(drawn, 1)
    assert study.user_attrs["problem"]["calibration_sha256"] == drawn.sha256  # the draw, split by the setting
    assert study.user_attrs["problem"]["validation_samples"] == 1
    best = min(complete, key=lambda t: t.value)
    assert best.value == pytest.approx(plain_forward_loss(model, search, best.user_attrs["dropped"]), rel=1e-4)

    pick = final_pick(study)
    rows = pick["candidates"]
    assert [r["trial"] for r in rows] == [t.number for t in top_masks(study, 5)]
    assert len({tuple(r["dropped"]) for r in rows}) == len(rows) == 5
    assert [r["search_loss"] for r in rows] == sorted(r["search_loss"] for r in rows)
    for r in rows:
        assert r["validation_loss"] == pytest.approx(plain_forward_loss(model, validation, r["dropped"]), rel=1e-4)
    chosen = min(rows, key=lambda r: r["validation_loss"])
    assert (pick["trial"], pick["dropped"], pick["validation_sha256"]) == (chosen["trial"], chosen["dropped"],
                                                                            validation.sha256)


def test_pick_takes_the_lowest_validation_loss_among_the_top_distinct_masks(recorded_study):
    add_duplicate(recorded_study, [1, 3], 10.8)  # trial 5: the best mask again, counted once
    score, calls = counting(VALIDATION)
    record = pick_final(recorded_study, score, top=2, progress=False)
    assert sorted(calls) == [(1, 3), (3, 6)]  # [2, 5] is outside the top 2 by search loss
    assert (record["trial"], record["dropped"]) == (1, [3, 6])  # not trial 2, the best by search loss
    assert (record["search_loss"], record["validation_loss"]) == (10.9, 4.0)
    assert [(c["trial"], c["validation_loss"]) for c in record["candidates"]] == [(2, 5.0), (1, 4.0)]
    assert final_pick(optuna.load_study(study_name="recorded", storage=recorded_study._storage)) == record

    # Resumed: scored masks are not scored again; a wider top scores only the new one.
    score, calls = counting(VALIDATION)
    assert pick_final(recorded_study, score, top=2, progress=False) == record and calls == []
    assert pick_final(recorded_study, score, top=3, progress=False)["trial"] == 3 and calls == [(2, 5)]


def test_show_export_and_evaluate_best_use_the_pick_unless_by_calibration(recorded_study, tmp_path, capsys):
    storage = recorded_study.user_attrs["config"]["storage"]
    pick_final(recorded_study, counting(VALIDATION)[0], top=2, progress=False)
    assert choose_trial(recorded_study).number == choose_trial(recorded_study, "best").number == 1
    assert choose_trial(recorded_study, by="calibration").number == 2
    assert choose_trial(recorded_study, 3).number == 3  # an explicit trial wins

    assert main(["show", "recorded", "--storage", storage]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("final pick: trial 1 (sleb), chosen by validation loss") for line in lines)
    assert any(line.split()[:4] == ["best", "by", "calibration", "evop"] for line in lines)
    assert any(line.split()[:4] == ["final", "pick", "sleb", "1"] and "4.0000" in line for line in lines)
    assert main(["show", "recorded", "--storage", storage, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["final_pick"]["trial"] == 1

    out = export_trial(recorded_study, None, tmp_path / "picked")
    card = (out / "README.md").read_text()
    assert "trial: 1" in card and "chosen by: validation loss 4.0000 on" in card
    argv = ["export", "recorded", "--storage", storage, "--best", "--by", "calibration", "--out", str(tmp_path / "c")]
    assert main(argv) == 0
    assert "trial: 2" in (tmp_path / "c" / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "c").config.num_hidden_layers == 6

    options = dict(datasets=[], tasks=[], speed=False)
    assert set(evaluate_study(recorded_study, **options)["evaluations"]) == {"dense", "trial-1"}
    assert "trial-2" in evaluate_study(recorded_study, by="calibration", **options)["evaluations"]


def test_a_study_without_validation_is_unchanged(recorded_study, capsys):
    storage = recorded_study.user_attrs["config"]["storage"]
    assert final_pick(recorded_study) is None
    assert choose_trial(recorded_study).number == choose_trial(recorded_study, by="calibration").number == 2
    assert main(["show", "recorded", "--storage", storage]) == 0
    assert "final pick" not in capsys.readouterr().out


def test_resume_with_another_split_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    run_search(tiny_config(tiny_checkpoint, storage, n_trials=4), progress=False)

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the mismatch was refused")

    monkeypatch.setattr("optuna_prune.model.models.load_model", no_model)
    with pytest.raises(StudyMismatchError, match="created with validation_samples=1, not 0; "):
        run_search(tiny_config(tiny_checkpoint, storage, validation_samples=0), progress=False)
    argv = ["search", "--model", str(tiny_checkpoint), "--drop", "3", "--calibration", "pydoc", "--n-samples", "3",
            "--seq-len", "32", "--storage", storage, "--study", "val", "--validation-samples", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("optuna-prune: error: study 'val' was created with validation_samples=1, not 2")
    assert err.count("\n") == 1


def test_as_many_validation_windows_as_samples_are_refused_from_flags_and_toml(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"validation_samples 3 must be in 0\.\.2 .*lower --validation-samples"):
        SearchConfig(drop=1, n_samples=3, validation_samples=3)
    with pytest.raises(ConfigError, match="needs 4 search windows"):
        SearchConfig(drop=1, n_samples=5, ccds_clusters=4, validation_samples=2)
    with pytest.raises(ConfigError, match="darwin"):
        SearchConfig(drop=1, sampler="darwin", n_samples=5, validation_samples=1)
    assert main(["search", "--drop", "1", "--n-samples", "2", "--validation-samples", "2",
                 "--storage", f"sqlite:///{tmp_path / 'never.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("optuna-prune: error: validation_samples 2 must be in 0..1") and err.count("\n") == 1
    assert not (tmp_path / "never.db").exists()

    toml = tmp_path / "val.toml"
    toml.write_text('drop = 2\nn_samples = 8\nvalidation_samples = 2\npick_top = 3\n')
    cfg = load_config(toml)
    assert (cfg.validation_samples, cfg.pick_top, cfg.search_samples) == (2, 3, 6)
    # Multi-fidelity stages double below the search windows, not the windows drawn.
    assert SearchConfig(drop=1, n_samples=4).fidelity_stages() == (1, 2)
    assert SearchConfig(drop=1, n_samples=4, validation_samples=2).fidelity_stages() == (1,)


def test_the_default_search_draws_ccds_windows_and_starts_from_sleb_or_holds_random_windows_out(tmp_path):
    """Unset, CCDS, the split and seed_with are auto: what robustness.py measured best where it can
    work, else off. CCDS windows are all searched, EvoP starting from SLEB's mask; random windows
    (CCDS off) hold 2 of 8 out for the pick."""
    default = SearchConfig(drop=1)
    assert (default.n_samples, default.ccds_clusters, default.validation_samples, default.seed_with) == (8, 4, 0, ["sleb"])
    assert {k: default.to_dict()[k] for k in ("ccds_clusters", "validation_samples", "seed_with")} == {
        "ccds_clusters": 4, "validation_samples": 0, "seed_with": ["sleb"]}

    def auto(**given) -> tuple[int, int, list[str]]:
        return auto_fields(SearchConfig(drop=1, **given))

    assert {n: auto(n_samples=n) for n in (1, 3, 4, 8)} == {1: (0, 0, []), 3: (0, 0, []), 4: (4, 0, ["sleb"]),
                                                           8: (4, 0, ["sleb"])}
    assert auto(ccds_clusters=0) == (0, 2, [])  # random windows: the pick on 2 held out
    assert auto(ccds_clusters=0, n_samples=7) == (0, 0, [])
    assert auto(sampler="levelswitch") == (4, 0, [])  # only EvoP starts from SLEB by default
    assert auto(sampler="darwin", ccds_clusters=0) == (0, 0, [])  # darwin trains its masks: no pick among untrained ones
    assert auto(space="sublayers") == (4, 0, ["sleb"])  # SLEB drops blocks too
    # What is given wins, and auto makes room for it.
    assert auto(ccds_clusters=0, validation_samples=0) == (0, 0, [])
    assert auto(seed_with=[]) == (4, 0, [])
    assert auto(ccds_clusters=0, seed_with=["sleb"]) == (0, 2, ["sleb"])
    assert auto(validation_samples=4) == (4, 4, ["sleb"])
    assert auto(validation_samples=5) == (0, 5, [])
    # replace() re-decides what was auto and keeps what was given; a record resumes as it was made.
    assert default.replace(n_samples=3).to_dict()["seed_with"] == [] and default.replace(n_samples=3).ccds_clusters == 0
    assert SearchConfig(drop=1, n_samples=8, ccds_clusters=0).replace(n_samples=12).ccds_clusters == 0
    assert from_record(default.to_dict(), "study").to_dict() == default.to_dict()
    old = {k: v for k, v in default.to_dict().items() if k not in ("ccds_clusters", "validation_samples", "seed_with")}
    assert auto_fields(from_record(old, "study")) == (0, 0, [])  # made before the auto fields: as it was
    toml = tmp_path / "old.toml"
    toml.write_text('drop = 2\nn_samples = 8\nccds_clusters = 0\nvalidation_samples = 0\nseed_with = []\n')
    assert auto_fields(load_config(toml)) == (0, 0, [])


def auto_fields(cfg: SearchConfig) -> tuple[int, int, list[str]]:
    return cfg.ccds_clusters, cfg.validation_samples, cfg.seed_with
