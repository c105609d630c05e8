"""The fitness must equal the plain forward pass of the pruned model, however it gets there."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from optuna_prune.model.calibration import CalibrationSet
from optuna_prune.model.fitness import (
    KLFitness,
    NonFiniteLossError,
    PerplexityFitness,
    plain_forward_loss,
)
from optuna_prune.model.importance import block_influence, lowest
from optuna_prune.model.layers import masked


def random_calibration(n: int = 3, t: int = 24, vocab: int = 256, seed: int = 0, clusters=None) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    return CalibrationSet(input_ids=ids, source="random", seed=seed, sha256="test", cluster_ids=clusters)


MASKS = [(), (0,), (2,), (1, 3), (3, 1), (1, 4), (5,), (0, 5), (2, 3, 4)]


def test_cached_fitness_equals_plain_forward_for_every_arch(tiny_model, arch):
    model = tiny_model(arch, num_layers=6)
    calib = random_calibration()
    fitness = PerplexityFitness(model, calib)
    for mask in MASKS:
        got = fitness.evaluate(mask).value
        assert got == pytest.approx(plain_forward_loss(model, calib, mask), rel=1e-4, abs=1e-5), mask


def test_prefix_cache_and_uncached_agree_and_cache_saves_layers(tiny_model):
    model = tiny_model("llama", num_layers=8)
    calib = random_calibration()
    cached = PerplexityFitness(model, calib, cache_bytes=1 << 26)
    uncached = PerplexityFitness(model, calib, cache_bytes=0)
    masks = [m for m in itertools.combinations(range(8), 2)]
    for mask in masks:
        assert cached.evaluate(mask).value == pytest.approx(uncached.evaluate(mask).value, rel=1e-5)
    assert cached.cache.hits > 0
    assert cached.layer_forwards < uncached.layer_forwards
    # The dense-prefix shortcut alone: a mask starting at layer j never runs layers 0..j.
    first = uncached.evaluate((5, 6))
    assert first.layer_forwards == calib.n_samples * 1  # only layer 7 runs


def test_identical_masks_are_not_scored_twice(tiny_model):
    fitness = PerplexityFitness(tiny_model("llama"), random_calibration())
    first = fitness.evaluate([3, 1])
    before = fitness.layer_forwards
    again = fitness.evaluate((1, 3))
    assert again.value == first.value and fitness.layer_forwards == before


def test_early_stop_is_exact(tiny_model):
    model = tiny_model("llama", num_layers=6)
    calib = random_calibration(n=4)
    full = PerplexityFitness(model, calib)
    values = {m: full.evaluate(m).value for m in MASKS[1:]}
    threshold = sorted(values.values())[len(values) // 2]
    fitness = PerplexityFitness(model, calib)
    for mask, value in values.items():
        result = fitness.evaluate(mask, stop_above=threshold)
        if result.complete:
            assert result.value == pytest.approx(value, rel=1e-6)
        else:
            # Stopped: its true loss exceeds the threshold, and the reported value is a lower bound.
            assert value > threshold
            assert threshold < result.value <= value + 1e-9
            assert len(result.samples) < calib.n_samples
        if value <= threshold:
            assert result.complete


def test_vocabulary_bound_stops_exactly_for_every_arch(tiny_model, arch):
    """The lower bound from a few head rows never stops a candidate that could still win (Gemma's
    softcap and OPT's project_out included), and a hopeless one stops without a full head."""
    model = tiny_model(arch, num_layers=6)
    calib = random_calibration(n=3)
    plain = PerplexityFitness(model, calib, bound_fraction=0)
    exact = {m: plain.evaluate(m).value for m in MASKS[1:]}
    fitness, other = (PerplexityFitness(model, calib, bound_fraction=1 / 8) for _ in range(2))
    heads = []
    model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    for mask, value in exact.items():
        below = fitness.evaluate(mask, stop_above=value * 0.999)  # cannot make it: may stop
        if below.complete:
            assert below.value == pytest.approx(value, rel=1e-5), mask
        else:  # a lower bound above the threshold
            assert value * 0.999 < below.value <= value + 1e-6, (mask, below.value, value)
        above = other.evaluate(mask, stop_above=value * 1.001)  # can make it: must be exact
        assert above.complete and above.value == pytest.approx(value, rel=1e-5), mask
    fresh = PerplexityFitness(model, calib, bound_fraction=1 / 8)
    heads.clear()
    hopeless = fresh.evaluate((0, 5), stop_above=exact[(0, 5)] / 4)
    assert not hopeless.complete and hopeless.samples == () and heads == []


def test_per_sample_bounds_are_below_the_losses_and_cost_no_full_head(tiny_model):
    """``iter_bounds`` (what staged selection ranks its stages on) gives, per sample, a lower
    bound of the loss ``iter_samples`` gives, without running the full LM head."""
    model = tiny_model("llama", num_layers=6)
    fitness = PerplexityFitness(model, random_calibration(n=3), bound_fraction=1 / 8)
    assert fitness.has_bound and not PerplexityFitness(model, random_calibration(n=3), bound_fraction=0).has_bound
    heads = []
    model.get_output_embeddings().register_forward_hook(lambda *_: heads.append(1))
    bounds = list(fitness.iter_bounds((1, 4)))
    assert heads == [] and [b.index for b in bounds] == [0, 1, 2]
    exact = list(fitness.iter_samples((1, 4)))
    assert all(0 < b.loss_sum <= e.loss_sum + 1e-6 for b, e in zip(bounds, exact, strict=True))
    assert [b.n_tokens for b in bounds] == [e.n_tokens for e in exact]
    assert any(b.loss_sum < 0.999 * e.loss_sum for b, e in zip(bounds, exact, strict=True))  # a bound, not a copy


def test_bound_fraction_is_checked(tiny_model):
    with pytest.raises(ValueError, match="bound_fraction"):
        PerplexityFitness(tiny_model("llama"), random_calibration(), bound_fraction=2)


def test_per_sample_results_stream_in_order(tiny_model):
    fitness = PerplexityFitness(tiny_model("llama"), random_calibration(n=3))
    seen = [s.index for s in fitness.iter_samples((2,))]
    assert seen == [0, 1, 2]
    result = fitness.evaluate((2,))
    assert result.value == pytest.approx(sum(s.loss_sum for s in result.samples) / result.total_tokens)


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0])  # dense log-probs cached, or recomputed by chunks
def test_kl_fitness_is_zero_dense_and_matches_plain(tiny_model, cache_bytes):
    model = tiny_model("qwen2", num_layers=6)
    calib = random_calibration()
    fitness = KLFitness(model, calib, dense_cache_bytes=cache_bytes)
    assert fitness.evaluate(()).value == 0.0
    for mask in [(1,), (2, 4), (0, 5)]:
        got = fitness.evaluate(mask).value
        assert got > 0
        assert got == pytest.approx(plain_forward_loss(model, calib, mask, kind="kl"), rel=1e-4, abs=1e-6)
    assert len(fitness._dense_logp) == (0 if cache_bytes == 0 else len(calib.input_ids))


def test_nan_loss_is_a_failure_not_a_score(tiny_model):
    model = tiny_model("llama", num_layers=6)
    fitness = PerplexityFitness(model, random_calibration())
    with torch.no_grad():
        for p in fitness.stack.layers[4].parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="NaN|nan"):
        fitness.evaluate((1,))
    assert math.isfinite(fitness.evaluate((4,)).value)  # dropping the broken layer is fine


def test_bad_masks_raise(tiny_model):
    fitness = PerplexityFitness(tiny_model("llama", num_layers=4), random_calibration())
    with pytest.raises(ValueError):
        fitness.evaluate((0, 1, 2, 3))
    with pytest.raises(ValueError):
        fitness.evaluate((7,))


def test_block_influence_ranks_layers(tiny_model):
    fitness = PerplexityFitness(tiny_model("llama", num_layers=6), random_calibration())
    scores = block_influence(fitness)
    assert len(scores) == 6 and all(0 <= s <= 2 for s in scores)
    chosen = lowest(scores, 2, protected=(0, 5))
    assert len(chosen) == 2 and not set(chosen) & {0, 5}
    assert all(scores[i] <= scores[j] for i in chosen for j in range(1, 5) if j not in chosen)


def test_chunked_token_losses_equal_the_whole_tensor_computation(tiny_model):
    """NLL, KL (to dense features or cached log-probs) and their gradients, computed 8 positions at a
    time, equal the plain computation on full [B, T, V] logits (Gemma: the softcap included)."""
    from optuna_prune.model.fitness import token_losses
    from optuna_prune.model.layers import lm_tail, model_features

    model = tiny_model("gemma3", num_layers=3)
    tail = lm_tail(model)
    ids = random_calibration(n=2, t=40).input_ids
    with torch.no_grad():
        dense = model_features(model, ids)
        with masked(model, [1]):
            features = model_features(model, ids)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    dense_logp = torch.log_softmax(tail.logits(dense[:, :-1]).float(), dim=-1)
    plain_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    plain_kl = F.kl_div(torch.log_softmax(logits, dim=-1), dense_logp, log_target=True, reduction="none").sum(-1)
    small = 8 * 4 * 256  # 8 positions of a 256-entry vocabulary: 10 chunks
    torch.testing.assert_close(token_losses(tail, features, ids, max_bytes=small), plain_nll, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(token_losses(tail, features, ids, dense, max_bytes=small), plain_kl.clamp_min(0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_losses(tail, features, ids, dense_logp, True, max_bytes=small),
                               plain_kl.clamp_min(0), rtol=1e-5, atol=1e-6)
    # Under autograd each chunk is recomputed in the backward pass; the gradient is the plain one.
    grads = []
    for chunked in (True, False):
        leaf = features.clone().requires_grad_()
        if chunked:
            loss = token_losses(tail, leaf, ids, max_bytes=small).mean()
        else:
            loss = F.cross_entropy(tail.logits(leaf[:, :-1]).float().transpose(1, 2), ids[:, 1:]).mean()
        loss.backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_fitness_never_builds_full_logits(tiny_model, monkeypatch):
    """Scoring a mask computes the head on chunks of positions, never on a whole sample at once."""
    import optuna_prune.model.fitness as fitness

    model = tiny_model("llama", num_layers=4)
    calib = random_calibration(n=2, t=40)
    monkeypatch.setattr(fitness, "LOGIT_CHUNK_BYTES", 8 * 4 * 256)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    plain = plain_forward_loss(model, calib, [1, 2])
    rows.clear()
    value = PerplexityFitness(model, calib, bound_fraction=0, verify=False).evaluate([1, 2]).value
    assert value == pytest.approx(plain, rel=1e-6) and rows and max(rows) <= 8
