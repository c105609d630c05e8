"""Multi-fidelity selection: staged scoring and successive halving within EvoP generations."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import optuna
import pytest
from _toy import ToyLoss, ToySample, make_objective
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState, create_trial

from optuna_prune.run.config import ConfigError, SearchConfig
from optuna_prune.run.methods import seed_runs
from optuna_prune.search.pruners import (
    GenerationHalvingPruner,
    check_stages,
    default_stages,
    score_in_stages,
)
from optuna_prune.search.samplers import EvoPSampler, LevelSwitchSampler, trial_loss, trial_mask
from optuna_prune.search.space import LayerMaskSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

GEN_KEY = EvoPSampler._get_generation_key()
PARENT_PREFIX = EvoPSampler._get_parent_cache_key_prefix()
STAGES = (1, 2, 4)


def _study(space: LayerMaskSpace, *, storage=None, name=None, pruner_kwargs=None, **kwargs):
    sampler = EvoPSampler(space, **kwargs)
    sampler.poll_interval = 0.01
    return optuna.create_study(
        sampler=sampler,
        pruner=GenerationHalvingPruner(sampler, **(pruner_kwargs or {})),
        storage=storage,
        study_name=name,
        load_if_exists=name is not None,
    )


def _outranked(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t for t in study.trials if (t.user_attrs.get("stop_reason") or "").startswith("outranked")
    ]


# --- staged scoring ----------------------------------------------------------------------------


class _Pruner(optuna.pruners.BasePruner):
    """Prunes at a chosen step; records the steps it was asked about."""

    def __init__(self, at: int | None) -> None:
        self.at, self.asked = at, []

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        self.asked.append(trial.last_step)
        return trial.last_step == self.at


@pytest.mark.parametrize("prune_at", [None, 30])
def test_staged_scoring_reports_running_means_at_token_steps(prune_at: int | None) -> None:
    pruner = _Pruner(prune_at)
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    losses = [ToySample(10.0 * (i + 1), 10) for i in range(6)]  # per-sample means 1, 2, ..., 6
    score = score_in_stages(trial, iter(losses), n_samples=6, total_tokens=60, stages=(1, 3))
    reported = study._storage.get_trial(trial._trial_id).intermediate_values
    if prune_at is None:
        assert score.stopped is None and len(score.samples) == 6 and score.tokens == 60
        assert reported == {10: 1.0, 30: 2.0, 60: 3.5}  # stages, then the full mean
        assert pruner.asked == [10, 30]
    else:
        assert score.stopped.startswith("outranked") and len(score.samples) == 3
        assert reported == {10: 1.0, 30: 2.0}


def test_staged_scoring_stops_exactly_at_stop_above() -> None:
    study = optuna.create_study(pruner=_Pruner(None))
    trial = study.ask()
    losses = [ToySample(v, 1) for v in (1.0, 1.0, 9.0, 0.0)]
    # Lower bounds after each sample: 0.25, 0.5, 2.75: stop after the third, report its mean.
    score = score_in_stages(
        trial, iter(losses), n_samples=4, total_tokens=4, stages=(1,), stop_above=2.0
    )
    assert score.stopped == "cannot beat 2.0000" and score.loss_sum == 11.0
    assert study._storage.get_trial(trial._trial_id).intermediate_values == {1: 1.0, 3: 11.0 / 3}
    # A complete evaluation above the threshold is complete, not stopped.
    trial = study.ask()
    score = score_in_stages(trial, iter([ToySample(9.0, 1)]), n_samples=1, total_tokens=1,
                            stages=(), stop_above=2.0)
    assert score.stopped is None


@pytest.mark.parametrize("outcome", ["outranked", "bound cannot beat", "exact cannot beat", "goes on"])
def test_stages_rank_lower_bounds_and_only_survivors_compute_exact_losses(outcome: str) -> None:
    """With per-sample lower bounds, every stage reports the bounds' running mean; a candidate
    outranked there, or whose bounds already pass stop_above, never computes an exact loss. One
    that passes every stage is scored exactly, sample by sample, while stop_above stays in reach
    (the bounds of the samples not yet exact complete the lower bound)."""
    pruner = _Pruner(20 if outcome == "outranked" else None)
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    bounds = [ToySample(v, 10) for v in (5.0, 15.0, 0.0, 0.0)]
    consumed: list[int] = []

    def exact():
        for i, v in enumerate((10.0, 20.0, 30.0, 40.0)):
            consumed.append(i)
            yield ToySample(v, 10)

    stop_above = {"bound cannot beat": 0.4, "exact cannot beat": 1.0}.get(outcome)
    score = score_in_stages(trial, exact(), n_samples=4, total_tokens=40, stages=(2, 3),
                            stop_above=stop_above, bounds=iter(bounds))
    reported = study._storage.get_trial(trial._trial_id).intermediate_values
    if outcome == "goes on":
        assert score.stopped is None and consumed == [0, 1, 2, 3] and score.loss_sum == 100.0
        assert reported == {20: 1.0, 30: 20 / 30, 40: 2.5}  # the bounds' running means, then the exact mean
        assert pruner.asked == [20, 30]
    elif outcome == "exact cannot beat":  # lower bounds 25, 30, then 60 > 1.0 * 40 after the third exact loss
        assert consumed == [0, 1, 2] and score.stopped == "cannot beat 1.0000" and score.loss_sum == 60.0
        assert reported == {20: 1.0, 30: 20 / 30, 40: 1.5}
    else:  # 20 / 40 tokens > 0.4 after the second bound; outranked at the first stage
        assert consumed == [] and score.samples == [] and score.loss_sum == 20.0
        assert score.stopped.startswith(outcome.removeprefix("bound "))
        assert reported == {20: 1.0}


def test_stage_schedules_are_checked_and_default_to_doubling() -> None:
    assert [default_stages(n) for n in (1, 2, 4, 5, 8, 9)] == [
        (), (1,), (1, 2), (1, 2, 4), (1, 2, 4), (1, 2, 4, 8),
    ]
    assert SearchConfig(sparsity=0.2).fidelity_stages() == (1, 2, 4)  # 5 samples
    assert SearchConfig(sparsity=0.2, n_samples=4, sampler="levelswitch").fidelity_stages() == (1, 2)
    assert SearchConfig(sparsity=0.2, fidelity=[]).fidelity_stages() == ()  # "none"
    assert SearchConfig(sparsity=0.2, sampler="random").fidelity_stages() == ()
    worst = SearchConfig(sparsity=0.2, n_samples=4, ccds_clusters=2, objective_mode="worst")
    assert worst.fidelity_stages() == ()
    # The SLEB run that seeds EvoP on CCDS windows ranks on two clusters' windows, then one window per cluster.
    assert [r.fidelity_stages() for r in seed_runs(SearchConfig(sparsity=0.2, n_samples=8))] == [(2, 4)]
    assert [r.fidelity_stages() for r in seed_runs(SearchConfig(sparsity=0.2, n_samples=4))] == [(1, 2)]
    assert check_stages([1, 2, 4], 8) == (1, 2, 4)
    for bad in ([2, 1], [0, 1], [1, 1], [8]):
        with pytest.raises(ValueError):
            check_stages(bad, 8)
    with pytest.raises(ConfigError, match="fewer samples"):
        SearchConfig(sparsity=0.2, n_samples=4, fidelity=[2, 4])
    with pytest.raises(ConfigError, match="objective_mode"):
        SearchConfig(sparsity=0.2, n_samples=4, ccds_clusters=2, objective_mode="worst", fidelity=[1])
    with pytest.raises(ConfigError, match="fidelity_keep"):
        SearchConfig(sparsity=0.2, n_samples=4, fidelity=[1], fidelity_keep=0.0)


# --- the pruner's rule, on hand-made trials ------------------------------------------------------


def _add(study: optuna.Study, value: float | None, generation: int, state=TrialState.COMPLETE) -> int:
    trial = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"x": 0},
        distributions={"x": CategoricalDistribution([0, 1])},
        intermediate_values={} if value is None else {10: value},
        system_attrs={GEN_KEY: generation},
    )
    study.add_trial(trial)
    return study.trials[-1]._trial_id


def _candidate(value: float, generation: int = 1) -> FrozenTrial:
    return create_trial(
        state=TrialState.RUNNING, intermediate_values={10: value}, system_attrs={GEN_KEY: generation}
    )


def test_pruner_ranks_within_the_generation_after_min_peers() -> None:
    study = optuna.create_study()
    pruner = GenerationHalvingPruner(keep=0.5, min_peers=3, with_parents=False)
    _add(study, 1.0, 1)
    _add(study, 2.0, 1)
    assert not pruner.prune(study, _candidate(9.0))  # 2 peers < min_peers: never judged
    _add(study, 3.0, 1)
    _add(study, 4.0, 1)
    _add(study, 0.1, 0)  # another generation: no peer
    _add(study, 0.1, 1, TrialState.FAIL)  # failed: no peer
    _add(study, None, 1, TrialState.RUNNING)  # has not reached the step: no peer
    # 4 peers + itself = 5, keep ceil(2.5) = 3: rank 3 goes on, rank 4 stops.
    assert not pruner.prune(study, _candidate(2.5))
    assert pruner.prune(study, _candidate(3.5))
    assert not pruner.prune(study, _candidate(3.5, generation=2))  # no peers there
    no_generation = create_trial(state=TrialState.RUNNING, intermediate_values={10: 9.0})
    assert not pruner.prune(study, no_generation)  # not a GA member
    assert pruner.prune(study, _candidate(math.nan))


def test_pruner_counts_the_generations_parents() -> None:
    study = optuna.create_study()
    parents = [_add(study, v, 0) for v in (1.0, 1.1, 1.2)]
    study._storage.set_study_system_attr(study._study_id, f"{PARENT_PREFIX}1", parents)
    with_parents = GenerationHalvingPruner(keep=0.5, min_peers=3)
    without = GenerationHalvingPruner(keep=0.5, min_peers=3, with_parents=False)
    # The first offspring is judged against the parents at once: worse than all three, it stops.
    assert with_parents.prune(study, _candidate(2.0))
    assert not without.prune(study, _candidate(2.0))
    assert not with_parents.prune(study, _candidate(1.05))


def test_pruner_keep_per_stage_and_bad_arguments() -> None:
    study = optuna.create_study()
    for v in (1.0, 2.0, 3.0, 4.0):
        _add(study, v, 1)
    late = create_trial(
        state=TrialState.RUNNING, intermediate_values={5: 2.5, 10: 2.5}, system_attrs={GEN_KEY: 1}
    )
    # Its second report (stage 1): keep[1] = 0.2 of 5 -> only the best goes on.
    assert GenerationHalvingPruner(keep=[1.0, 0.2], with_parents=False).prune(study, late)
    assert not GenerationHalvingPruner(keep=[0.2, 1.0], with_parents=False).prune(study, late)
    for bad in (0.0, 1.5, []):
        with pytest.raises(ValueError, match="keep"):
            GenerationHalvingPruner(keep=bad)
    with pytest.raises(ValueError, match="min_peers"):
        GenerationHalvingPruner(min_peers=-1)


# --- EvoP with multi-fidelity, end to end on the toy ---------------------------------------------


def test_evop_prunes_within_generations_by_the_rule_and_generations_stay_full() -> None:
    space = LayerMaskSpace(16, 6)
    toy = ToyLoss(16, seed=3, n_samples=8)
    study = _study(space, population_size=10, seed=1, pruner_kwargs={"min_peers": 3})
    study.optimize(make_objective(space, toy, stages=STAGES), n_trials=80)
    trials = study.trials
    gens: dict[int, list[FrozenTrial]] = {}
    for t in trials:
        gens.setdefault(t.system_attrs[GEN_KEY], []).append(t)
    assert [len(gens[g]) for g in sorted(gens)] == [10] * 8  # neither stalled nor overfilled
    outranked = _outranked(study)
    assert outranked, "the pruner stopped nobody"
    attrs = study._storage.get_study_system_attrs(study._study_id)
    by_id = {t._trial_id: t for t in trials}
    for t in outranked:  # re-check each decision from storage (one worker: peers came before)
        step = t.last_step
        g = t.system_attrs[GEN_KEY]
        peers = [p for p in gens[g] if p.number < t.number]
        peers += [by_id[i] for i in attrs.get(f"{PARENT_PREFIX}{g}", ())]
        values = [p.intermediate_values[step] for p in peers if step in p.intermediate_values]
        assert len(values) >= 3
        better = sum(v < t.intermediate_values[step] for v in values)
        assert better >= math.ceil(0.5 * (len(values) + 1))
        assert t.state == TrialState.PRUNED and t.user_attrs["stopped_early"]
        assert trial_loss(t) == (t.intermediate_values[step], False)
    # The first min_peers members of generation 0 have nobody to be judged against.
    assert not {t.number for t in gens[0][:3]} & {t.number for t in outranked}
    # Parents are the best COMPLETE trials of (parents + generation); PRUNED ones never enter.
    for g in range(1, 8):
        chosen = [by_id[i] for i in attrs[f"{PARENT_PREFIX}{g}"]]
        assert all(p.state == TrialState.COMPLETE for p in chosen)
        pool = gens[g - 1] + [by_id[i] for i in attrs.get(f"{PARENT_PREFIX}{g - 1}", ())]
        complete = sorted(p.value for p in pool if p.state == TrialState.COMPLETE)
        assert sorted(p.value for p in chosen) == complete[: len(chosen)]


def test_multifidelity_spends_fewer_samples_and_still_finds_the_optimum() -> None:
    space = LayerMaskSpace(14, 5)
    toy = ToyLoss(14, seed=4, n_samples=8, jitter=0.3)
    optimum, _ = toy.optimum(space)
    study = _study(space, population_size=12, seed=0)
    study.optimize(make_objective(space, toy, stages=STAGES), n_trials=300)
    assert study.best_value == pytest.approx(optimum)
    scored = sum(t.user_attrs["samples_scored"] for t in study.trials)
    assert scored < 0.5 * 8 * len(study.trials)


def test_two_samplers_alternating_on_a_journal_prune_like_one(tmp_path: Path) -> None:
    space = LayerMaskSpace(12, 4)
    objective = make_objective(space, ToyLoss(12, seed=8, n_samples=8), stages=STAGES)
    reference = _study(space, population_size=6, seed=4)
    reference.optimize(objective, n_trials=36)

    path = str(tmp_path / "journal.log")
    a = _study(space, storage=JournalStorage(JournalFileBackend(path)), name="s", population_size=6, seed=4)
    b = _study(space, storage=JournalStorage(JournalFileBackend(path)), name="s", population_size=6, seed=4)
    for i in range(36):
        (a if i % 2 else b).optimize(objective, n_trials=1)

    def summary(study: optuna.Study) -> list[tuple]:
        return [(trial_mask(t, space), t.state, t.last_step) for t in study.trials]

    assert summary(b) == summary(reference)
    assert Counter(t.system_attrs[GEN_KEY] for t in b.trials) == {g: 6 for g in range(6)}
    assert _outranked(b)


def test_levelswitch_rounds_keep_the_parent_with_staged_selection() -> None:
    space = LayerMaskSpace(14, 5)
    toy = ToyLoss(14, seed=6, n_samples=8)
    sampler = LevelSwitchSampler(space, offspring=8, seed=0)
    # EvoPress-like: a quarter of a round's offspring continue at each stage.
    study = optuna.create_study(
        sampler=sampler, pruner=GenerationHalvingPruner(sampler, keep=0.25, min_peers=1)
    )
    study.optimize(make_objective(space, toy, stages=STAGES), n_trials=120)
    assert _outranked(study)
    key = LevelSwitchSampler._get_generation_key()
    assert Counter(t.system_attrs[key] for t in study.trials) == {r: 8 for r in range(15)}
    prefix = LevelSwitchSampler._get_parent_cache_key_prefix()
    attrs = study._storage.get_study_system_attrs(study._study_id)
    by_id = {t._trial_id: t for t in study.trials}
    values = [by_id[attrs[f"{prefix}{r}"][0]].value for r in range(1, 15)]
    assert values == sorted(values, reverse=True)  # the parent never gets worse


# --- configuration and a real (tiny) model --------------------------------------------------------


def test_cli_flags_and_toml_give_the_schedule(tmp_path: Path) -> None:
    from optuna_prune.cli import build_parser, search_config
    from optuna_prune.run.config import load_config

    args = build_parser().parse_args(
        ["search", "--sparsity", "0.2", "--n-samples", "8", "--fidelity", "1,2,4", "--fidelity-keep", "0.25"]
    )
    cfg = search_config(args)
    assert cfg.fidelity == [1, 2, 4] and cfg.fidelity_keep == 0.25
    args = build_parser().parse_args(["search", "--sparsity", "0.2", "--fidelity", "none"])
    assert search_config(args).fidelity == []
    path = tmp_path / "c.toml"
    path.write_text("sparsity = 0.2\nn_samples = 8\nfidelity = [1, 2]\n")
    assert load_config(path).fidelity == [1, 2]
    path.write_text("sparsity = 0.2\nfidelity = [1.5]\n")
    with pytest.raises(ConfigError, match="fidelity"):
        load_config(path)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("sampler", ["evop", "levelswitch"])
def test_run_search_scores_in_stages(tiny_checkpoint: Path, tmp_path: Path, sampler: str) -> None:
    from optuna_prune.run.study import run_search

    cfg = SearchConfig(
        model=str(tiny_checkpoint), drop=3, sampler=sampler, calibration="pydoc", n_samples=4,
        seq_len=32, population=6, n_trials=16, seed=0, storage=f"sqlite:///{tmp_path / 's.db'}",
        study="tiny", heartbeat=1, fidelity=[1, 2], ccds_clusters=0,  # 4 random windows: the stages' sizes
    )
    study = run_search(cfg, progress=False)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 16 and study.user_attrs["config"]["fidelity"] == [1, 2]
    assert isinstance(study.pruner, GenerationHalvingPruner)
    tokens = 31  # per sample: seq_len - 1 predicted tokens
    for t in trials:
        per_sample = t.user_attrs["per_sample"]
        steps = sorted(t.intermediate_values)
        assert steps == [tokens * n for n in (1, 2, 4)[: len(steps)]]
        if t.state == TrialState.COMPLETE:  # the stages ranked lower bounds of the exact running means
            assert steps[-1] == 4 * tokens and t.value == pytest.approx(sum(per_sample) / 4, abs=1e-5)
            assert t.value == pytest.approx(t.intermediate_values[steps[-1]])
            for n in (1, 2):
                assert t.intermediate_values[tokens * n] <= sum(per_sample[:n]) / n + 1e-6
        else:
            assert t.state == TrialState.PRUNED and t.user_attrs["stopped_early"]
            assert len(per_sample) < 4
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert study.user_attrs["best_by_method"][sampler]["value"] == min(
        t.value for t in trials if t.state == TrialState.COMPLETE
    )


def test_sleb_with_fidelity_ranks_candidates_within_their_step(tiny_model) -> None:
    """SLEB + stages: a greedy step is a generation; losers stop after a few samples, and every
    step still picks its best fully scored candidate."""
    import torch

    from optuna_prune.model.calibration import CalibrationSet
    from optuna_prune.model.fitness import PerplexityFitness
    from optuna_prune.run.objective import MaskObjective
    from optuna_prune.search.record import STEP_KEY
    from optuna_prune.search.samplers import SLEBSampler, sleb_result

    model = tiny_model("llama", num_layers=10)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet(input_ids=ids, source="random", seed=0, sha256="test")
    space = LayerMaskSpace(10, 3)

    def run(stages: tuple[int, ...]) -> tuple[optuna.Study, PerplexityFitness]:
        sampler = SLEBSampler(space)
        pruner = GenerationHalvingPruner(sampler, with_parents=False, min_peers=2) if stages else None
        study = optuna.create_study(sampler=sampler, pruner=pruner)
        fitness = PerplexityFitness(model, calibration)
        study.optimize(MaskObjective(fitness, space, "sleb", stages=stages), n_trials=200)
        return study, fitness

    _, exact_fitness = run(())
    study, fitness = run((1, 2))
    found = sleb_result(study)
    assert found is not None and len(found) == 3
    base: tuple[int, ...] = ()
    for step in range(3):
        trials = [t for t in study.trials if t.system_attrs.get(STEP_KEY) == step]
        assert all(set(base) < set(trial_mask(t, space)) for t in trials)
        scored = {trial_mask(t, space): trial_loss(t) for t in trials}
        exact = {m: loss for m, (loss, is_exact) in scored.items() if is_exact}
        assert len(exact) < len(trials)  # some candidates were outranked on fewer samples
        base = min(exact, key=exact.get)
    assert base == found
    outranked = [t for t in study.trials if t.user_attrs["stopped_early"]]
    assert outranked and all(len(t.user_attrs["per_sample"]) < 4 for t in outranked)
    assert fitness.layer_forwards < exact_fitness.layer_forwards
