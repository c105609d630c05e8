"""The method registry: every method declared once, its options its own, old study records still load."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from optuna_prune.cli import build_parser, search_config
from optuna_prune.run.config import ConfigError, SearchConfig, from_record
from optuna_prune.run.methods import (
    METHODS,
    SPACES,
    DarwinOptions,
    EvoPOptions,
    LevelSwitchOptions,
    MethodOptions,
    SLEBOptions,
    seed_methods,
)
from optuna_prune.run.study import default_budget, make_pruner, make_sampler, make_space

PACKAGE = Path(__file__).resolve().parents[1] / "optuna_prune"
NUM_LAYERS = 8

# What main recorded on a study before options had their own classes (`SearchConfig(...).to_dict()`
# at d7be664: every method's options, flat), with model and storage filled in by the test.
OLD_LEVELSWITCH_RECORD = {
    "model": "TINY", "drop": 2, "sampler": "levelswitch", "fitness": "perplexity", "calibration": "pydoc",
    "n_samples": 2, "seq_len": 32, "ccds_clusters": 0, "objective_mode": "mean", "seed": 0, "n_trials": 4,
    "storage": "STORAGE", "study": "old", "population": 4, "fidelity": [1], "fidelity_keep": 0.5,
    "train_tokens": [10000, 50000, 100000, 200000], "survivors": [16, 8, 4, 2, 1], "train_loss": "kl",
    "lr": 1e-05, "lora": 0, "llm": "local:smollm2-135m", "llm_timeout": 60.0, "space": "layers",
    "rate_resolution": 16, "protect_ends": True, "invalid_masks": "repair", "seed_with": [], "batch_size": 1,
    "cache_mb": 1024, "heartbeat": 1,
}
OLD_DARWIN_RECORD = {
    "model": "TINY", "drop": 2, "sampler": "darwin", "fitness": "perplexity", "calibration": "pydoc",
    "n_samples": 2, "seq_len": 32, "ccds_clusters": 0, "objective_mode": "mean", "seed": 0,
    "storage": "STORAGE", "study": "old", "fidelity_keep": 0.5, "train_tokens": [64, 64],
    "survivors": [4, 2, 1], "train_loss": "kl", "lr": 0.001, "lora": 0, "llm": "local:smollm2-135m",
    "llm_timeout": 60.0, "space": "layers", "rate_resolution": 16, "protect_ends": True,
    "invalid_masks": "repair", "seed_with": [], "batch_size": 1, "cache_mb": 1024, "heartbeat": 20,
}


def tiny(sampler: str, space: str = "layers", **changes) -> SearchConfig:
    base = dict(sampler=sampler, space=space, n_samples=4, seq_len=32)
    base.update(sparsity=0.25) if space == "rates" else base.update(drop=2)
    if sampler == "darwin":
        base.update(survivors=[4, 2, 1], train_tokens=[64, 64])
    return SearchConfig(**{**base, **changes})


def test_the_registry_lists_every_method_with_its_spaces() -> None:
    assert {name: m.spaces for name, m in METHODS.items()} == {
        "evop": ("layers", "sublayers"), "levelswitch": ("layers", "sublayers"), "darwin": ("layers",),
        "sleb": ("layers", "sublayers"), "shortgpt": ("layers",), "random": ("layers", "sublayers"),
        "tpe": ("layers", "sublayers"), "exhaustive": ("layers", "sublayers"),
        "selfpruner": ("layers", "rates"),
    }
    assert set(SPACES) == {"layers", "sublayers", "rates"}
    assert all(m.help and set(m.spaces) <= set(SPACES) for m in METHODS.values())
    single = {name for name, m in METHODS.items() if m.single_objective}
    assert single == {"levelswitch", "darwin", "sleb", "selfpruner"}


@pytest.mark.parametrize("name,space", [(n, s) for n, m in METHODS.items() for s in m.spaces])
def test_every_method_builds_its_sampler_pruner_and_budget_for_each_space(name: str, space: str) -> None:
    cfg = tiny(name, space)
    built = make_space(cfg, NUM_LAYERS)
    sampler = make_sampler(cfg, built)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    assert getattr(sampler, "space", built) is built
    pruner = make_pruner(cfg, sampler)
    staged = name in ("evop", "levelswitch", "darwin")  # by default: doubling counts, darwin's survivors
    assert (pruner is not None) == staged, pruner
    budget = default_budget(cfg, sampler)
    expected = {"sleb": None, "exhaustive": None, "shortgpt": 1}.get(name, "ten generations")
    if expected == "ten generations":
        assert budget.method == name and budget.n_trials == 10 * (getattr(sampler, "population_size", None) or 20)
    else:
        assert (budget and budget.n_trials) == expected


@pytest.mark.parametrize("name,space", [(n, s) for n, m in METHODS.items() for s in SPACES if s not in m.spaces])
def test_an_unsupported_space_is_one_line_naming_the_method(name: str, space: str) -> None:
    with pytest.raises(ConfigError, match=f"space = {space} works with") as err:
        tiny(name, space)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_a_seed_method_must_search_the_space_too() -> None:
    with pytest.raises(ConfigError, match="not with seed_with shortgpt"):
        tiny("evop", "sublayers", seed_with=["shortgpt"])
    assert tiny("evop", "sublayers", seed_with=["sleb"]).seed_with == ["sleb"]


def test_no_method_name_is_compared_outside_the_registry() -> None:
    names = "|".join(METHODS)
    patterns = [
        re.compile(r"""(sampler|method)[a-z_.]* (==|!=|in|not in) [("']"""),
        re.compile(rf"""["']({names})["'] *(==|!=|in\b|not in\b)"""),
        re.compile(rf"""(==|!=) *["']({names})["']"""),
    ]
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py")) if path.name != "methods.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(p.search(line) for p in patterns)
    ]
    assert not found, "method names compared outside optuna_prune/run/methods.py:\n" + "\n".join(found)


def test_no_space_name_is_compared_outside_the_registry_and_the_record() -> None:
    names = "|".join(SPACES)
    patterns = [
        re.compile(r"""space\b[\w.()"']* *(==|!=|in\b|not in\b) *[("'{]"""),
        re.compile(rf"""(==|!=) *["']({names})["']"""),
        re.compile(rf"""["']({names})["'] *(==|!=|in\b|not in\b|:)"""),
    ]
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py")) if path.name not in ("methods.py", "record.py")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(p.search(line) for p in patterns) and not line.lstrip().startswith("#")
    ]
    assert not found, "space names compared outside run/methods.py and search/record.py:\n" + "\n".join(found)


def test_options_belong_to_their_method_and_keep_the_flat_spelling() -> None:
    cfg = SearchConfig(drop=2, population=20, lr=1e-3)  # lr is darwin's: ignored, as it always was
    assert cfg.options == EvoPOptions(population=20) and cfg.population == 20
    with pytest.raises(AttributeError, match="lr is an option of darwin"):
        cfg.lr  # noqa: B018
    with pytest.raises(AttributeError, match="cfg.replace"):
        cfg.population = 3
    switched = cfg.replace(sampler="levelswitch")  # the options both have carry over
    assert switched.options == LevelSwitchOptions(population=20) and switched.options.offspring == 20
    assert cfg.replace(sampler="random").options == MethodOptions()
    assert cfg.to_dict()["population"] == 20 and "lr" not in cfg.to_dict()
    assert SearchConfig(drop=2, sampler="sleb", protect_ends=False).options == SLEBOptions(protect_ends=False)


def test_fidelity_means_what_its_method_says() -> None:
    assert tiny("evop").fidelity_stages() == (1, 2)  # pruner stages, doubling by default
    assert tiny("sleb").fidelity_stages() == ()  # off unless given
    assert tiny("sleb", fidelity=[1]).fidelity_stages() == (1,)
    darwin = tiny("darwin", fidelity=[1])  # darwin: samples scored after each training stage but the last
    assert darwin.options.fidelity == [1] and darwin.fidelity_stages() == ()
    with pytest.raises(ConfigError, match="one per stage"):
        tiny("darwin", fidelity=[1, 2], n_samples=4)


def test_option_errors_are_one_line_naming_the_fix() -> None:
    for bad, match in (
        (dict(sampler="evop", population=1), "population 1 must be >= 2"),
        (dict(sampler="levelswitch", fidelity_keep=0.0), "fidelity_keep"),
        (dict(sampler="darwin", population=8), "drop --population 8 or change --survivors"),
        (dict(sampler="darwin", train_loss="mse"), "unknown train_loss 'mse'; use one of kl, lm"),
        (dict(sampler="selfpruner", llm="gopher"), "llm"),
    ):
        with pytest.raises(ConfigError, match=match) as err:
            tiny(**bad)
        assert "\n" not in str(err.value)


def test_cli_flags_route_to_the_method_options() -> None:
    args = build_parser().parse_args([
        "search", "--drop", "2", "--sampler", "darwin", "--train-tokens", "64,64", "--survivors", "4,2,1",
        "--lr", "0.001", "--fidelity", "1", "--n-samples", "2", "--seq-len", "32",
    ])
    assert search_config(args).options == DarwinOptions(train_tokens=[64, 64], survivors=[4, 2, 1], lr=1e-3, fidelity=[1])
    args = build_parser().parse_args(["search", "--drop", "2", "--sampler", "sleb", "--no-protect-ends"])
    assert search_config(args).options == SLEBOptions(protect_ends=False)


def test_old_records_load_into_the_method_options() -> None:
    levelswitch = from_record(OLD_LEVELSWITCH_RECORD, origin="old study")
    assert levelswitch.options == LevelSwitchOptions(fidelity=[1], population=4)
    now = levelswitch.to_dict()
    added_since = {"validation_samples": 0, "pick_top": 5}  # settings newer than the record: their defaults
    assert {k: v for k, v in OLD_LEVELSWITCH_RECORD.items() if k in now} == {
        k: v for k, v in now.items() if k not in added_since
    }
    assert {k: now[k] for k in added_since} == added_since
    darwin = from_record({**OLD_DARWIN_RECORD, "retired_key": 1}, origin="old study")
    assert darwin.options == DarwinOptions(train_tokens=[64, 64], survivors=[4, 2, 1], lr=1e-3)


def test_a_study_recorded_by_the_old_config_resumes(tiny_checkpoint, tmp_path) -> None:
    from optuna_prune.run.budget import method_trials
    from optuna_prune.run.problem import config_of
    from optuna_prune.run.worker import create_study, run_worker
    from optuna_prune.search.samplers import LevelSwitchSampler

    storage = f"sqlite:///{tmp_path / 'old.db'}"
    record = {**OLD_LEVELSWITCH_RECORD, "model": str(tiny_checkpoint), "storage": storage}
    study = create_study(from_record(record, origin="old study"))
    study.set_user_attr("config", record)  # as the old code left it
    study = run_worker(storage, "old", n_trials=2)
    assert config_of(study).options == LevelSwitchOptions(fidelity=[1], population=4)
    stored = study._storage.get_study_system_attrs(study._study_id)[LevelSwitchSampler.config_key()]
    assert stored["population_size"] == 4  # the recorded lambda
    assert len(method_trials(study, "levelswitch", (optuna.trial.TrialState.COMPLETE,))) == 2
    assert study.user_attrs["config"] == record  # a worker leaves the record alone


def test_seeds_are_enqueued_in_the_order_they_always_were() -> None:
    """The method's own mask, then the dense pass's seeds (ShortGPT), then the study's (SLEB)."""
    order = lambda cfg: [origin for origin, _ in seed_methods(cfg)]  # noqa: E731
    assert order(tiny("evop", seed_with=["sleb", "shortgpt"])) == ["seed:shortgpt", "seed:sleb"]
    assert order(tiny("shortgpt", seed_with=["sleb", "shortgpt"])) == ["shortgpt", "seed:sleb"]
    assert order(tiny("sleb", seed_with=["sleb"])) == ["seed:sleb"]
    assert order(tiny("random")) == []
