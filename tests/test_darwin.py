"""DarwinLM: the sampler's rounds and survivor schedule, the training-aware objective, and finetune."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from _toy import ToyLoss
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from optuna_prune.cli import main
from optuna_prune.model.layers import masked
from optuna_prune.run.config import ConfigError, SearchConfig
from optuna_prune.run.study import prepare
from optuna_prune.search.record import DARWIN_STAGES_ATTR, FINETUNE_ATTR
from optuna_prune.search.samplers.darwin import (
    DarwinSampler,
    Stage,
    check_survivors,
    stage_schedule,
)
from optuna_prune.search.space import LayerMaskSpace, SpaceError

pytestmark = pytest.mark.filterwarnings("ignore")
GENERATION = "DarwinSampler:generation"


# --- search side (toy objective, milliseconds) -----------------------------------------------------


def staged_toy_objective(space: LayerMaskSpace, toy: ToyLoss, n_stages: int):
    """Reports a stage loss at step = stage and stops when pruned, like DarwinObjective.

    Training helps some masks more than others (``bonus``), so the ranking changes with the stage.
    """
    bonus = np.random.RandomState(1).uniform(0, 0.3, size=space.num_layers)

    def objective(trial: optuna.Trial) -> float:
        params = {name: trial.suggest_categorical(name, [0, 1]) for name in space.param_names}
        dropped = space.dropped_from_params(params)
        assert space.is_valid(dropped), dropped
        loss = math.nan
        for s in range(n_stages):
            loss = toy(dropped) - s * float(bonus[list(dropped)].sum())
            trial.report(loss, step=s)
            if s < n_stages - 1 and trial.should_prune():
                trial.set_user_attr("stopped_early", True)
                raise optuna.TrialPruned()
        return loss

    return objective


def test_darwin_rounds_prune_per_survivor_schedule_and_keep_exact_k() -> None:
    space = LayerMaskSpace(12, 3)
    sampler = DarwinSampler(space, survivors=(8, 4, 2, 1), seed=0)
    assert sampler.n_stages == 3 and sampler.keep_fractions() == [0.5, 0.5]
    study = optuna.create_study(sampler=sampler, pruner=sampler.pruner())
    study.optimize(staged_toy_objective(space, ToyLoss(12, seed=3), 3), n_trials=32)
    trials = study.get_trials()
    assert all(space.is_valid(_mask(t, space)) for t in trials)
    assert len({_mask(t, space) for t in trials}) == len(trials)  # no mask twice
    assert Counter(t.system_attrs[GENERATION] for t in trials) == {g: 8 for g in range(4)}
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == list(range(len(steps)))
        if t.state == TrialState.COMPLETE:
            assert steps == [0, 1, 2] and t.value == t.intermediate_values[2]
        else:
            assert t.state == TrialState.PRUNED and steps[-1] < 2
    # Stage by stage fewer candidates go on; the first peers of a round are never judged alone.
    reached = [sum(s in t.intermediate_values for t in trials) for s in range(3)]
    assert reached[0] == 32 and reached[0] > reached[1] > reached[2] > 0
    # Every round's offspring are level switches of the best complete trial so far.
    for t in trials:
        if t.system_attrs[GENERATION] > 0:
            parent = study.trials[t.system_attrs["optuna_prune:parents"][0]]
            assert parent.state == TrialState.COMPLETE
            assert len(set(_mask(t, space)) - set(_mask(parent, space))) in (1, 2, 3)


def _mask(trial: optuna.trial.FrozenTrial, space: LayerMaskSpace) -> tuple[int, ...]:
    return tuple(trial.system_attrs["optuna_prune:mask"])


def test_survivor_schedule_is_validated_and_bound_to_the_study() -> None:
    assert check_survivors([16, 8, 4, 2, 1]) == (16, 8, 4, 2, 1)
    for bad in ([16, 8, 4, 2], [1], [4, 8, 1], [4, 0, 1]):
        with pytest.raises(ValueError, match="survivors"):
            check_survivors(bad)
    space = LayerMaskSpace(10, 2)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, sampler=DarwinSampler(space, survivors=(4, 2, 1)))
    study.optimize(staged_toy_objective(space, ToyLoss(10), 2), n_trials=2)
    other = DarwinSampler(space, survivors=(4, 1))
    resumed = optuna.load_study(study_name=study.study_name, storage=storage, sampler=other)
    with pytest.raises(SpaceError, match="survivors"):
        resumed.optimize(staged_toy_objective(space, ToyLoss(10), 1), n_trials=1)


def test_stage_schedule() -> None:
    assert stage_schedule([64, 100, 0], 32, 4) == (Stage(2, 1), Stage(4, 2), Stage(0, 4))
    assert stage_schedule([10, 20], 8, 5, samples=[3]) == (Stage(2, 3), Stage(3, 5))
    with pytest.raises(ValueError, match="one per stage"):
        stage_schedule([10, 20], 8, 5, samples=[1, 2])
    with pytest.raises(ConfigError, match="survivors"):
        SearchConfig(drop=2, sampler="darwin", survivors=[4, 2, 1], train_tokens=[10])
    with pytest.raises(ConfigError, match="objective_mode"):
        SearchConfig(drop=2, sampler="darwin", ccds_clusters=2, objective_mode="worst")


# --- model side (a tiny random Llama with SmolLM2's tokenizer) ------------------------------------


def tiny_darwin(checkpoint: Path, storage: str, study: str, **changes) -> SearchConfig:
    base = dict(
        model=str(checkpoint), drop=3, sampler="darwin", calibration="pydoc", n_samples=2, seq_len=32,
        survivors=[4, 2, 1], train_tokens=[64, 64], lr=1e-3, seed=0, storage=storage, study=study,
        heartbeat=1,
    )
    base.update(changes)
    return SearchConfig(**base)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_objective_trains_in_stages_restores_weights_and_does_not_leak(tiny_checkpoint, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'd.db'}"
    setup = prepare(tiny_darwin(tiny_checkpoint, storage, "seq"))
    pristine = _params(setup.model)
    space = setup.space
    for dropped in ((1, 2, 3), (4, 5, 6)):
        setup.study.enqueue_trial(space.to_params(dropped))
    setup.study.optimize(setup.objective, n_trials=2)
    after = _params(setup.model)
    assert all(torch.equal(pristine[n], after[n]) for n in pristine)

    first, second = setup.study.trials
    for t in (first, second):
        assert t.state == TrialState.COMPLETE and len(t.user_attrs["dropped"]) == 3
        stages = t.user_attrs[DARWIN_STAGES_ATTR]
        assert [s["train_tokens"] for s in stages] == [64, 128] and [s["samples"] for s in stages] == [1, 2]
        assert t.intermediate_values == {0: stages[0]["loss"], 1: stages[1]["loss"]}
        assert t.value == stages[1]["loss"] and t.user_attrs["perplexity"] == pytest.approx(math.exp(t.value))

    alone = prepare(tiny_darwin(tiny_checkpoint, storage, "alone"))
    alone.study.enqueue_trial(space.to_params((4, 5, 6)))
    alone.study.optimize(alone.objective, n_trials=1)
    assert alone.study.trials[0].value == second.value
    assert alone.study.trials[0].user_attrs[DARWIN_STAGES_ATTR] == second.user_attrs[DARWIN_STAGES_ATTR]


def test_search_prunes_offspring_and_finetune_saves_the_trained_model(tiny_checkpoint, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    cfg = tiny_darwin(tiny_checkpoint, storage, "tiny", train_tokens=[32, 32], n_trials=8, fitness="kl")
    setup = prepare(cfg)
    setup.study.optimize(setup.objective, n_trials=8)
    trials = setup.study.trials
    assert all(len(t.user_attrs["dropped"]) == 3 for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(list(t.intermediate_values) == [0] for t in pruned)
    assert all(len(t.user_attrs[DARWIN_STAGES_ATTR]) == 1 for t in pruned)
    assert Counter(t.system_attrs[GENERATION] for t in trials) == {0: 4, 1: 4}

    out = tmp_path / "trained"
    code = main([
        "finetune", "tiny", "--storage", storage, "--best", "--tokens", "96", "--out", str(out),
        "--loss", "lm", "--lr", "1e-3", "--eval", "pydoc", "--eval-windows", "2",
    ])
    assert code == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    entry = study.user_attrs[FINETUNE_ATTR][f"trial-{entry_trial(study)}"]
    assert entry["tokens"] == 96 and entry["train_loss"]["steps"] == 3
    assert set(entry["before"]["perplexity"]) == {"pydoc"}
    assert entry["after"]["calibration_perplexity"] != entry["before"]["calibration_perplexity"]

    # The same training done by hand gives the model the checkpoint holds.
    from optuna_prune.model.calibration import build_calibration
    from optuna_prune.model.models import load_model
    from optuna_prune.model.training import (
        MaskTraining,
        TrainSettings,
        token_data,
        training_windows,
    )

    model, tokenizer = load_model(str(tiny_checkpoint))
    calibration = build_calibration(tokenizer, "pydoc", n_samples=2, seq_len=32, seed=0)
    windows = training_windows(tokenizer, "pydoc", 96, 32, exclude=calibration.input_ids)
    with MaskTraining(model, entry["dropped"], token_data(model, windows, "lm"), TrainSettings("lm", lr=1e-3), keep=True) as run:
        run.train(len(windows))
    ids = calibration.input_ids
    with masked(model, entry["dropped"]), torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.num_hidden_layers == 8 - 3
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids, use_cache=False).logits, expected, atol=1e-5)
    assert "post-compression training" in (out / "README.md").read_text()


def entry_trial(study: optuna.Study) -> int:
    (key,) = study.user_attrs[FINETUNE_ATTR]
    return int(key.removeprefix("trial-"))
