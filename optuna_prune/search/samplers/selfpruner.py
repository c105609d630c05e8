"""Self-Pruner: a language model runs the evolution of pruning patterns.

Self-Pruner (Tang et al., 2025) asks an LLM to generate the initial population, pick parents,
and perform crossover and mutation, given the candidates tried so far and their fitness. Here
each trial asks once: generation 0 members ask for a new candidate unlike those already proposed,
later members show the LLM the parents (EvoP's elite) and the best finished trials with their
losses and ask it to combine two good ones and mutate the result. Generations, parent selection,
``STOP_ABOVE`` thresholds, resumption and several workers are EvoP's (this is an
:class:`EvoPSampler`); only where a candidate comes from differs.

A candidate is shown and answered as a JSON list: the dropped layers for a
:class:`~optuna_prune.search.space.LayerMaskSpace`, the units per layer for a
:class:`~optuna_prune.search.rate_space.RateSpace`. An answer is used only if the first JSON array in it
is a list of ints of the right shape (distinct layers in range; one unit count per layer in
range); a wrong count (or total) is fixed by the space's repair, and an answer already in the
study is refused. The LLM then gets one more try with the reason; after that EvoP's genetic
operators breed the candidate instead (generation 0: a random one). Every outcome is counted in
study system attrs (``SelfPrunerSampler:llm_ok``, ``...:llm_fallback`` and one counter per
reason) and recorded on the trial (``ORIGIN_KEY`` "llm" or "fallback", ``LLM_KEY``).

Search side: the LLM is anything with ``complete(messages, max_tokens, temperature, seed) -> str``
(see :mod:`optuna_prune.model.llm`) or a function with that signature; no torch here.
"""

from __future__ import annotations

import abc
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from optuna.study import Study
from optuna.trial import FrozenTrial

from optuna_prune.search import compat
from optuna_prune.search.rate_space import RateSpace
from optuna_prune.search.record import LLM_KEY, ORIGIN_KEY, PARENTS_KEY
from optuna_prune.search.samplers.base import Proposal, Wait, trial_loss, trial_mask
from optuna_prune.search.samplers.evop import EvoPSampler
from optuna_prune.search.space import LayerMaskSpace

_logger = logging.getLogger(__name__)

COUNTER_PREFIX = "SelfPrunerSampler:"
"""Study system attrs ``SelfPrunerSampler:llm_<outcome>`` count the LLM's outcomes."""
OUTCOMES = ("ok", "repaired", "unparseable", "duplicate", "error")
""""ok"/"repaired" (count fixed by repair) are used as origin "llm"; the rest fall back."""
_ENUMERATE_LIMIT = 100_000


class ChatLLM(Protocol):
    """What the sampler needs of a language model (see optuna_prune.model.llm)."""

    def complete(
        self, messages: list[dict[str, str]], max_tokens: int, temperature: float, seed: int
    ) -> str: ...


def first_int_list(text: str) -> list[int] | None:
    """The first JSON array in ``text`` if it is a flat list of ints, else None (strict)."""
    start = text.find("[")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        return None
    return value


class _Task(abc.ABC):
    """How candidates of one kind of space are described to, and read back from, the LLM."""

    n_values: int  # ints in one answer
    system: str  # the task, for the system message
    first: str  # the request for a candidate
    breed: str  # the request for an offspring of the candidates shown

    def __init__(self, space: LayerMaskSpace) -> None:
        self.space = space

    @abc.abstractmethod
    def show(self, candidate: tuple[int, ...]) -> list[int]:
        """The candidate as the LLM sees it."""

    @abc.abstractmethod
    def read(self, values: list[int]) -> np.ndarray | None:
        """A mask of the space (possibly the wrong count) from a parsed answer; None if malformed."""


class _LayerTask(_Task):
    def __init__(self, space: LayerMaskSpace) -> None:
        super().__init__(space)
        k, last = space.num_drop, space.num_layers - 1
        keep = f" Never remove layers {list(space.protected)}." if space.protected else ""
        self.n_values = k
        self.system = (
            f"You help prune a {space.num_layers}-layer language model by choosing which {k} of "
            f"its layers (0 to {last}) to remove. Lower loss is better.{keep} Always reply with a "
            f"JSON list of {k} different integers from 0 to {last} and nothing else."
        )
        self.first = f"Propose {k} layers to remove."
        self.breed = (
            "Now pick two of the lists with the lowest loss as parents, combine them and change "
            "one layer, to get a new list. Reply with the new list only."
        )

    def show(self, candidate: tuple[int, ...]) -> list[int]:
        return list(candidate)

    def read(self, values: list[int]) -> np.ndarray | None:
        if not values or len(set(values)) != len(values):
            return None
        if not all(0 <= v < self.space.num_layers for v in values):
            return None
        return self.space.to_array(values)


class _RateTask(_Task):
    def __init__(self, space: RateSpace) -> None:
        super().__init__(space)
        self.rates: RateSpace = space
        n, u, r = space.n_layers, space.max_units, space.resolution
        keep = f" Layers {list(space.protected_layers)} must get 0." if space.protected_layers else ""
        self.n_values = n
        self.system = (
            f"You help prune a {n}-layer language model by choosing how much of each layer to "
            f"remove, in parts of 1/{r}: each layer gets 0 to {u} parts and the {n} numbers sum to "
            f"{space.total}. Lower loss is better.{keep} Always reply with a JSON list of {n} "
            "integers and nothing else."
        )
        self.first = f"Propose the parts to remove from each of the {n} layers."
        self.breed = (
            "Now pick two of the lists with the lowest loss as parents, combine them and move one "
            "part from one layer to another, to get a new list. Reply with the new list only."
        )

    def show(self, candidate: tuple[int, ...]) -> list[int]:
        return list(self.rates.units(candidate))

    def read(self, values: list[int]) -> np.ndarray | None:
        if len(values) != self.rates.n_layers or not all(0 <= v <= self.rates.max_units for v in values):
            return None
        return self.rates.to_array(self.rates.from_units(values))


@dataclass
class _Call:
    """What one ``_propose`` call learned; lives for that call only (thread-local)."""

    trial: FrozenTrial
    trials: list[FrozenTrial]
    bred: bool = False
    outcome: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


class SelfPrunerSampler(EvoPSampler):
    """EvoP's generations with a language model as initialiser and breeder; GA as fallback.

    Args:
        space: A :class:`LayerMaskSpace` (layers to drop) or a :class:`RateSpace` (width rates).
        llm: A :class:`ChatLLM` or a function ``(messages, max_tokens, temperature, seed) -> str``.
        population_size: Members per generation (default 10: each costs an LLM call).
        history: Most finished candidates shown to the LLM (the best; small models have small
            contexts).
        temperature: Sampling temperature; every call's seed derives from ``seed`` and the trial
            number, so a seeded run asks the same questions with the same seeds.
        attempts: LLM calls per trial before falling back (the later ones say what was wrong).
        max_errors: After this many LLM errors in a row (an unreachable endpoint) this process
            stops asking and uses the genetic operators only.
        **evop: Other :class:`EvoPSampler` arguments (elite_fraction, crossover, mutation_prob,
            seed, wait_for_generation, ...), used by the fallback and the generations.
    """

    method = "selfpruner"
    _process_state = (*EvoPSampler._process_state, "_local")

    def __init__(
        self,
        space: LayerMaskSpace,
        llm: ChatLLM | Callable[..., str],
        *,
        population_size: int | None = None,
        history: int = 10,
        temperature: float = 0.7,
        attempts: int = 2,
        max_errors: int = 3,
        **evop: Any,
    ) -> None:
        size = 10 if population_size is None else population_size
        super().__init__(space, population_size=size, **evop)
        if history < 1 or attempts < 1 or max_errors < 1 or temperature < 0:
            raise ValueError(
                f"history={history}, attempts={attempts} and max_errors={max_errors} must be >= 1, "
                f"temperature={temperature} >= 0"
            )
        self._complete: Callable[..., str] = getattr(llm, "complete", llm)
        self._llm_name = repr(llm)
        self._task = _RateTask(space) if isinstance(space, RateSpace) else _LayerTask(space)
        self._history = int(history)
        self._temperature = float(temperature)
        self._attempts = int(attempts)
        self._max_errors = int(max_errors)
        self._errors_in_a_row = 0  # a per-process circuit breaker, not search state

    def _init_process_state(self) -> None:
        super()._init_process_state()
        self._local = threading.local()  # a per-call scratchpad

    # --- EvoP hooks ------------------------------------------------------------------------------

    def _propose(
        self,
        study: Study,
        trial: FrozenTrial,
        trials: list[FrozenTrial],
        seed: tuple[int, ...] | None,
    ) -> Proposal | Wait:
        call = _Call(trial, trials)
        self._local.call = call
        try:
            result = super()._propose(study, trial, trials, seed)
        finally:
            self._local.call = None
        if isinstance(result, Proposal) and call.outcome is not None:
            llm = call.outcome in ("ok", "repaired")
            result.attrs[ORIGIN_KEY] = "llm" if llm else "fallback"
            result.attrs[LLM_KEY] = call.record
            if llm:
                result.attrs.pop(PARENTS_KEY, None)  # the LLM chose among all it was shown
            self._count(study, call.outcome)
        return result

    def _offspring(
        self, rng: np.random.RandomState, parents: list[FrozenTrial], seen: set[tuple[int, ...]]
    ) -> tuple[tuple[int, ...] | None, tuple[int, int]]:
        call: _Call | None = getattr(self._local, "call", None)
        if call is None:
            return super()._offspring(rng, parents, seen)
        call.bred = True
        shown = self._shown(call.trials, parents)
        child = self._ask(call, rng, shown, self._task.breed, seen)
        if child is not None:
            return child, (-1, -1)
        return super()._offspring(rng, parents, seen)

    def _random_unseen(
        self, rng: np.random.RandomState, seen: set[tuple[int, ...]], tries: int = 64
    ) -> tuple[int, ...] | None:
        call: _Call | None = getattr(self._local, "call", None)
        if call is not None and not call.bred and call.outcome is None:  # generation 0
            shown = self._proposed(call.trials, seen)
            child = self._ask(call, rng, shown, "Propose a new list, different from those above.", seen)
            if child is not None:
                return child
        if not isinstance(self._space, RateSpace):
            return super()._random_unseen(rng, seen, tries)
        for _ in range(tries):  # slot subsets are not rate vectors: list candidates, not subsets
            candidate = self._space.from_array(self._space.random_mask(rng))
            if candidate not in seen:
                return candidate
        if self._space.n_candidates > _ENUMERATE_LIMIT:
            return None
        unseen = [c for c in self._space.candidates() if c not in seen]
        return unseen[rng.randint(len(unseen))] if unseen else None

    # --- the LLM ---------------------------------------------------------------------------------

    def _scored(self, trials: Sequence[FrozenTrial]) -> list[tuple[float, tuple[int, ...]]]:
        """(exact loss, candidate) of the finished valid candidates among ``trials``, best first."""
        out = []
        for t in trials:
            loss = trial_loss(t)
            mask = trial_mask(t, self._space)
            if loss is not None and loss[1] and mask is not None and self._space.is_valid(mask):
                out.append((loss[0], mask))
        return sorted(out)

    def _shown(
        self, trials: list[FrozenTrial], parents: list[FrozenTrial]
    ) -> list[tuple[tuple[int, ...], float | None]]:
        """The parents, then the best other finished candidates; shown worst to best (best last)."""
        chosen: dict[tuple[int, ...], float] = {}
        for loss, mask in self._scored(parents) + self._scored(trials):
            if len(chosen) >= self._history:
                break
            chosen.setdefault(mask, loss)
        return sorted(chosen.items(), key=lambda kv: -kv[1])

    def _proposed(
        self, trials: list[FrozenTrial], seen: set[tuple[int, ...]]
    ) -> list[tuple[tuple[int, ...], float | None]]:
        """The latest candidates in the study (generation 0), with their loss once known."""
        shown: dict[tuple[int, ...], float | None] = {}
        for t in trials:
            mask = trial_mask(t, self._space)
            if mask in seen:
                loss = trial_loss(t)
                shown[mask] = loss[0] if loss is not None and loss[1] else None
        return list(shown.items())[-self._history :]

    def _messages(
        self, shown: Sequence[tuple[tuple[int, ...], float | None]], instruction: str
    ) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self._task.system}]
        feedback = ""
        for mask, loss in shown:
            messages.append({"role": "user", "content": f"{feedback}{self._task.first}".strip()})
            messages.append({"role": "assistant", "content": json.dumps(self._task.show(mask))})
            feedback = f"Loss {loss:.4f}. " if loss is not None else ""
        request = instruction if shown else self._task.first
        messages.append({"role": "user", "content": f"{feedback}{request}".strip()})
        return messages

    def _ask(
        self,
        call: _Call,
        rng: np.random.RandomState,
        shown: Sequence[tuple[tuple[int, ...], float | None]],
        instruction: str,
        seen: set[tuple[int, ...]],
    ) -> tuple[int, ...] | None:
        """The LLM's valid, unseen candidate, or None (then ``call.outcome`` says why)."""
        messages = self._messages(shown, instruction)
        base_seed = int(rng.randint(2**31 - 1))
        n = self._task.n_values
        outcome, answer = "error", ""
        for attempt in range(self._attempts):
            if self._errors_in_a_row >= self._max_errors:
                answer = f"not asked: the LLM failed {self._errors_in_a_row} times in a row"
                break
            try:
                answer = self._complete(
                    messages, max_tokens=8 + 5 * n, temperature=self._temperature,
                    seed=base_seed + attempt,
                )
            except Exception as exc:  # a dead endpoint must not stop the search
                self._errors_in_a_row += 1
                outcome, answer = "error", f"{type(exc).__name__}: {exc}"
                level = logging.WARNING if self._errors_in_a_row == self._max_errors else logging.INFO
                _logger.log(level, "trial %d: LLM %s failed (%s)%s", call.trial.number, self._llm_name,
                            answer, "; using the genetic operators from now on"
                            if self._errors_in_a_row == self._max_errors else "")
                continue
            self._errors_in_a_row = 0
            values = first_int_list(answer)
            raw = self._task.read(values) if values is not None else None
            if raw is None:
                outcome = "unparseable"
                retry = f"Reply with only a JSON list of {n} integers, as the system message says."
            else:
                child = self._space.from_array(self._space.repair(raw, rng))
                if child not in seen:
                    call.outcome = "ok" if self._space.is_valid(raw) else "repaired"
                    call.record = {"outcome": call.outcome, "attempts": attempt + 1, "answer": answer[:200]}
                    return child
                outcome = "duplicate"
                retry = "That list was tried already. Reply with a different list."
            messages = [*messages, {"role": "assistant", "content": answer[:200]},
                        {"role": "user", "content": retry}]
        call.outcome = outcome
        call.record = {"outcome": outcome, "attempts": self._attempts, "answer": answer[:200]}
        _logger.info("trial %d: LLM answer %s (%r); genetic fallback", call.trial.number, outcome, answer[:80])
        return None

    def _count(self, study: Study, outcome: str) -> None:
        """Bump the outcome's counters (read-modify-write: approximate with concurrent workers)."""
        storage = compat.study_storage(study)
        attrs = storage.get_study_system_attrs(compat.study_id(study))
        kind = "llm_ok" if outcome in ("ok", "repaired") else "llm_fallback"
        for key in {kind, f"llm_{outcome}"}:
            name = COUNTER_PREFIX + key
            storage.set_study_system_attr(compat.study_id(study), name, int(attrs.get(name, 0)) + 1)


def llm_stats(study: Study) -> dict[str, int]:
    """How many trials' candidates came from the LLM and how many from the fallback, by outcome.

    Counted from the trials' ``LLM_KEY`` attrs (exact, unlike the study counters under concurrency).
    """
    stats = {"llm": 0, "fallback": 0, **{o: 0 for o in OUTCOMES}}
    for t in study.get_trials(deepcopy=False):
        record = t.system_attrs.get(LLM_KEY)
        if record is None:
            continue
        stats[record["outcome"]] += 1
        stats["llm" if record["outcome"] in ("ok", "repaired") else "fallback"] += 1
    return stats
