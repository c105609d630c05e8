"""The search space: which k of an LLM's L decoder layers to drop, as Optuna parameters.

A candidate is a set of dropped layer indices, or equivalently a boolean mask of length L. Every
sampler proposes it as one categorical parameter per layer (``layer_07 = 1`` means "dropped"), so
the dashboard, ``trials_dataframe`` and ``enqueue_trial`` all speak the same language.
:class:`SubBlockSpace` does the same over the 2L attention and MLP blocks. :func:`sampler_hints`
reads the trial attributes (:mod:`optuna_prune.search.record`) through which samplers talk to the objective.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import CategoricalDistribution
from optuna.trial import BaseTrial, FrozenTrial

from optuna_prune.search import compat
from optuna_prune.search.record import ALLOW_PARTIAL_KEY, STOP_ABOVE_KEY


class SpaceError(ValueError):
    """A layer count, drop count or mask that does not describe a valid pruning problem."""


def resolve_num_drop(
    num_layers: int, sparsity: float | None = None, drop: int | None = None
) -> int:
    """The number of layers to drop, from either a sparsity in (0, 1) or an explicit count.

    A sparsity becomes ``round(sparsity * num_layers)`` (Python rounding). Exactly one of the two
    must be given, and at least one layer must be dropped and one kept.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
        raise SpaceError(
            f"num_layers={num_layers!r} is not an integer; pass the model's layer count"
        )
    if num_layers < 2:
        raise SpaceError(
            f"num_layers={num_layers}: need at least 2 layers to drop one and keep one"
        )
    if (sparsity is None) == (drop is None):
        raise SpaceError(
            f"got sparsity={sparsity!r} and drop={drop!r}: give exactly one of them "
            "(e.g. sparsity=0.25 or drop=8)"
        )
    if sparsity is not None:
        if not 0.0 < float(sparsity) < 1.0:
            raise SpaceError(f"sparsity={sparsity!r} must lie strictly between 0 and 1, e.g. 0.25")
        k = round(float(sparsity) * num_layers)
        source = f"sparsity={sparsity} of {num_layers} layers"
    else:
        if isinstance(drop, bool) or not isinstance(drop, (int, np.integer)):
            raise SpaceError(f"drop={drop!r} is not an integer; pass a layer count such as drop=8")
        k = int(drop)
        source = f"drop={drop}"
    if k < 1:
        raise SpaceError(f"{source} drops {k} layers; drop at least 1 (raise sparsity or drop)")
    if k >= num_layers:
        raise SpaceError(
            f"{source} drops {k} of {num_layers} layers; keep at least 1 (lower sparsity or drop)"
        )
    return int(k)


class LayerMaskSpace:
    """Exact-k subsets of ``range(num_layers)`` that avoid the ``protected`` layers.

    Masks are boolean arrays (True = dropped); sets of dropped layers are sorted int tuples, which
    are hashable and serve as the identity of a candidate everywhere (dedup, seeds, results).
    """

    def __init__(self, num_layers: int, num_drop: int, protected: Sequence[int] = ()) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
            raise SpaceError(f"num_layers={num_layers!r} is not an integer")
        if num_layers < 2:
            raise SpaceError(f"num_layers={num_layers}: need at least 2 layers")
        prot = tuple(sorted({int(i) for i in protected}))
        bad = [i for i in prot if not 0 <= i < num_layers]
        if bad:
            raise SpaceError(
                f"protected layers {bad} are outside 0..{num_layers - 1}; fix the protected list"
            )
        n_free = num_layers - len(prot)
        if isinstance(num_drop, bool) or not isinstance(num_drop, (int, np.integer)):
            raise SpaceError(f"num_drop={num_drop!r} is not an integer")
        if not 1 <= num_drop <= n_free or num_drop >= num_layers:
            raise SpaceError(
                f"num_drop={num_drop} is impossible with {num_layers} layers of which "
                f"{len(prot)} are protected; choose 1..{min(n_free, num_layers - 1)}"
            )
        self.num_layers = int(num_layers)
        self.num_drop = int(num_drop)
        self.protected: tuple[int, ...] = prot
        width = max(2, len(str(self.num_layers)))  # 3 digits from 100 layers on
        self.param_names: list[str] = [f"layer_{i:0{width}d}" for i in range(self.num_layers)]
        self._index = {name: i for i, name in enumerate(self.param_names)}
        free = np.ones(self.num_layers, dtype=bool)
        free[list(prot)] = False
        self._droppable_mask = free
        self.droppable: tuple[int, ...] = tuple(int(i) for i in np.flatnonzero(free))

    def __repr__(self) -> str:
        return (
            f"LayerMaskSpace(num_layers={self.num_layers}, num_drop={self.num_drop}, "
            f"protected={list(self.protected)})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LayerMaskSpace):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.num_layers, self.num_drop, self.protected))

    @property
    def n_candidates(self) -> int:
        """How many valid masks exist: C(L', k) with L' the non-protected layers."""
        return math.comb(len(self.droppable), self.num_drop)

    def param_name(self, i: int) -> str:
        return self.param_names[i]

    def distributions(self) -> dict[str, CategoricalDistribution]:
        """One {0, 1} categorical per layer; 1 means the layer is dropped."""
        return {name: CategoricalDistribution([0, 1]) for name in self.param_names}

    def _indices(self, dropped: Iterable[int] | np.ndarray) -> tuple[int, ...]:
        if isinstance(dropped, np.ndarray) and dropped.dtype == bool:
            return self.from_array(dropped)
        idx = tuple(sorted({int(i) for i in dropped}))
        if idx and (idx[0] < 0 or idx[-1] >= self.num_layers):
            raise SpaceError(f"dropped layers {list(idx)} fall outside 0..{self.num_layers - 1}")
        return idx

    def to_params(self, dropped: Iterable[int] | np.ndarray) -> dict[str, int]:
        """The trial params of a set of dropped layers (any count, so partial masks work too)."""
        drop = set(self._indices(dropped))
        return {name: int(i in drop) for i, name in enumerate(self.param_names)}

    def dropped_from_params(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        """The dropped layers encoded in a trial's params; every layer param must be present."""
        missing = [name for name in self.param_names if name not in params]
        if missing:
            raise SpaceError(
                f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''}: a mask needs all "
                f"{self.num_layers} layer params (is this study for a {self.num_layers}-layer model?)"
            )
        return tuple(i for i, name in enumerate(self.param_names) if int(params[name]) == 1)

    def to_array(self, dropped: Iterable[int] | np.ndarray) -> np.ndarray:
        arr = np.zeros(self.num_layers, dtype=bool)
        arr[list(self._indices(dropped))] = True
        return arr

    def from_array(self, arr: np.ndarray) -> tuple[int, ...]:
        arr = np.asarray(arr)
        if arr.shape != (self.num_layers,):
            raise SpaceError(f"mask of shape {arr.shape}; expected ({self.num_layers},)")
        return tuple(int(i) for i in np.flatnonzero(arr))

    def is_valid(self, dropped: Iterable[int] | np.ndarray) -> bool:
        """Exactly k distinct layers, all in range and none protected."""
        if isinstance(dropped, np.ndarray) and dropped.dtype == bool:
            if dropped.shape != (self.num_layers,):
                return False
            idx = self.from_array(dropped)
        else:
            raw = [int(i) for i in dropped]
            idx = tuple(sorted(set(raw)))
            if len(idx) != len(raw):
                return False
        return (
            len(idx) == self.num_drop
            and all(0 <= i < self.num_layers for i in idx)
            and not set(idx) & set(self.protected)
        )

    def repair(self, mask: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """EvoP's "double mutation": flip random positions until exactly k layers are dropped.

        Protected layers are restored first; then random kept (droppable) layers are dropped if
        too few are dropped, or random dropped layers are restored if too many. A valid mask comes
        back unchanged (and no random numbers are drawn), so repair never undoes good offspring.
        """
        out = np.array(mask, dtype=bool, copy=True)
        if out.shape != (self.num_layers,):
            raise SpaceError(f"mask of shape {out.shape}; expected ({self.num_layers},)")
        out &= self._droppable_mask
        n = int(out.sum())
        if n < self.num_drop:
            kept = np.flatnonzero(~out & self._droppable_mask)
            out[rng.choice(kept, size=self.num_drop - n, replace=False)] = True
        elif n > self.num_drop:
            dropped = np.flatnonzero(out)
            out[rng.choice(dropped, size=n - self.num_drop, replace=False)] = False
        return out

    def random_mask(self, rng: np.random.RandomState) -> np.ndarray:
        """A uniformly random valid mask."""
        out = np.zeros(self.num_layers, dtype=bool)
        out[rng.choice(np.asarray(self.droppable), size=self.num_drop, replace=False)] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for study system/user attrs."""
        return {
            "num_layers": self.num_layers,
            "num_drop": self.num_drop,
            "protected": list(self.protected),
        }

    def ends(self) -> tuple[int, ...]:
        """The units of the first and the last layer (SLEB keeps them)."""
        return (0, self.num_layers - 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerMaskSpace:
        """The space ``to_dict`` described (a :class:`SubBlockSpace` where it says so)."""
        if cls is LayerMaskSpace and data.get("granularity") == SubBlockSpace.granularity:
            cls = SubBlockSpace
        return cls(int(data["num_layers"]), int(data["num_drop"]), data.get("protected", ()))


class SubBlockSpace(LayerMaskSpace):
    """Exact-k subsets of the 2L sub-blocks of L decoder layers: attention and MLP drop separately.

    Unit ``2 l`` is layer ``l``'s attention, ``2 l + 1`` its MLP; a layer with both dropped is gone.
    Attention blocks are often cheaper to lose than MLPs, so at the same count of dropped units a
    search can keep more of the model's quality than whole-layer drops. Every mask sampler works on
    it unchanged. ``num_layers``, ``num_drop`` and ``protected`` inherited from LayerMaskSpace count
    units; ``n_layers`` and ``protected_layers`` are the layer-level values. Params are
    ``layer_07_attn`` and ``layer_07_mlp``.
    """

    granularity = "sublayers"
    PARTS = ("attn", "mlp")

    def __init__(self, num_layers: int, num_drop: int, protected: Sequence[int] = ()) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
            raise SpaceError(f"num_layers={num_layers!r} is not an integer")
        layers = tuple(sorted({int(i) for i in protected}))
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise SpaceError(f"protected layers {bad} are outside 0..{num_layers - 1}; fix the protected list")
        super().__init__(2 * int(num_layers), num_drop, [2 * i + p for i in layers for p in (0, 1)])
        self.n_layers = int(num_layers)
        self.protected_layers = layers
        width = max(2, len(str(self.n_layers)))
        self.param_names = [f"layer_{i:0{width}d}_{part}" for i in range(self.n_layers) for part in self.PARTS]
        self._index = {name: i for i, name in enumerate(self.param_names)}

    def __repr__(self) -> str:
        return (
            f"SubBlockSpace(num_layers={self.n_layers}, num_drop={self.num_drop}, "
            f"protected={list(self.protected_layers)})"
        )

    def ends(self) -> tuple[int, ...]:
        return (0, 1, self.num_layers - 2, self.num_layers - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "num_layers": self.n_layers,
            "num_drop": self.num_drop,
            "protected": list(self.protected_layers),
        }


@dataclass(frozen=True)
class SamplerHints:
    """What the sampler asked of the objective for one trial."""

    stop_above: float | None = None
    allow_partial: bool = False


def sampler_hints(trial: BaseTrial) -> SamplerHints:
    """Read STOP_ABOVE_KEY and ALLOW_PARTIAL_KEY from a live or frozen trial.

    ``optuna.Trial`` has no public system attrs in Optuna 5, so a live trial is read from storage.
    """
    if isinstance(trial, FrozenTrial):
        attrs = trial.system_attrs
    else:
        attrs = trial.storage.get_trial_system_attrs(compat.trial_id(trial))  # type: ignore[attr-defined]
    stop = attrs.get(STOP_ABOVE_KEY)
    return SamplerHints(
        stop_above=None if stop is None else float(stop),
        allow_partial=bool(attrs.get(ALLOW_PARTIAL_KEY, False)),
    )
