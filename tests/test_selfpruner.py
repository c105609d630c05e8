"""Self-Pruner: the LLM's answers are parsed strictly, repaired, deduplicated, and fall back to the GA."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from optuna_prune.search.rate_space import RateSpace
from optuna_prune.search.record import LLM_KEY, ORIGIN_KEY
from optuna_prune.search.samplers import SelfPrunerSampler, llm_stats, trial_mask
from optuna_prune.search.samplers.selfpruner import COUNTER_PREFIX, first_int_list
from optuna_prune.search.space import LayerMaskSpace
from tests._toy import ToyLoss, make_objective

pytestmark = pytest.mark.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)


class ScriptedLLM:
    """Answers from a script (strings, errors to raise, or LLM functions); records every question."""

    def __init__(self, answers: Iterable[str | Callable[..., str] | Exception]) -> None:
        self.answers = list(answers)
        self.questions: list[list[dict]] = []

    def complete(self, messages, max_tokens, temperature, seed):  # noqa: ANN001, ANN201
        self.questions.append(messages)
        answer = self.answers[min(len(self.questions) - 1, len(self.answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer(messages, max_tokens, temperature, seed) if callable(answer) else answer


def random_answer(space: LayerMaskSpace) -> Callable[..., str]:
    """A plain-function LLM that proposes a random valid mask, seeded by the call's seed."""

    def complete(messages, max_tokens, temperature, seed):  # noqa: ANN001, ANN202
        return "Here: " + json.dumps(sorted(random.Random(seed).sample(space.droppable, space.num_drop)))

    return complete


def counters(study: optuna.Study) -> dict[str, int]:
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return {k[len(COUNTER_PREFIX):]: v for k, v in attrs.items() if k.startswith(COUNTER_PREFIX + "llm_")}


def run(space: LayerMaskSpace, llm, n_trials: int, toy: ToyLoss | None = None, **kwargs) -> optuna.Study:  # noqa: ANN001
    sampler = SelfPrunerSampler(space, llm, seed=0, **kwargs)
    study = optuna.create_study(sampler=sampler)
    study.optimize(make_objective(space, toy or ToyLoss(space.num_layers)), n_trials=n_trials)
    return study


@pytest.mark.parametrize(("text", "parsed"), [
    ("[3, 1, 2]", [3, 1, 2]),
    ("Sure! The layers are [4, 5] and then [6]", [4, 5]),
    ("```json\n[7, 8]\n```", [7, 8]),
    ("[]", []),
    ("no list here", None),
    ("[1, 2,", None),  # cut off
    ("[1, 2.5]", None),
    ("[1, true]", None),
    ("[[1, 2]]", None),
    ('["1", "2"]', None),
    ("layers [a] then [1, 2]", None),  # only the first array counts
])
def test_answers_are_parsed_strictly(text, parsed):
    assert first_int_list(text) == parsed


def test_valid_answers_are_used_and_counted():
    space = LayerMaskSpace(12, 3)
    study = run(space, random_answer(space), n_trials=12, population_size=4)
    trials = study.get_trials()
    assert all(t.system_attrs[ORIGIN_KEY] == "llm" for t in trials)
    assert all(t.system_attrs[LLM_KEY]["outcome"] == "ok" for t in trials)
    masks = [trial_mask(t, space) for t in trials]
    assert len(set(masks)) == 12 and all(space.is_valid(m) for m in masks)
    assert counters(study) == {"llm_ok": 12}
    assert llm_stats(study)["llm"] == 12
    assert {t.system_attrs["SelfPrunerSampler:generation"] for t in trials} == {0, 1, 2}


def test_wrong_counts_and_protected_layers_are_repaired():
    space = LayerMaskSpace(10, 3, protected=(0, 9))
    llm = ScriptedLLM(["[0, 4, 5, 6, 9]", "[2]", "[1, 2, 3, 4, 5, 6]"])
    study = run(space, llm, n_trials=3, population_size=3)
    for t, asked in zip(study.get_trials(), ({4, 5, 6}, {2}, {1, 2, 3, 4, 5, 6}), strict=True):
        mask = trial_mask(t, space)
        assert space.is_valid(mask) and t.system_attrs[ORIGIN_KEY] == "llm"
        assert t.system_attrs[LLM_KEY]["outcome"] == "repaired"
        assert set(mask) <= asked or asked <= set(mask)  # repair only adds or removes
    assert counters(study) == {"llm_ok": 3, "llm_repaired": 3}


def test_unparseable_answers_get_one_retry_then_fall_back():
    space = LayerMaskSpace(12, 3)
    bad = ["I think layers 3 and 4.", "[1, 1, 2]", "[1, 2, 99]", "[1.0, 2.0, 3.0]"]
    llm = ScriptedLLM(bad)
    study = run(space, llm, n_trials=8, population_size=4)
    trials = study.get_trials()
    assert all(space.is_valid(trial_mask(t, space)) for t in trials)
    assert all(t.system_attrs[ORIGIN_KEY] == "fallback" for t in trials)
    assert all(t.system_attrs[LLM_KEY] == {"outcome": "unparseable", "attempts": 2, "answer": bad[-1]}
               for t in trials[2:])
    assert counters(study) == {"llm_fallback": 8, "llm_unparseable": 8}
    assert len(llm.questions) == 16  # two tries per trial
    retry = llm.questions[1]
    assert retry[-2] == {"role": "assistant", "content": bad[0]}
    assert "JSON list of 3 integers" in retry[-1]["content"]
    # Generation 1 was bred by EvoP's operators from generation 0's parents.
    assert all(t.system_attrs.get("optuna_prune:parents") for t in trials[4:])


def test_duplicates_are_refused_then_fall_back():
    space = LayerMaskSpace(12, 3)
    llm = ScriptedLLM(["[2, 5, 7]"])  # always the same list
    study = run(space, llm, n_trials=4, population_size=4)
    outcomes = [t.system_attrs[LLM_KEY]["outcome"] for t in study.get_trials()]
    assert outcomes == ["ok", "duplicate", "duplicate", "duplicate"]
    assert len({trial_mask(t, space) for t in study.get_trials()}) == 4
    assert "tried already" in llm.questions[2][-1]["content"]
    assert counters(study) == {"llm_ok": 1, "llm_fallback": 3, "llm_duplicate": 3}


def test_llm_errors_fall_back_and_stop_asking_after_max_errors():
    space = LayerMaskSpace(12, 3)
    llm = ScriptedLLM([ConnectionError("refused")])
    study = run(space, llm, n_trials=6, population_size=3, max_errors=3)
    assert len(llm.questions) == 3  # then the sampler stops calling it
    assert all(t.system_attrs[ORIGIN_KEY] == "fallback" for t in study.get_trials())
    assert study.get_trials()[0].system_attrs[LLM_KEY]["answer"] == "ConnectionError: refused"
    assert counters(study) == {"llm_fallback": 6, "llm_error": 6}


def test_prompt_shows_the_best_history_best_last():
    space = LayerMaskSpace(14, 3)
    llm = ScriptedLLM([random_answer(space)])
    study = run(space, llm, n_trials=16, population_size=8, history=5)
    system, *turns, request = llm.questions[-1]
    assert "14-layer" in system["content"] and "3 different integers from 0 to 13" in system["content"]
    assert "combine them" in request["content"]
    shown = [json.loads(m["content"]) for m in turns if m["role"] == "assistant"]
    losses = [float(x) for x in re.findall(r"Loss (\d+\.\d+)", " ".join(m["content"] for m in turns[1:] + [request]))]
    assert len(shown) == 5 and len(losses) == 5
    assert losses == sorted(losses, reverse=True)  # worst first, best just before the request
    finished = sorted(t.value for t in study.get_trials()[:15] if t.state == TrialState.COMPLETE)
    assert losses[-1] == pytest.approx(finished[0], abs=1e-4)
    # Generation 0 asks for something new and shows what was proposed so far.
    first_gen = llm.questions[3]
    assert "different from those above" in first_gen[-1]["content"]
    assert len([m for m in first_gen if m["role"] == "assistant"]) == 3


def test_same_seed_same_search():
    space = LayerMaskSpace(12, 3)
    a = [trial_mask(t, space) for t in run(space, random_answer(space), 10, population_size=4).trials]
    b = [trial_mask(t, space) for t in run(space, random_answer(space), 10, population_size=4).trials]
    assert a == b


def test_rates_space_search():
    space = RateSpace(6, 10, resolution=4)  # units 0..3 per layer, 10 in total: mean rate 10/24

    def answer(messages, max_tokens, temperature, seed):  # noqa: ANN001, ANN202
        rng = random.Random(seed)
        units = [rng.randint(0, 3) for _ in range(6)]  # often the wrong total: repaired
        return json.dumps(units) if seed % 5 else "[9, 9]"

    toy = ToyLoss(space.num_layers)
    llm = ScriptedLLM([answer])
    sampler = SelfPrunerSampler(space, llm, population_size=4, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        units = [trial.suggest_int(n, 0, space.max_units) for n in space.param_names]
        assert sum(units) == 10
        return toy(space.from_units(units))

    study.optimize(objective, n_trials=12)
    assert len({tuple(t.params.values()) for t in study.trials}) == 12
    stats = llm_stats(study)
    assert stats["llm"] + stats["fallback"] == 12 and stats["llm"] > 0
    system = llm.questions[0][0]["content"]
    assert "6-layer" in system and "0 to 3 parts" in system and "sum to 10" in system
    assert all(len(json.loads(m["content"])) == 6 for m in llm.questions[-1] if m["role"] == "assistant")


def test_rates_space_small_enough_to_exhaust():
    space = RateSpace(3, 2, resolution=2, max_units=1)  # 3 candidates: (1,1,0), (1,0,1), (0,1,1)
    study = optuna.create_study(sampler=SelfPrunerSampler(space, lambda *a, **k: "[1, 1, 0]", seed=0))
    study.optimize(lambda t: float(sum(t.suggest_int(n, 0, 1) * i for i, n in enumerate(space.param_names))),
                   n_trials=5)
    seen = {tuple(t.params.values()) for t in study.trials if not t.system_attrs.get("optuna_prune:surplus")}
    assert seen == {(1, 1, 0), (1, 0, 1), (0, 1, 1)}


def test_search_with_an_http_llm_end_to_end(tiny_checkpoint, tmp_path):
    """``optuna-prune search --sampler selfpruner --llm http://...`` on a tiny model."""
    from optuna_prune.cli import main
    from optuna_prune.run.problem import load_existing_study
    from tests._chat_server import ChatServer

    def respond(body: dict) -> str:
        k = int(re.search(r"which (\d+) of", body["messages"][0]["content"]).group(1))
        return json.dumps(random.Random(body["seed"]).sample(range(1, 7), k))

    server = ChatServer(respond)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with server.running():
        code = main([
            "search", "--model", str(tiny_checkpoint), "--drop", "2", "--sampler", "selfpruner",
            "--llm", server.url, "--llm-model", "stub", "--calibration", "pydoc", "--n-samples", "2",
            "--seq-len", "16", "--population", "2", "--n-trials", "4", "--storage", storage,
            "--study", "sp", "--no-progress",
        ])
    assert code == 0
    study = load_existing_study("sp", storage)
    assert [t.user_attrs["method"] for t in study.trials] == ["selfpruner"] * 4
    assert llm_stats(study)["llm"] >= 2 and server.requests[0]["model"] == "stub"
    assert study.user_attrs["best_by_method"]["selfpruner"]["evaluations"] == 4


@pytest.mark.slow
def test_real_smollm2_as_the_llm():
    """SmolLM2-135M-Instruct breeds masks of a 30-layer toy problem; every proposal is exact-k.

    Prints how many candidates came from the LLM and how many from the genetic fallback.
    """
    from optuna_prune.model.llm import TransformersChat

    space = LayerMaskSpace(30, 6, protected=(0, 29))
    start = time.perf_counter()
    study = run(space, TransformersChat("smollm2-135m", device="cpu"), n_trials=8, population_size=4)
    stats = llm_stats(study)
    masks = [trial_mask(t, space) for t in study.trials]
    assert all(space.is_valid(m) for m in masks) and len(set(masks)) == 8
    assert stats["llm"] + stats["fallback"] == 8
    print(f"\nSmolLM2 as Self-Pruner LLM: {stats} ({stats['llm']}/8 from the LLM) "
          f"in {time.perf_counter() - start:.1f} s")
    assert np.isfinite(study.best_value)
