"""The masks every search-side sampler proposes with a fixed seed stay the same across refactors.

``tests/golden_masks.json`` holds the sequences recorded before the samplers became an Optuna
plugin (pickling, fewer storage reads, ask-and-tell defaults). A change that alters a sequence
must be deliberate: regenerate with ``python tests/test_golden_masks.py`` and say why.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from _toy import ToyLoss, make_objective

from optuna_prune.search.samplers import (
    EvoPSampler,
    ExhaustiveMaskSampler,
    LevelSwitchSampler,
    RandomMaskSampler,
    SelfPrunerSampler,
    SLEBSampler,
    trial_mask,
)
from optuna_prune.search.samplers.darwin import DarwinSampler
from optuna_prune.search.space import LayerMaskSpace

GOLDEN = Path(__file__).with_name("golden_masks.json")
SPACE = LayerMaskSpace(12, 4, protected=[0])


def _fake_llm(messages: list[dict[str, str]], max_tokens: int, temperature: float, seed: int) -> str:
    """A deterministic "LLM": answers a list derived from the seed (sometimes a duplicate)."""
    return json.dumps([1 + (seed + 3 * i) % 11 for i in range(SPACE.num_drop)])


SAMPLERS: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
    "evop": lambda: EvoPSampler(SPACE, population_size=8, seed=0),
    "evop_two_point": lambda: EvoPSampler(SPACE, population_size=6, crossover="two_point", seed=3),
    "levelswitch": lambda: LevelSwitchSampler(SPACE, offspring=6, seed=1),
    "darwin": lambda: DarwinSampler(SPACE, survivors=(4, 2, 1), seed=2),
    "random": lambda: RandomMaskSampler(SPACE, seed=4),
    "exhaustive": lambda: ExhaustiveMaskSampler(SPACE),
    "sleb": lambda: SLEBSampler(SPACE, protect_ends=False),
    "selfpruner": lambda: SelfPrunerSampler(SPACE, _fake_llm, population_size=6, seed=5),
}
N_TRIALS = 40
UNSEEDED = {"exhaustive", "sleb"}  # no seed: their fallback-sampled floats are not recorded


def record(name: str) -> dict[str, Any]:
    """Run ``name``'s sampler on the toy objective; its masks and a fallback-sampled float."""
    sampler = SAMPLERS[name]()
    study = optuna.create_study(sampler=sampler)
    objective = make_objective(SPACE, ToyLoss(SPACE.num_layers, seed=7))

    def with_lr(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)  # not a mask param: fallback sampler
        return objective(trial) + 1e-6 * lr

    study.optimize(with_lr, n_trials=N_TRIALS)
    trials = study.get_trials(deepcopy=False)
    return {
        "masks": [list(trial_mask(t, SPACE) or ()) for t in trials],
        "lr": [
            round(t.params["lr"], 12) if "lr" in t.params and name not in UNSEEDED else None
            for t in trials
        ],
    }


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_gives_the_recorded_masks(name: str) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert record(name) == golden[name]


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    GOLDEN.write_text(json.dumps({n: record(n) for n in sorted(SAMPLERS)}, indent=None) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
