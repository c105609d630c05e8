"""What every layer-mask sampler shares: one proposal per trial, made in ``before_trial``.

A mask sampler decides a trial's whole mask at once, in ``before_trial``, and stores it as the
trial system attr ``MASK_KEY`` before the objective runs; ``sample_independent`` then only hands
it out as the ``layer_xx`` params (and hands every other param to a fallback sampler). Deciding early lets concurrent workers see each other's running
candidates (no duplicates), lets the sampler attach hints for the objective (``STOP_ABOVE_KEY``,
``ALLOW_PARTIAL_KEY``), and gives one place to wait for other workers. Nothing that matters is
kept in memory: every decision is recomputed from storage, so resumed runs and several workers
continue the same search. A new method is one subclass that implements :meth:`_propose`.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import itertools
import logging
import math
import random
import threading
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import BaseSampler, RandomSampler
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from optuna_prune.search import compat
from optuna_prune.search.record import (
    FIXED_PARAMS_KEY,
    MASK_KEY,
    METHOD_KEY,
    STOP_ABOVE_KEY,
    STOPPED_EARLY_ATTR,
    SURPLUS_KEY,
    sampler_config_key,
)
from optuna_prune.search.samplers.batched_writes import set_trial_system_attrs
from optuna_prune.search.space import LayerMaskSpace, SpaceError

_logger = logging.getLogger(__name__)

_LONG_WAIT = 600.0  # seconds of waiting on the same trials before a warning
_ENUMERATE_LIMIT = 100_000  # below this many masks, a random search may list the unseen ones
_MAX_CLAIMS = 20  # proposals a trial makes while workers of other processes claim the same masks
_CLAIMING = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)
_LOCAL_POLL = 0.05  # seconds between rereads while waiting on trials of this process's threads


@dataclass
class Proposal:
    """One trial's mask plus the system attrs to store with it."""

    dropped: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    stop: bool = False  # the search is exhausted: call study.stop() after this trial


@dataclass
class Wait:
    """No proposal yet: these running trials (numbers) of other workers must finish first."""

    on: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)  # stored meanwhile (EvoP: the slot it holds)


def trial_mask(trial: FrozenTrial, space: LayerMaskSpace) -> tuple[int, ...] | None:
    """The dropped layers of any trial: proposed, already suggested, or enqueued; else None."""
    proposed = trial.system_attrs.get(MASK_KEY)
    if proposed is not None:
        return tuple(int(i) for i in proposed)
    for params in (trial.params, trial.system_attrs.get(FIXED_PARAMS_KEY) or {}):
        if all(name in params for name in space.param_names):
            return space.dropped_from_params(params)
    return None


def trial_loss(trial: FrozenTrial) -> tuple[float, bool] | None:
    """(loss, exact) of a finished single-objective trial, or None if it has none.

    COMPLETE trials are exact. A PRUNED trial carries its loss as last intermediate value; it
    is exact only if the objective says it was not ``stopped_early`` (else it is a lower bound).
    """
    if trial.state == TrialState.COMPLETE and trial.values is not None and len(trial.values) == 1:
        return float(trial.values[0]), True
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
        return float(value), trial.user_attrs.get(STOPPED_EARLY_ATTR) is False
    return None


def _stop(study: Study) -> None:
    with contextlib.suppress(RuntimeError):  # ask-and-tell outside study.optimize: no loop
        study.stop()


def _beat(study: Study, trial: FrozenTrial) -> None:
    """Record a heartbeat for ``trial`` while the sampler decides it.

    Optuna starts a trial's heartbeats only after ``before_trial``, and never fails a RUNNING
    trial that has none: a worker killed while proposing (or waiting for others) would leave a
    trial that other workers wait for forever. With a heartbeat, it goes stale and is retried.
    """
    if compat.is_heartbeat_enabled(compat.study_storage(study)):
        compat.study_storage(study).record_heartbeat(compat.trial_id(trial))


def _shared(storage: BaseStorage) -> bool:
    """Whether other processes may write ``storage`` (a database server, a journal file, gRPC).

    In-memory storage is one process's; so is SQLite, whose studies refuse a second live process
    (``storage.refuse_concurrent_sqlite``).
    """
    backend = compat.unwrap_storage(storage)
    if isinstance(backend, InMemoryStorage):
        return False
    return not (isinstance(backend, RDBStorage) and backend.engine.dialect.name == "sqlite")


_S = TypeVar("_S", bound="MaskSampler")


class MaskSampler(BaseSampler, abc.ABC):
    """Base class of the samplers that propose exact-k layer masks of a :class:`LayerMaskSpace`.

    Subclasses set ``method`` (stored as ``METHOD_KEY`` on every trial they handle) and implement
    :meth:`_propose`, which may return :class:`Wait` until other workers finish running trials.
    An enqueued trial (``study.enqueue_trial(space.to_params(dropped))``) must fix every layer
    param; the sampler then tags it and, where it matters (EvoP), counts it in the search.
    ``poll_interval`` (seconds) sets how often a waiting sampler rereads storage.

    Args:
        space: The masks to search.
        seed: Fixes every random choice. With a seed, a trial's random state is derived from
            (seed, method, trial number), so a resumed run or a second worker proposes what an
            uninterrupted single run would, and same-seeded workers do not collide.
        independent_sampler: Samples the params that are not part of the mask (default
            ``RandomSampler(seed=seed)``), as Optuna's GA samplers do.

    Mask params must be suggested as the space's distributions (``suggest_categorical(name,
    [0, 1])``, or all at once with :func:`optuna_prune.search.suggest_mask`); any other way
    raises :class:`SpaceError`. A sampler pickles and deep-copies without its locks.
    """

    method: ClassVar[str] = "mask"
    # Attributes that _init_process_state makes, so that pickling and copying leave them out.
    _process_state: ClassVar[tuple[str, ...]] = (
        "_proposing", "_told", "_held", "_proposals", "_checked"
    )
    poll_interval: float = 0.5  # seconds between storage polls while waiting for other workers

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        seed: int | None = None,
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        if not isinstance(space, LayerMaskSpace):
            raise TypeError(f"space must be a LayerMaskSpace, got {type(space).__name__}")
        if independent_sampler is not None and not isinstance(independent_sampler, BaseSampler):
            raise TypeError(
                f"independent_sampler must be an optuna BaseSampler, got {independent_sampler!r}"
            )
        self._space = space
        self._distributions = space.distributions()
        self._seed = seed
        self._rng = compat.LazyRandomState(seed)
        # Params that are not part of the mask (a user's learning rate), as Optuna's GA samplers do.
        self._random_sampler = independent_sampler or RandomSampler(seed=seed)
        self._init_process_state()

    def _init_process_state(self) -> None:
        """What belongs to this process only, so neither pickled nor copied: locks, live trials."""
        # Read storage, propose, write the mask: one step for the threads of this process.
        self._proposing = threading.Lock()
        self._told = threading.Condition()  # notified when a trial of this process finishes
        # (study name, trial number) -> thread that asked it: never wait on one's own trials.
        self._held: dict[tuple[str, int], int] = {}
        self._proposals: dict[int, tuple[int, ...]] = {}  # trial id -> mask, saves a read/param
        self._checked: set[tuple[int, int]] = set()  # studies whose stored config matches (_check_config)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._process_state:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    @classmethod
    def for_subset(
        cls: type[_S], n: int, k: int, *, seed: int | None = None, **options: Any
    ) -> _S:
        """This sampler choosing ``k`` of ``n`` items (see :mod:`optuna_prune.search`).

        ``options`` are the constructor's other arguments, e.g. ``population_size`` for EvoP.
        """
        return cls(LayerMaskSpace(n, k), seed=seed, **options)

    @property
    def space(self) -> LayerMaskSpace:
        return self._space

    def reseed_rng(self) -> None:
        self._rng.rng.seed()
        self._random_sampler.reseed_rng()

    def planned_trials(self) -> int | None:
        """How many evaluations a method that stops by itself makes (for progress), None if it
        runs until a budget or timeout stops it."""
        return None

    def config(self) -> dict[str, Any]:
        """What a resumed run must share with the run that started this method in the study."""
        return {"space": self._space.to_dict()}

    @classmethod
    def config_key(cls) -> str:
        """The study system attr holding :meth:`config` of the first run of this method."""
        return sampler_config_key(cls.method)

    # --- Optuna sampler interface -------------------------------------------------------------

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        # Mask params go one by one through sample_independent, which checks how each was asked
        # for: Optuna's own check of a relative param fails with a message that names no fix.
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {
            name: self.sample_independent(study, trial, name, distribution)
            for name, distribution in search_space.items()
        }

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        expected = self._distributions.get(param_name)
        if expected is None:
            return self._random_sampler.sample_independent(
                study, trial, param_name, param_distribution
            )
        if param_distribution != expected:
            how = (
                f"trial.suggest_categorical({param_name!r}, [0, 1])"
                if isinstance(expected, CategoricalDistribution)
                else f"trial.suggest_int({param_name!r}, {expected.low}, {expected.high})"  # type: ignore[attr-defined]
            )
            raise SpaceError(
                f"parameter {param_name!r} is part of the sampler's mask but was suggested as "
                f"{param_distribution}; suggest it as {how}, or let "
                "optuna_prune.search.suggest_mask suggest the whole mask"
            )
        dropped = self._proposals.get(compat.trial_id(trial))
        if dropped is None:
            dropped = self._stored_proposal(study, trial)
        return self._space.to_params(dropped)[param_name]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        storage = compat.study_storage(study)
        try:
            _beat(study, trial)
            self._check_config(study)
            proposal = self._claim(study, trial, self._preset_mask(trial))
            self._proposals[compat.trial_id(trial)] = proposal.dropped
            self._held[(study.study_name, trial.number)] = threading.get_ident()
            if proposal.stop:
                _stop(study)
        except BaseException:
            # The trial is already RUNNING: fail it, so an interrupt or a configuration error
            # leaves no zombie that other workers would wait for; tagged, it counts as a failure
            # of this method.
            with contextlib.suppress(Exception):  # keep the original error
                self._store(study, trial, {})
            with contextlib.suppress(Exception):
                storage.set_trial_state_values(compat.trial_id(trial), TrialState.FAIL)
            raise

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._finish(study, trial, state)
        if state == TrialState.FAIL:
            return
        storage = compat.study_storage(study)
        if trial.number + 1 < self._space.n_candidates:
            return  # no read: a later trial's after_trial sees the space exhausted
        trials = storage.get_all_trials(compat.study_id(study), deepcopy=False)
        if self._exhausted(self._seen(trials)):
            _stop(study)

    def _finish(self, study: Study, trial: FrozenTrial, state: TrialState) -> None:
        """Forget a told trial, wake threads that wait on it, and check how its mask was asked.

        A COMPLETE trial must carry every mask param or none of them, and with none of them it
        must not carry 0/1 params of other names: those would be sampled at random, not as an
        exact-k mask, and the search would silently learn nothing.
        """
        self._proposals.pop(compat.trial_id(trial), None)
        if self._held.pop((study.study_name, trial.number), None) is not None:
            with self._told:
                self._told.notify_all()
        if state != TrialState.COMPLETE:
            return
        names = self._space.param_names
        missing = [name for name in names if name not in trial.params]
        if 0 < len(missing) < len(names):
            raise SpaceError(
                f"trial {trial.number} suggested only part of the exact-k mask (missing "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}); suggest all "
                f"{len(names)} mask params, e.g. with optuna_prune.search.suggest_mask"
            )
        lookalike = self._distributions[names[0]]
        foreign = [n for n, d in trial.distributions.items() if d == lookalike]
        if missing and foreign:
            raise SpaceError(
                f"trial {trial.number} suggested {foreign[:3]}{'...' if len(foreign) > 3 else ''} "
                f"like mask params, but this sampler proposes masks only as {names[0]!r}.."
                f"{names[-1]!r}: name them so, e.g. with optuna_prune.search.suggest_mask(trial, "
                f"{self._space.num_layers}, {self._space.num_drop}); others are sampled at random"
            )

    def _held_here(self, study: Study, numbers: Sequence[int]) -> bool:
        """Whether this very thread asked all these trials and has not told them (ask-and-tell):
        waiting on them would never end."""
        me = threading.get_ident()
        return all(self._held.get((study.study_name, n)) == me for n in numbers)

    def _held_in_process(self, study: Study, numbers: Sequence[int]) -> bool:
        """Whether threads of this process run all these trials: their end wakes ``_told``."""
        return all((study.study_name, n) in self._held for n in numbers)

    # --- for subclasses ------------------------------------------------------------------------

    @abc.abstractmethod
    def _propose(
        self,
        study: Study,
        trial: FrozenTrial,
        trials: list[FrozenTrial],
        seed: tuple[int, ...] | None,
    ) -> Proposal | Wait:
        """The mask for ``trial``, given all trials in storage, or Wait to ask again later.

        ``seed`` is the mask of an enqueued or retried trial (see :meth:`_preset_mask`).
        """

    def _trial_rng(self, trial: FrozenTrial) -> np.random.RandomState:
        if self._seed is None:
            return self._rng.rng
        salt = zlib.crc32(self.method.encode())
        entropy = np.random.SeedSequence([int(self._seed) % 2**63, salt, trial.number])
        return np.random.RandomState(entropy.generate_state(4))

    def _seen(self, trials: list[FrozenTrial], exclude: int | None = None) -> set[tuple[int, ...]]:
        """Masks already in the study (any method and state but FAIL: a failed one may return)."""
        seen: set[tuple[int, ...]] = set()
        for t in trials:
            if t.state == TrialState.FAIL or t.number == exclude:
                continue
            mask = trial_mask(t, self._space)
            if mask is not None:
                seen.add(mask)
        return seen

    def _exhausted(self, seen: set[tuple[int, ...]]) -> bool:
        n = self._space.n_candidates
        return len(seen) >= n and sum(self._space.is_valid(m) for m in seen) >= n

    def _random_unseen(
        self, rng: np.random.RandomState, seen: set[tuple[int, ...]], tries: int = 64
    ) -> tuple[int, ...] | None:
        """A uniformly random valid mask not in ``seen``; None when every mask was seen.

        Spaces of more than 100k masks are not listed: there, None means ``tries`` random
        draws were all seen, which only happens when nearly the whole space was tried.
        """
        for _ in range(tries):
            dropped = self._space.from_array(self._space.random_mask(rng))
            if dropped not in seen:
                return dropped
        if self._space.n_candidates > _ENUMERATE_LIMIT:
            return None
        unseen = [
            c
            for c in itertools.combinations(self._space.droppable, self._space.num_drop)
            if c not in seen
        ]
        return unseen[rng.randint(len(unseen))] if unseen else None

    def _surplus(self, dropped: tuple[int, ...]) -> Proposal:
        """A trial asked for after the search ended: repeat a known mask and stop at once.

        Optuna has already created the trial, so it must get some mask. ``STOP_ABOVE = -inf``
        lets the objective give up after its first sample, and ``study.stop()`` ends the loop.
        """
        return Proposal(dropped, {STOP_ABOVE_KEY: -math.inf, SURPLUS_KEY: True}, stop=True)

    # --- internals -----------------------------------------------------------------------------

    def _preset_mask(self, trial: FrozenTrial) -> tuple[int, ...] | None:
        """The mask of a trial decided before the sampler saw it, else None.

        That is an enqueued trial (``fixed_params``) or the copy of a stale trial that
        ``RetryHeartbeatStaleTrialCallback`` re-enqueued with its params (and system attrs).
        """
        for params in (trial.system_attrs.get(FIXED_PARAMS_KEY) or {}, trial.params):
            if all(name in params for name in self._space.param_names):
                return self._space.dropped_from_params(params)
        return None

    def _store(self, study: Study, trial: FrozenTrial, attrs: dict[str, Any]) -> None:
        """Store ``attrs`` and ``METHOD_KEY`` as trial system attrs in one storage write (on
        SQLite, each write is a commit that costs more than a cheap objective)."""
        set_trial_system_attrs(compat.study_storage(study), compat.trial_id(trial), {METHOD_KEY: self.method, **attrs})

    def _stored_proposal(self, study: Study, trial: FrozenTrial) -> tuple[int, ...]:
        attrs = compat.study_storage(study).get_trial_system_attrs(compat.trial_id(trial))
        if attrs.get(MASK_KEY) is not None:  # None: a claim withdrawn (_claim)
            return tuple(int(i) for i in attrs[MASK_KEY])
        # before_trial did not run through this sampler (e.g. the sampler was swapped mid-trial).
        dropped = self._space.from_array(self._space.random_mask(self._trial_rng(trial)))
        compat.study_storage(study).set_trial_system_attr(compat.trial_id(trial), MASK_KEY, list(dropped))
        return dropped

    def check_resume(self, study: Study) -> bool:
        """SpaceError if ``study`` was searched by this method with other settings (:meth:`config`),
        e.g. another population size; writes nothing. Returns whether the study records them."""
        stored = compat.study_storage(study).get_study_system_attrs(compat.study_id(study)).get(self.config_key())
        mine = self.config()
        if stored is not None and stored != mine:
            diff = ", ".join(
                f"{k}={stored.get(k)!r} (now {mine.get(k)!r})"
                for k in sorted(set(stored) | set(mine)) if stored.get(k) != mine.get(k)
            )
            raise SpaceError(
                f"study {study.study_name!r} was searched by {self.method} with {diff}; resume with "
                "the same settings (e.g. the same --population), or pass --new-study or another --study"
            )
        return stored is not None

    def _check_config(self, study: Study) -> None:
        if (id(compat.study_storage(study)), compat.study_id(study)) in self._checked:
            return  # once per study and process: the stored config is written only once
        if not self.check_resume(study):
            compat.study_storage(study).set_study_system_attr(compat.study_id(study), self.config_key(), self.config())
        self._checked.add((id(compat.study_storage(study)), compat.study_id(study)))

    def _claim(self, study: Study, trial: FrozenTrial, seed: tuple[int, ...] | None) -> Proposal:
        """Propose a mask and store it, so that no two concurrent trials get the same new mask.

        Threads of this process propose one at a time (``_wait_for_proposal``). Workers of other
        processes may read a shared storage at the same moment and propose alike: each writes its
        claim, then reads the trials again. Storage is linearizable, so at least one of
        two racers sees the other's claim; whoever sees one withdraws its own, waits a random
        moment (deterministic samplers such as SLEB would collide again) and proposes anew. A
        mask of a finished trial is repeated on purpose (SLEB rescoring another method's mask,
        a surplus trial), as are seeds and retries. The reread is skipped where no other process
        writes: it costs a storage read per trial, and every read is a place for Ctrl-C to land.
        """
        storage = compat.study_storage(study)
        jitter = random.Random()  # timing only: proposals stay a function of the seed and storage
        for attempt in range(1, _MAX_CLAIMS + 1):
            proposal, known = self._wait_for_proposal(study, trial, seed)
            finished = [t for t in known if t.state.is_finished()]
            if (
                not _shared(storage)
                or seed is not None
                or proposal.stop
                or proposal.dropped in self._seen(finished)
            ):
                return proposal
            # Not only RUNNING ones: a rival on a fast objective may have claimed and told the
            # same mask between this proposal's read and its claim.
            rivals = storage.get_all_trials(compat.study_id(study), deepcopy=False, states=_CLAIMING)
            if proposal.dropped not in self._seen(rivals, exclude=trial.number):
                return proposal
            _logger.debug(
                "trial %d withdraws %s: another worker claimed it", trial.number, proposal.dropped
            )
            storage.set_trial_system_attr(compat.trial_id(trial), MASK_KEY, None)
            time.sleep(jitter.uniform(0, self.poll_interval * min(attempt, 4)))
            _beat(study, trial)
        _logger.warning(
            "trial %d keeps %s after %d raced claims: it may be scored twice",
            trial.number,
            proposal.dropped,
            _MAX_CLAIMS,
        )
        return proposal

    def _wait_for_proposal(
        self, study: Study, trial: FrozenTrial, seed: tuple[int, ...] | None
    ) -> tuple[Proposal, list[FrozenTrial]]:
        """Store the proposal for ``trial`` as its ``MASK_KEY``; return it and the trials it
        was made from."""
        # Poll without a timeout: a long LLM evaluation elsewhere is normal. Ctrl-C interrupts
        # the sleep; with heartbeats on, trials of dead workers are failed so the wait ends.
        waited_on: tuple[int, ...] | None = None
        held: dict[str, Any] | None = None  # the attrs stored while waiting
        since = warned = beaten = time.monotonic()
        while True:
            with self._proposing:
                trials = compat.study_storage(study).get_all_trials(compat.study_id(study), deepcopy=False)
                result = self._propose(study, trial, trials, seed)
                if isinstance(result, Proposal):
                    # The mask last (one transaction on RDB storage, else written in this order):
                    # a trial with a mask is complete for every sampler's replay.
                    self._store(study, trial, {**result.attrs, MASK_KEY: list(result.dropped)})
                    return result, trials
                if result.attrs != held:  # tagged while it waits, so other workers count it
                    self._store(study, trial, result.attrs)
                    held = result.attrs
            if self._held_here(study, result.on):
                raise RuntimeError(
                    f"trial {trial.number} ({self.method}) needs the results of trials "
                    f"{list(result.on)}, which this thread asked for and has not told: "
                    "tell them before asking again"
                )
            now = time.monotonic()
            if result.on != waited_on:
                waited_on, since = result.on, now
                _logger.info(
                    "trial %d (%s) waits for running trials %s",
                    trial.number,
                    self.method,
                    list(result.on),
                )
            elif now - since > _LONG_WAIT and now - warned > _LONG_WAIT:
                warned = now
                hint = (
                    "their workers' heartbeats are checked"
                    if compat.is_heartbeat_enabled(compat.study_storage(study))
                    else "heartbeats are off: if their workers died, `optuna-prune fail-stale "
                    "STUDY` fails those trials, or use a storage with heartbeat_interval"
                )
                _logger.warning(
                    "trial %d (%s) has waited %.0f s for running trials %s; %s",
                    trial.number,
                    self.method,
                    now - since,
                    list(result.on),
                    hint,
                )
            if self._held_in_process(study, result.on):
                with self._told:  # woken as soon as one of them is told
                    self._told.wait(min(_LOCAL_POLL, self.poll_interval))
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                time.sleep(self.poll_interval)
            if time.monotonic() - beaten >= self.poll_interval:
                beaten = time.monotonic()
                _beat(study, trial)

    def _with_state(
        self,
        trials: list[FrozenTrial],
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> list[FrozenTrial]:
        """``trials`` with ``trial`` as it will be once told (after_trial runs before storage)."""
        told = copy.copy(trial)
        told.state = state
        told.values = list(values) if values is not None and state == TrialState.COMPLETE else None
        return [told if t.number == trial.number else t for t in trials]
