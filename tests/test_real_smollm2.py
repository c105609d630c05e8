"""Claims about quality, checked on the real SmolLM2-135M and real text (slow: run in CI)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from optuna_prune.model.calibration import CalibrationSet, build_calibration, eval_token_stream
from optuna_prune.model.fitness import PerplexityFitness, plain_forward_loss
from optuna_prune.model.models import load_model
from optuna_prune.run.objective import MaskObjective
from optuna_prune.search.samplers import SLEBSampler, sleb_result
from optuna_prune.search.space import LayerMaskSpace

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.is_dir(), reason=f"offline data not found at {DATA}"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_dense_perplexity_is_sane_and_middle_layers_are_cheap(smollm2):
    model, tokenizer = smollm2
    stream = eval_token_stream(tokenizer, "wikitext2", data_dir=DATA, max_chars=60_000)
    ids = stream[: 2 * 1024].view(2, 1024)
    windows = CalibrationSet(input_ids=ids, source="wikitext2-test", seed=0, sha256="-")
    fitness = PerplexityFitness(model, windows)
    dense = math.exp(fitness.dense_value)
    assert 15 < dense < 40, dense
    middle = fitness.evaluate((13, 14, 15, 16, 17, 18)).value
    first = fitness.evaluate((0,)).value
    assert math.exp(middle) < 5 * dense  # six middle layers cost some perplexity (~3.4x here)...
    assert first > middle + 1.0  # ...but far less than dropping layer 0 alone
    # The cached fitness equals the plain forward pass of the pruned model on real weights.
    assert middle == pytest.approx(plain_forward_loss(model, windows, (13, 14, 15, 16, 17, 18)), rel=1e-4)


def test_sleb_first_choice_matches_the_reference(smollm2):
    """The shared data README: SLEB on 4 x 256 tokens of C4 removes layer 17 first, and the first three
    choices do not depend on the windows' positions; 2 windows show it in half the time."""
    model, tokenizer = smollm2
    calibration = build_calibration(tokenizer, "c4", n_samples=2, seq_len=256, seed=0, data_dir=DATA)
    space = LayerMaskSpace(30, 1)
    fitness = PerplexityFitness(model, calibration)
    study = optuna.create_study(sampler=SLEBSampler(space))
    study.optimize(MaskObjective(fitness, space, "sleb"), n_trials=40)
    assert sleb_result(study) == (17,)
    # A stopped candidate's lower bound already exceeds the winner's loss: the early stop is exact.
    best = study.best_value
    for t in study.trials:
        if t.user_attrs.get("stopped_early"):
            assert t.intermediate_values[max(t.intermediate_values)] > best


def test_vocabulary_bound_is_tight_on_real_weights(smollm2):
    """1/16 of the head's rows bound a real mask's loss within a few percent, so a candidate 5% worse
    than what it must beat stops before any full LM head; a candidate that can win is exact."""
    model, tokenizer = smollm2
    calibration = build_calibration(tokenizer, "c4", n_samples=4, seq_len=256, seed=0, data_dir=DATA)
    fitness = PerplexityFitness(model, calibration)
    mask = (12, 13, 14, 15, 16, 17)
    exact = PerplexityFitness(model, calibration, bound_fraction=0).evaluate(mask).value
    doomed = fitness.evaluate(mask, stop_above=exact / 1.05)
    assert not doomed.complete and doomed.samples == ()
    assert exact / 1.05 < doomed.value <= exact
    fresh = PerplexityFitness(model, calibration)
    assert fresh.evaluate(mask, stop_above=exact * 1.001).value == pytest.approx(exact, rel=1e-6)
