"""The search space of layer-wise width-pruning rates with an exact mean (Self-Pruner's rates).

Layer ``l`` removes ``units[l] / resolution`` of its MLP channels, ``0 <= units[l] <= max_units``,
and the units sum to a fixed ``total``, so the mean rate is ``total / (resolution * L)`` for every
candidate by construction. Optuna sees one int param per layer (``rate_00 = units[0]``).

Such a vector is an exact-``total`` subset of ``L * max_units`` "unit slots" (slot
``l * max_units + j`` is set iff ``j < units[l]``), so :class:`RateSpace` is a
:class:`~optuna_prune.search.space.LayerMaskSpace` over slots: every mask sampler, crossover, mutation and
repair works on it unchanged, and repair restores the sum by moving units between layers. A
candidate is identified by its canonical slot set (the first ``units[l]`` slots of each layer's
block), which :meth:`RateSpace.from_array` returns, so deduplication compares rate vectors.
Search side: numpy and optuna only.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from optuna.distributions import IntDistribution

from optuna_prune.search.space import LayerMaskSpace, SpaceError


class RateSpace(LayerMaskSpace):
    """Per-layer pruning units (of ``1 / resolution`` each) summing to ``total``.

    Args:
        num_layers: Decoder layers L.
        total: Units pruned over all layers (``round(sparsity * resolution * L)``, see
            :meth:`for_sparsity`).
        resolution: R, units per layer's full width: rates are multiples of ``1 / R``.
        max_units: Most units one layer may lose; default ``R - 1`` (every layer keeps some channels).
        protected: Layers that are never pruned (units 0).

    ``num_layers``, ``num_drop`` and ``protected`` inherited from LayerMaskSpace count slots; the
    layer-level values are ``n_layers``, ``total`` and ``protected_layers``.
    """

    def __init__(
        self,
        num_layers: int,
        total: int,
        *,
        resolution: int = 16,
        max_units: int | None = None,
        protected: Sequence[int] = (),
    ) -> None:
        for name, value in (("num_layers", num_layers), ("total", total), ("resolution", resolution)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise SpaceError(f"{name}={value!r} is not an integer")
        if resolution < 2:
            raise SpaceError(f"resolution={resolution} must be >= 2 (rates in steps of 1/resolution)")
        units = resolution - 1 if max_units is None else int(max_units)
        if not 1 <= units <= resolution:
            raise SpaceError(f"max_units={max_units} must lie in 1..{resolution} (the resolution)")
        if num_layers < 1:
            raise SpaceError(f"num_layers={num_layers} must be >= 1")
        layers = tuple(sorted({int(i) for i in protected}))
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise SpaceError(f"protected layers {bad} are outside 0..{num_layers - 1}")
        free = (num_layers - len(layers)) * units
        if not 1 <= total < free:
            raise SpaceError(
                f"total={total} units cannot be spread over {num_layers - len(layers)} prunable layers "
                f"of at most {units} units each; choose 1..{max(free - 1, 1)} (a lower sparsity)"
            )
        slots = [i * units + j for i in layers for j in range(units)]
        super().__init__(int(num_layers) * units, int(total), slots)
        self.n_layers = int(num_layers)
        self.total = int(total)
        self.resolution = int(resolution)
        self.max_units = units
        self.protected_layers = layers
        width = max(2, len(str(self.n_layers)))
        self.param_names = [f"rate_{i:0{width}d}" for i in range(self.n_layers)]

    @classmethod
    def for_sparsity(
        cls,
        num_layers: int,
        sparsity: float,
        *,
        resolution: int = 16,
        max_units: int | None = None,
        protected: Sequence[int] = (),
    ) -> RateSpace:
        """The space whose mean rate is ``sparsity`` rounded to a multiple of ``1 / (resolution * L)``."""
        if not 0.0 < float(sparsity) < 1.0:
            raise SpaceError(f"sparsity={sparsity!r} must lie strictly between 0 and 1, e.g. 0.2")
        total = round(float(sparsity) * resolution * num_layers)
        return cls(num_layers, total, resolution=resolution, max_units=max_units, protected=protected)

    def __repr__(self) -> str:
        return (
            f"RateSpace(num_layers={self.n_layers}, total={self.total}, resolution={self.resolution}, "
            f"max_units={self.max_units}, protected={list(self.protected_layers)})"
        )

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    @property
    def mean_rate(self) -> float:
        """The mean pruning rate of every candidate, ``total / (resolution * L)``."""
        return self.total / (self.resolution * self.n_layers)

    @property
    def n_candidates(self) -> int:
        """How many unit vectors exist (bounded compositions of ``total``), not slot subsets."""
        return _compositions(self.n_layers - len(self.protected_layers), self.max_units, self.total)

    # --- unit vectors <-> canonical slot sets ----------------------------------------------------

    def units(self, candidate: Iterable[int] | np.ndarray) -> tuple[int, ...]:
        """Units per layer of a slot set (any, not only canonical) or slot mask."""
        arr = self.to_array(candidate)
        return tuple(int(u) for u in arr.reshape(self.n_layers, self.max_units).sum(axis=1))

    def from_units(self, units: Sequence[int]) -> tuple[int, ...]:
        """The canonical slot set of a unit vector (any sum: :meth:`is_valid` checks the total)."""
        values = [int(u) for u in units]
        if len(values) != self.n_layers or any(not 0 <= u <= self.max_units for u in values):
            raise SpaceError(
                f"units {values} must be {self.n_layers} integers in 0..{self.max_units}"
            )
        return tuple(i * self.max_units + j for i, u in enumerate(values) for j in range(u))

    def rates(self, candidate: Iterable[int] | np.ndarray) -> tuple[float, ...]:
        """Pruning rate of each layer (fraction of its MLP channels)."""
        return tuple(u / self.resolution for u in self.units(candidate))

    def candidates(self) -> Iterator[tuple[int, ...]]:
        """Every valid candidate (canonical), for spaces small enough to list."""
        free = [i for i in range(self.n_layers) if i not in self.protected_layers]

        def fill(pos: int, left: int, units: list[int]) -> Iterator[tuple[int, ...]]:
            if pos == len(free):
                if left == 0:
                    yield self.from_units(units)
                return
            room = self.max_units * (len(free) - pos - 1)
            for u in range(max(0, left - room), min(self.max_units, left) + 1):
                units[free[pos]] = u
                yield from fill(pos + 1, left - u, units)
            units[free[pos]] = 0

        yield from fill(0, self.total, [0] * self.n_layers)

    # --- LayerMaskSpace interface in layer terms -----------------------------------------------

    def distributions(self) -> dict[str, IntDistribution]:  # type: ignore[override]
        """One int per layer: the units it loses."""
        return {name: IntDistribution(0, self.max_units) for name in self.param_names}

    def to_params(self, dropped: Iterable[int] | np.ndarray) -> dict[str, int]:
        return dict(zip(self.param_names, self.units(dropped), strict=True))

    def dropped_from_params(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        missing = [name for name in self.param_names if name not in params]
        if missing:
            raise SpaceError(
                f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''}: a rate vector needs all "
                f"{self.n_layers} rate params (is this study for a {self.n_layers}-layer model?)"
            )
        return self.from_units([int(params[name]) for name in self.param_names])

    def from_array(self, arr: np.ndarray) -> tuple[int, ...]:
        """The canonical slot set with the same units per layer as the slot mask ``arr``."""
        arr = np.asarray(arr)
        if arr.shape != (self.num_layers,):
            raise SpaceError(f"mask of shape {arr.shape}; expected ({self.num_layers},)")
        return self.from_units(arr.astype(bool).reshape(self.n_layers, self.max_units).sum(axis=1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "rates",
            "num_layers": self.n_layers,
            "total": self.total,
            "resolution": self.resolution,
            "max_units": self.max_units,
            "protected": list(self.protected_layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RateSpace:
        return cls(
            int(data["num_layers"]), int(data["total"]), resolution=int(data["resolution"]),
            max_units=int(data["max_units"]), protected=data.get("protected", ()),
        )


@functools.lru_cache(maxsize=256)
def _compositions(parts: int, most: int, total: int) -> int:
    """Ways to write ``total`` as ``parts`` ordered integers in 0..most."""
    ways = [1] + [0] * total
    for _ in range(parts):
        prefix = list(itertools.accumulate(ways, initial=0))
        ways = [prefix[t + 1] - prefix[max(0, t - most)] for t in range(total + 1)]
    return ways[total]
