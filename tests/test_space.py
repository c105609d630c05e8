"""The mask space and the genetic operators: exact-k masks, repair, crossover, mutation."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optuna_prune.search.record import ALLOW_PARTIAL_KEY, STOP_ABOVE_KEY
from optuna_prune.search.samplers import operators
from optuna_prune.search.space import (
    LayerMaskSpace,
    SpaceError,
    resolve_num_drop,
    sampler_hints,
)


@st.composite
def spaces(draw: st.DrawFn) -> LayerMaskSpace:
    """Random L in 2..64, protected layers leaving at least one free, k in 1..min(L', L-1)."""
    n = draw(st.integers(2, 64))
    protected = draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    n_free = n - len(protected)
    k = draw(st.integers(1, min(n_free, n - 1)))
    return LayerMaskSpace(n, k, sorted(protected))


# --- resolve_num_drop ------------------------------------------------------------------------


def test_resolve_num_drop_examples() -> None:
    assert resolve_num_drop(32, sparsity=0.25) == 8
    assert resolve_num_drop(30, sparsity=0.2) == 6
    assert resolve_num_drop(30, drop=9) == 9


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_layers=30), "exactly one"),
        (dict(num_layers=30, sparsity=0.2, drop=3), "exactly one"),
        (dict(num_layers=30, sparsity=0.0), "strictly between"),
        (dict(num_layers=30, sparsity=1.0), "strictly between"),
        (dict(num_layers=30, sparsity=0.01), "drop at least 1"),
        (dict(num_layers=30, sparsity=0.99), "keep at least 1"),
        (dict(num_layers=30, drop=0), "drop at least 1"),
        (dict(num_layers=30, drop=30), "keep at least 1"),
        (dict(num_layers=1, drop=1), "at least 2 layers"),
        (dict(num_layers=30, drop=2.5), "not an integer"),
    ],
)
def test_resolve_num_drop_errors_name_the_value(kwargs: dict, fragment: str) -> None:
    with pytest.raises(SpaceError, match=fragment) as info:
        resolve_num_drop(**kwargs)
    assert "\n" not in str(info.value)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 64), st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
def test_resolve_num_drop_sparsity_property(n: int, sparsity: float) -> None:
    expected = round(sparsity * n)
    if 1 <= expected < n:
        assert resolve_num_drop(n, sparsity=sparsity) == expected
    else:
        with pytest.raises(SpaceError):
            resolve_num_drop(n, sparsity=sparsity)


# --- LayerMaskSpace --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "first", "last"),
    [(5, "layer_00", "layer_04"), (30, "layer_00", "layer_29"), (100, "layer_000", "layer_099")],
)
def test_param_names_are_zero_padded_and_sort_like_layers(n: int, first: str, last: str) -> None:
    space = LayerMaskSpace(n, 2)
    assert space.param_names[0] == first and space.param_name(n - 1) == last
    assert sorted(space.param_names) == space.param_names
    dists = space.distributions()
    assert list(dists) == space.param_names
    assert all(d == optuna.distributions.CategoricalDistribution([0, 1]) for d in dists.values())


def test_params_round_trip_and_missing_param_error() -> None:
    space = LayerMaskSpace(12, 3, protected=[0])
    params = space.to_params([7, 2, 11])
    assert sum(params.values()) == 3 and params["layer_02"] == 1
    assert space.dropped_from_params(params) == (2, 7, 11)
    assert space.from_array(space.to_array((2, 7, 11))) == (2, 7, 11)
    with pytest.raises(SpaceError, match="layer_11"):
        space.dropped_from_params({k: v for k, v in params.items() if k != "layer_11"})
    with pytest.raises(SpaceError):
        space.to_params([12])


def test_is_valid() -> None:
    space = LayerMaskSpace(8, 3, protected=[0, 7])
    assert space.is_valid((1, 2, 3))
    assert space.is_valid(space.to_array((1, 2, 3)))
    assert not space.is_valid((1, 2))  # too few
    assert not space.is_valid((1, 2, 3, 4))  # too many
    assert not space.is_valid((0, 2, 3))  # protected
    assert not space.is_valid((1, 2, 8))  # out of range
    assert not space.is_valid((1, 1, 2))  # repeated
    assert space.n_candidates == 20


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((8, 3, [8]), "outside"),
        ((8, 7, [0, 1]), "impossible"),
        ((8, 0), "impossible"),
        ((1, 1), "at least 2"),
    ],
)
def test_space_constructor_errors(args: tuple, fragment: str) -> None:
    with pytest.raises(SpaceError, match=fragment):
        LayerMaskSpace(*args)


def test_dict_round_trip() -> None:
    space = LayerMaskSpace(30, 7, protected=[0, 29])
    assert LayerMaskSpace.from_dict(space.to_dict()) == space
    assert space != LayerMaskSpace(30, 7)


@settings(max_examples=300, deadline=None)
@given(spaces(), st.integers(0, 2**32 - 1), st.data())
def test_repair_gives_exactly_k_deterministically(
    space: LayerMaskSpace, seed: int, data: st.DataObject
) -> None:
    bits = data.draw(st.lists(st.booleans(), min_size=space.num_layers, max_size=space.num_layers))
    mask = np.array(bits, dtype=bool)
    repaired = space.repair(mask, np.random.RandomState(seed))
    assert space.is_valid(repaired)
    assert np.array_equal(repaired, space.repair(mask, np.random.RandomState(seed)))
    assert np.array_equal(mask, np.array(bits))  # the input is not modified
    # Repair only ever flips away from the input where it must.
    free = space.to_array(space.droppable)
    kept_ok = mask & free
    if kept_ok.sum() >= space.num_drop:
        assert not (repaired & ~kept_ok).any()
    else:
        assert not (kept_ok & ~repaired).any()


@settings(max_examples=200, deadline=None)
@given(spaces(), st.integers(0, 2**32 - 1))
def test_repair_leaves_valid_masks_alone(space: LayerMaskSpace, seed: int) -> None:
    rng = np.random.RandomState(seed)
    valid = space.random_mask(rng)
    assert space.is_valid(valid)
    state = rng.get_state()[1].copy()
    assert np.array_equal(space.repair(valid, rng), valid)
    assert np.array_equal(rng.get_state()[1], state)  # no random numbers drawn


def test_sampler_hints_reads_live_and_frozen_trials() -> None:
    study = optuna.create_study()
    trial = study.ask()
    assert sampler_hints(trial).stop_above is None
    study._storage.set_trial_system_attr(trial._trial_id, STOP_ABOVE_KEY, 1.5)
    study._storage.set_trial_system_attr(trial._trial_id, ALLOW_PARTIAL_KEY, True)
    assert sampler_hints(trial).stop_above == 1.5 and sampler_hints(trial).allow_partial
    frozen = study._storage.get_trial(trial._trial_id)
    assert sampler_hints(frozen).allow_partial


# --- operators -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(spaces(), st.integers(0, 2**32 - 1), st.sampled_from(sorted(operators.CROSSOVERS)))
def test_crossover_children_inherit_and_repair_to_k(
    space: LayerMaskSpace, seed: int, name: str
) -> None:
    rng = np.random.RandomState(seed)
    a, b = space.random_mask(rng), space.random_mask(rng)
    child = operators.CROSSOVERS[name](a, b, rng)
    assert child.shape == a.shape and child.dtype == bool
    assert np.all((child == a) | (child == b))  # every layer comes from a parent
    fixed = operators.repair(child, space, rng)
    assert space.is_valid(fixed)
    again = np.random.RandomState(seed)
    a2, b2 = space.random_mask(again), space.random_mask(again)
    assert np.array_equal(operators.CROSSOVERS[name](a2, b2, again), child)


def test_point_crossovers_cut_into_segments() -> None:
    a = np.zeros(10, dtype=bool)
    b = np.ones(10, dtype=bool)
    rng = np.random.RandomState(0)
    for _ in range(50):
        one = operators.one_point_crossover(a, b, rng)
        assert not one[0] and one[-1] and np.all(np.diff(one.astype(int)) >= 0)
        two = operators.two_point_crossover(a, b, rng)
        assert not two[0] and not two[-1] and np.count_nonzero(np.diff(two.astype(int))) == 2


@settings(max_examples=200, deadline=None)
@given(spaces(), st.integers(0, 2**32 - 1))
def test_swap_mutation_keeps_k_and_protected(space: LayerMaskSpace, seed: int) -> None:
    rng = np.random.RandomState(seed)
    mask = space.random_mask(rng)
    out = operators.swap_mutation(mask, rng, space.to_array(space.droppable))
    assert space.is_valid(out)
    if len(space.droppable) > space.num_drop:
        assert np.count_nonzero(out != mask) == 2


def test_bit_flip_mutation_extremes() -> None:
    rng = np.random.RandomState(0)
    mask = np.array([True, False, True, False])
    assert np.array_equal(operators.bit_flip_mutation(mask, rng, 0.0), mask)
    assert np.array_equal(operators.bit_flip_mutation(mask, rng, 1.0), ~mask)
