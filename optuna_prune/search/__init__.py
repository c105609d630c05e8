"""Choose k of n items with this package's samplers: the search side as a plain Optuna plugin.

Nothing here knows of layers or models: feature selection, k of n experts, sensors or ensemble
members are exact-k subset problems like layer dropping. An objective calls
:func:`suggest_mask` for the chosen indices; a sampler made with ``for_subset(n, k, seed=...)``
proposes them, and samples every other parameter (a learning rate) with its fallback sampler::

    sampler = EvoPSampler.for_subset(20, 6, seed=0)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda trial: cost(suggest_mask(trial, 20, 6)), n_trials=300)

Only Optuna and numpy are imported, never torch (``pip install optuna-prune`` suffices).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from optuna.trial import BaseTrial, Trial

from optuna_prune.search.samplers.base import MaskSampler
from optuna_prune.search.samplers.batched_writes import one_write_for_params
from optuna_prune.search.samplers.evop import EvoPSampler
from optuna_prune.search.samplers.exhaustive import ExhaustiveMaskSampler
from optuna_prune.search.samplers.levelswitch import LevelSwitchSampler
from optuna_prune.search.samplers.random_mask import RandomMaskSampler
from optuna_prune.search.space import LayerMaskSpace, SpaceError

__all__ = [
    "EvoPSampler",
    "ExhaustiveMaskSampler",
    "LevelSwitchSampler",
    "MaskSampler",
    "RandomMaskSampler",
    "SpaceError",
    "subset_space",
    "suggest_mask",
]


@functools.lru_cache(maxsize=64)
def subset_space(n: int, k: int, protected: tuple[int, ...] = ()) -> LayerMaskSpace:
    """The k-of-n space: item ``i`` is the {0, 1} parameter ``space.param_names[i]``."""
    return LayerMaskSpace(n, k, protected)


def suggest_mask(
    trial: BaseTrial, n: int, k: int, *, protected: Sequence[int] = ()
) -> tuple[int, ...]:
    """Suggest a subset of k of ``range(n)`` and return its sorted indices.

    Every item is the parameter ``layer_xx`` (1 = chosen), so the dashboard, ``enqueue_trial``
    and ``trials_dataframe`` show the subset. With this package's samplers the subset has exactly
    k items, never ``protected`` ones; with another sampler (TPE, NSGA-II) each item is a free
    0/1 choice and the subset may have any size, which the objective must then handle.
    """
    space = subset_space(n, k, tuple(sorted({int(i) for i in protected})))
    sampler = trial.study.sampler if isinstance(trial, Trial) else None
    if isinstance(sampler, MaskSampler) and sampler.space != space:
        raise SpaceError(
            f"the study's sampler searches {sampler.space}, but the objective asks for {space}; "
            f"build the sampler with for_subset({n}, {k}) or call suggest_mask with its n and k"
        )
    with one_write_for_params(trial):  # n params, one storage commit
        params = {name: trial.suggest_categorical(name, [0, 1]) for name in space.param_names}
    return space.dropped_from_params(params)
