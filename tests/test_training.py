"""Short fine-tunes of a masked model: they reduce the loss, never leak into the next candidate,
are deterministic, and train on text apart from the calibration samples."""

from __future__ import annotations

import pytest
import torch

from optuna_prune.model.calibration import CalibrationError, build_calibration
from optuna_prune.model.fitness import token_losses
from optuna_prune.model.layers import find_layer_stack, lm_tail, masked, model_features
from optuna_prune.model.training import (
    MaskTraining,
    ParamSnapshot,
    TrainingError,
    TrainSettings,
    token_data,
    training_windows,
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _ids(n: int = 6, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lora", [0, 4])
def test_weights_flags_and_structure_are_exactly_restored(tiny_model, lora: int) -> None:
    if lora:
        pytest.importorskip("peft")
    model = tiny_model("llama", num_layers=6)
    data = token_data(model, _ids(), "kl")
    before = _state(model)
    modules = [type(m).__name__ for m in model.modules()]
    with MaskTraining(model, (1, 3), data, TrainSettings(lr=1e-2, lora=lora), ParamSnapshot(model)) as run:
        untrained = run.score(data, loss="kl")
        run.train(4)
        assert run.score(data, loss="kl") != untrained
        stack = find_layer_stack(model)
        assert all(not p.requires_grad for i in (1, 3) for p in stack.layers[i].parameters())
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert [type(m).__name__ for m in model.modules()] == modules  # LoRA layers removed
    assert find_layer_stack(model).num_layers == 6 and not model.training


def test_restore_happens_when_training_fails(tiny_model) -> None:
    model = tiny_model("llama", num_layers=4)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), MaskTraining(
        model, (2,), token_data(model, _ids(), "lm"), TrainSettings("lm", lr=1e-2), ParamSnapshot(model)
    ) as run:
        run.train(3)
        raise RuntimeError("boom")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert find_layer_stack(model).num_layers == 4


def test_candidates_in_sequence_equal_candidates_alone(tiny_model) -> None:
    settings = TrainSettings(loss="kl", lr=1e-2)

    def train(model, dropped, snapshot, data):
        with MaskTraining(model, dropped, data, settings, snapshot) as run:
            losses = run.train(3)
            losses += run.train(2)  # a second stage continues the same fine-tune
            return losses, run.score(data, loss="kl"), _state(model)

    shared = tiny_model("llama", num_layers=6)
    shared_data = token_data(shared, _ids(), "kl")
    snapshot = ParamSnapshot(shared)
    train(shared, (1, 2), snapshot, shared_data)
    in_sequence = train(shared, (3, 4), snapshot, shared_data)

    alone = tiny_model("llama", num_layers=6)
    by_itself = train(alone, (3, 4), ParamSnapshot(alone), token_data(alone, _ids(), "kl"))
    assert in_sequence[0] == by_itself[0] and in_sequence[1] == by_itself[1]
    assert all(torch.equal(in_sequence[2][n], by_itself[2][n]) for n in by_itself[2])


def test_training_reduces_the_loss(tiny_model) -> None:
    model = tiny_model("llama", num_layers=4)
    ids = 10 + (torch.arange(24) + torch.arange(4)[:, None]) % 6  # learnable: a cycle of 6 tokens
    data = token_data(model, torch.cat([ids, ids]), "lm")  # two epochs
    with MaskTraining(model, (1,), data, TrainSettings(loss="lm", lr=3e-3), ParamSnapshot(model)) as run:
        before = sum(run.score(data, 4))
        losses = run.train(4) + run.train(4)
        after = sum(run.score(data, 4))
    assert after < 0.9 * before and losses[-1] < losses[0]


def test_kl_targets_are_the_dense_logits_and_score_zero_unmasked(tiny_model) -> None:
    model = tiny_model("qwen3", num_layers=4)  # tied embeddings: the tail is never trained
    ids = _ids(n=2)
    data = token_data(model, ids, "kl")
    tail = lm_tail(model)
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=False).logits
        assert torch.allclose(tail(data.dense_hidden), dense, atol=1e-5)
        features = tail.features(data.dense_hidden)
        assert float(token_losses(tail, features, ids, features).max()) < 1e-6
        with masked(model, (1,)):
            pruned = model_features(model, ids)
        kl = token_losses(tail, pruned, ids, features)
    assert kl.shape == (2, ids.shape[1] - 1) and float(kl.min()) >= 0 and float(kl.sum()) > 0
    with pytest.raises(ValueError, match="dense"):
        MaskTraining(model, (1,), token_data(model, ids, "lm"), TrainSettings(loss="kl"), keep=True)
    with pytest.raises(ValueError, match="ParamSnapshot"):
        MaskTraining(model, (1,), data, TrainSettings(loss="kl"))


def test_training_is_deterministic_and_keeps_global_rng(tiny_model) -> None:
    runs = []
    for _ in range(2):
        model = tiny_model("llama", num_layers=4)
        data = token_data(model, _ids(), "lm")
        torch.manual_seed(123)
        with MaskTraining(model, (2,), data, TrainSettings(loss="lm", lr=1e-2), keep=True) as run:
            run.train(len(data))
        runs.append((_state(model), torch.rand(1)))
    assert all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])
    assert torch.equal(runs[0][1], runs[1][1])
    torch.manual_seed(123)
    assert torch.equal(runs[0][1], torch.rand(1))  # training drew nothing from the global RNG


def test_settings_are_validated() -> None:
    with pytest.raises(TrainingError, match="loss"):
        TrainSettings(loss="mse")
    with pytest.raises(TrainingError, match="lr"):
        TrainSettings(lr=0)


def test_training_windows_avoid_the_calibration_samples(tiny_checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    calibration = build_calibration(tokenizer, "pydoc", n_samples=4, seq_len=64, seed=0)
    windows = training_windows(tokenizer, "pydoc", 640, 64, exclude=calibration.input_ids)
    assert windows.shape == (10, 64)
    assert torch.equal(windows, training_windows(tokenizer, "pydoc", 640, 64, exclude=calibration.input_ids))
    grams = {tuple(r[i : i + 32].tolist()) for r in calibration.input_ids for i in range(33)}
    assert not any(tuple(w[i : i + 32].tolist()) in grams for w in windows for i in range(33))
    # A window that shares text with an excluded sample is skipped, the next ones move up.
    shifted = training_windows(tokenizer, "pydoc", 640, 64, exclude=windows[:1])
    assert not any(torch.equal(windows[0], w) for w in shifted)
    assert torch.equal(shifted[:9], windows[1:])
    with pytest.raises(CalibrationError, match="training"):
        training_windows(tokenizer, "pydoc", 10**9, 64)


def test_kept_lora_training_is_merged_into_plain_layers(tiny_model) -> None:
    pytest.importorskip("peft")
    model = tiny_model("llama", num_layers=4)
    ids = _ids(n=3)
    modules = [type(m).__name__ for m in model.modules()]
    with MaskTraining(model, (2,), token_data(model, ids, "kl"), TrainSettings(lr=1e-2, lora=2), keep=True) as run:
        run.train(3)
        with torch.no_grad():
            trained = model(input_ids=ids, use_cache=False).logits
    assert [type(m).__name__ for m in model.modules()] == modules and "peft_config" not in vars(model)
    with masked(model, (2,)), torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, trained, atol=1e-5)
