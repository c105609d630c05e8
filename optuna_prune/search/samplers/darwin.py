"""DarwinLM's evolution as an Optuna sampler: level-switch rounds whose offspring train before judgement.

DarwinLM (Tang et al., 2025) is EvoPress's (1 + lambda) search with training-aware selection:
every offspring of the current best mask is fine-tuned briefly before it is scored, in stages.
All offspring get a few training tokens and are scored on few calibration tokens; the best half
go on with more of both, and so on (16 -> 8 -> 4 -> 2 -> 1). The search side of that is the
:class:`LevelSwitchSampler` (offspring by level switches, exact k, rounds in storage) plus a
survivor schedule, which :meth:`DarwinSampler.pruner` turns into a
:class:`~optuna_prune.search.pruners.GenerationHalvingPruner`. The training and the staged scoring are
the objective's (:mod:`optuna_prune.run.darwin_objective`); this module knows nothing of models.
The stage arithmetic (:func:`stage_schedule`: token budgets to training windows and sample
counts) lives here too, so a config is checked without torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import optuna

from optuna_prune.search.pruners import GenerationHalvingPruner  # pruners imports the samplers
from optuna_prune.search.samplers.levelswitch import LevelSwitchSampler
from optuna_prune.search.space import LayerMaskSpace


@dataclass(frozen=True)
class Stage:
    """One selection stage: train on ``train_windows`` more windows, then score ``samples`` samples."""

    train_windows: int
    samples: int

def stage_schedule(
    train_tokens: Sequence[int], seq_len: int, n_samples: int, samples: Sequence[int] = ()
) -> tuple[Stage, ...]:
    """Stages from token budgets (rounded up to whole windows of ``seq_len``).

    ``samples`` gives the calibration samples scored after each stage but the last (the last
    scores all ``n_samples``); by default they double up to all of them (e.g. 1, 2, 4).
    """
    n = len(train_tokens)
    if n < 1 or any(t < 0 for t in train_tokens):
        raise ValueError(f"train_tokens {list(train_tokens)} must be one or more counts >= 0")
    if samples:
        if len(samples) != n - 1:
            raise ValueError(
                f"{len(samples)} stage sample counts for {n} training stages: give one per stage "
                f"but the last ({n - 1})"
            )
        counts = [int(s) for s in samples] + [n_samples]
    else:
        counts = [max(1, math.ceil(n_samples / 2 ** (n - 1 - s))) for s in range(n)]
    if any(c < 1 for c in counts) or any(b < a for a, b in pairwise(counts)) or counts[-1] > n_samples:
        raise ValueError(f"stage sample counts {counts} must be non-decreasing in 1..{n_samples}")
    return tuple(Stage(math.ceil(t / seq_len), c) for t, c in zip(train_tokens, counts, strict=True))


def check_survivors(survivors: Sequence[int]) -> tuple[int, ...]:
    """A valid survivor schedule: candidates entering each stage, non-increasing, ending at 1.

    ``(16, 8, 4, 2, 1)``: 16 offspring per round enter the first stage, 8 the second, ... and the
    round's best one (with the parent) becomes the next parent: one stage fewer than entries.
    """
    out = tuple(int(s) for s in survivors)
    if (
        len(out) < 2 or out[0] < 2 or out[-1] != 1
        or any(b > a or b < 1 for a, b in pairwise(out))
    ):
        raise ValueError(
            f"survivors {list(survivors)} must be non-increasing counts from at least 2 offspring "
            "down to 1, e.g. 16,8,4,2,1"
        )
    return out


class DarwinSampler(LevelSwitchSampler):
    """:class:`LevelSwitchSampler` with DarwinLM's survivor schedule.

    Each round has ``survivors[0]`` offspring of the parent (1..``max_swaps`` level switches);
    the parent of the next round is the best COMPLETE trial of the parent and the round, i.e. the
    best after the whole training schedule. Use it with :meth:`pruner` so that only
    ``survivors[s + 1]`` of the ``survivors[s]`` candidates of stage ``s`` go on, and with an
    objective that reports stage ``s``'s loss at ``step = s``.

    Args:
        space: The masks to search.
        survivors: Candidates entering each stage, e.g. ``(16, 8, 4, 2, 1)`` (see
            :func:`check_survivors`).
        max_swaps: Most level switches per offspring.
        seed: Fixes every random choice.
        schedule: How candidates are trained and scored (token budgets, loss, ...), opaque here;
            stored with the sampler's config, so a resumed run must use the same one.
        wait_for_generation, max_offspring_tries: See :class:`LevelSwitchSampler`.
    """

    method = "darwin"

    def __init__(
        self,
        space: LayerMaskSpace,
        *,
        survivors: Sequence[int] = (16, 8, 4, 2, 1),
        max_swaps: int = 3,
        seed: int | None = None,
        schedule: Mapping[str, Any] | None = None,
        wait_for_generation: bool = True,
        max_offspring_tries: int = 32,
    ) -> None:
        self._survivors = check_survivors(survivors)
        self._schedule = dict(schedule or {})
        super().__init__(
            space, offspring=self._survivors[0], max_swaps=max_swaps, seed=seed,
            wait_for_generation=wait_for_generation, max_offspring_tries=max_offspring_tries,
        )

    @property
    def survivors(self) -> tuple[int, ...]:
        return self._survivors

    @property
    def n_stages(self) -> int:
        """Training stages per candidate: one fewer than the survivor counts."""
        return len(self._survivors) - 1

    def keep_fractions(self) -> list[float]:
        """Share of a round kept after each stage but the last (the last picks the parent)."""
        s = self._survivors
        return [s[i + 1] / s[i] for i in range(self.n_stages - 1)] or [1.0]

    def pruner(self, min_peers: int = 3) -> optuna.pruners.BasePruner:
        """Successive halving within a round, by this schedule's survivor counts."""
        return GenerationHalvingPruner(self, keep=self.keep_fractions(), min_peers=min_peers)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "survivors": list(self._survivors), "schedule": self._schedule}
