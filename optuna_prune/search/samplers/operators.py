"""Genetic operators on boolean layer masks (True = dropped), as pure numpy functions.

Crossover and bit-flip mutation do not preserve the number of dropped layers; ``repair`` (EvoP's
"double mutation") restores exactly k afterwards. ``swap_mutation`` (a "level switch": one dropped
layer comes back, one kept layer goes) preserves k by construction. Every function takes the
random state explicitly so that a seed fixes the offspring.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from optuna_prune.search.space import LayerMaskSpace

Crossover = Callable[[np.ndarray, np.ndarray, np.random.RandomState], np.ndarray]


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"parents must be 1-d masks of equal length, got {a.shape} and {b.shape}")
    return a, b


def uniform_crossover(
    a: np.ndarray, b: np.ndarray, rng: np.random.RandomState, swap_prob: float = 0.5
) -> np.ndarray:
    """Each position comes from ``b`` with probability ``swap_prob``, else from ``a``."""
    a, b = _check_pair(a, b)
    return np.where(rng.rand(a.size) < swap_prob, b, a)


def one_point_crossover(a: np.ndarray, b: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """``a`` before a random cut, ``b`` from it on (cut in 1..L-1, so both parents contribute)."""
    a, b = _check_pair(a, b)
    if a.size < 2:
        return a.copy()
    cut = rng.randint(1, a.size)
    return np.concatenate([a[:cut], b[cut:]])


def two_point_crossover(a: np.ndarray, b: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """``b`` between two distinct random cuts, ``a`` outside them."""
    a, b = _check_pair(a, b)
    if a.size < 3:
        return one_point_crossover(a, b, rng)
    lo, hi = np.sort(rng.choice(np.arange(1, a.size), size=2, replace=False))
    child = a.copy()
    child[lo:hi] = b[lo:hi]
    return child


CROSSOVERS: dict[str, Crossover] = {
    "uniform": uniform_crossover,
    "one_point": one_point_crossover,
    "two_point": two_point_crossover,
}


def bit_flip_mutation(mask: np.ndarray, rng: np.random.RandomState, prob: float) -> np.ndarray:
    """Flip each position independently with probability ``prob``."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ (rng.rand(mask.size) < prob)


def swap_mutation(
    mask: np.ndarray, rng: np.random.RandomState, droppable: np.ndarray | None = None
) -> np.ndarray:
    """Restore one random dropped layer and drop one random kept layer ("level switch").

    ``droppable`` (boolean, default all True) limits which kept layers may be dropped, so
    protected layers stay kept. The count of dropped layers is unchanged.
    """
    mask = np.asarray(mask, dtype=bool)
    allowed = np.ones(mask.size, dtype=bool) if droppable is None else np.asarray(droppable, bool)
    dropped = np.flatnonzero(mask)
    kept = np.flatnonzero(~mask & allowed)
    out = mask.copy()
    if dropped.size == 0 or kept.size == 0:
        return out
    out[rng.choice(dropped)] = False
    out[rng.choice(kept)] = True
    return out


def repair(mask: np.ndarray, space: LayerMaskSpace, rng: np.random.RandomState) -> np.ndarray:
    """Exactly ``space.num_drop`` dropped, none protected; see :meth:`LayerMaskSpace.repair`."""
    return space.repair(mask, rng)
