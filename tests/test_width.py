"""Width pruning: rate vectors with an exact mean, channel masks equal to real pruning, save and load."""

from __future__ import annotations

import itertools
import json
import random
import re

import numpy as np
import optuna
import pytest
import torch
import transformers as tf

from optuna_prune.model.calibration import CalibrationSet
from optuna_prune.model.fitness import plain_forward_loss
from optuna_prune.model.layers import UnsupportedModelError
from optuna_prune.model.models import ModelNotFoundError, load_width_pruned
from optuna_prune.model.width import (
    SIZES_KEY,
    WidthFitness,
    channel_importance,
    channels_masked,
    intermediate_sizes,
    kept_channels,
    prune_channels,
    save_width_pruned,
)
from optuna_prune.search.rate_space import RateSpace
from optuna_prune.search.space import SpaceError

pytestmark = pytest.mark.filterwarnings("ignore")


def calibration(n: int = 3, seq_len: int = 24, vocab: int = 256) -> CalibrationSet:
    ids = torch.randint(3, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(input_ids=ids, source="random", seed=0, sha256="-")


# --- the rate space -------------------------------------------------------------------------------


def test_rate_space_counts_and_lists_unit_vectors():
    space = RateSpace(4, 5, resolution=4, protected=(1,))  # layers 0, 2, 3 get 0..3 units, 5 in all
    vectors = [space.units(c) for c in space.candidates()]
    brute = [u for u in itertools.product(range(4), repeat=4) if sum(u) == 5 and u[1] == 0]
    assert sorted(vectors) == sorted(brute) and space.n_candidates == len(brute) == 12
    assert all(space.is_valid(c) for c in space.candidates())
    assert space.mean_rate == 5 / 16


def test_rate_space_params_repair_and_canonical_form():
    space = RateSpace.for_sparsity(30, 0.2, resolution=16)
    assert space.total == 96 and space.mean_rate == pytest.approx(0.2)  # exact by construction
    assert space.param_names[:2] == ["rate_00", "rate_01"] and len(space.distributions()) == 30
    rng = np.random.RandomState(0)
    for _ in range(20):
        units = rng.randint(0, 16, size=30)  # any total: repair moves units between layers
        fixed = space.from_array(space.repair(space.to_array(space.from_units(units)), rng))
        assert space.is_valid(fixed) and sum(space.units(fixed)) == 96
        assert max(space.units(fixed)) <= space.max_units == 15
        assert space.dropped_from_params(space.to_params(fixed)) == fixed
    # Any slot set with the same units per layer is the same candidate.
    a = space.to_array(space.from_units([3] * 30))
    b = a.reshape(30, 15)[:, ::-1].reshape(-1)
    assert space.from_array(b) == space.from_array(a) == space.from_units([3] * 30)
    assert RateSpace.from_dict(space.to_dict()) == space


@pytest.mark.parametrize(("args", "message"), [
    ((4, 0), "total=0"),
    ((4, 12), "total=12"),  # 4 layers x 3 units: at most 11
    ((4, 2, 1), "resolution=1"),
])
def test_rate_space_refuses_impossible_settings(args, message):
    num_layers, total, *res = args
    with pytest.raises(SpaceError, match=message):
        RateSpace(num_layers, total, resolution=res[0] if res else 4)


# --- channel importance, masking and real pruning --------------------------------------------------


def test_channel_mask_equals_real_pruning(tiny_model):
    model = tiny_model("llama", num_layers=3)
    cal = calibration()
    importance = channel_importance(model, cal)
    assert [s.shape for s in importance] == [torch.Size([128])] * 3 and all(s.min() >= 0 for s in importance)
    keep = kept_channels(importance, [0, 4, 7], resolution=8)
    assert [k.numel() for k in keep] == [128, 64, 16]
    assert all(bool(s[k].min() >= s[~torch.isin(torch.arange(128), k)].max()) for s, k in
               zip(importance[1:], keep[1:], strict=True))  # the most important channels stay
    ids = cal.input_ids
    with torch.no_grad():
        dense = model(ids).logits
        with channels_masked(model, keep):
            masked = model(ids).logits
        assert torch.equal(model(ids).logits, dense)  # hooks are gone
    n_dense = sum(p.numel() for p in model.parameters())
    prune_channels(model, keep)
    assert intermediate_sizes(model) == [128, 64, 16]
    assert sum(p.numel() for p in model.parameters()) == n_dense - 3 * 64 * (64 + 112)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, masked, atol=1e-5)
    assert not torch.allclose(masked, dense, atol=1e-3)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    model = tiny_model("qwen3", num_layers=2)  # tied embeddings: lm_head is not in the file
    cal = calibration()
    keep = kept_channels(channel_importance(model, cal), [3, 6], resolution=8)
    save_width_pruned(model, keep, tmp_path, extra_card={"study": "demo"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[SIZES_KEY] == [80, 32] and "study: demo" in (tmp_path / "README.md").read_text()
    loaded = load_width_pruned(tmp_path, device="cpu")
    assert intermediate_sizes(loaded) == [80, 32]
    with torch.no_grad():
        assert torch.equal(loaded(cal.input_ids).logits, model(cal.input_ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):  # plain from_pretrained refuses it
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_load_refuses_other_checkpoints(tiny_model, tmp_path):
    tiny_model("llama", num_layers=2).save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelNotFoundError, match=SIZES_KEY):
        load_width_pruned(tmp_path / "plain")
    model = tiny_model("llama", num_layers=2)
    save_width_pruned(model, [torch.arange(64), torch.arange(32)], tmp_path / "w")
    (tmp_path / "w" / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_width_pruned(tmp_path / "w")


def test_unsupported_mlp_is_named(tiny_model):
    with pytest.raises(UnsupportedModelError, match="gated MLP"):
        channel_importance(tiny_model("gpt2", num_layers=2), calibration())


def test_width_fitness_scores_by_masking(tiny_model):
    model = tiny_model("llama", num_layers=3)
    cal = calibration()
    fitness = WidthFitness(model, cal, resolution=8)
    dense = fitness.evaluate([0, 0, 0])
    assert dense.complete and dense.value == pytest.approx(plain_forward_loss(model, cal, ()), rel=1e-5)
    pruned = fitness.evaluate([2, 4, 6])
    keep = fitness.kept([2, 4, 6])
    with channels_masked(model, keep):
        assert pruned.value == pytest.approx(plain_forward_loss(model, cal, ()), rel=1e-5)
    assert len(pruned.per_sample) == 3
    stopped = fitness.evaluate([2, 4, 6], stop_above=0.0)
    assert not stopped.complete and len(stopped.samples) == 1


# --- the search, end to end -----------------------------------------------------------------------


def test_rates_search_end_to_end(tiny_checkpoint, tmp_path):
    """``optuna-prune search --sampler selfpruner --space rates`` on a tiny Llama with a stub LLM."""
    from optuna_prune.cli import main
    from optuna_prune.run.problem import load_existing_study
    from optuna_prune.run.storage import open_storage
    from optuna_prune.search.samplers import llm_stats
    from tests._chat_server import ChatServer

    def respond(body: dict) -> str:
        system = body["messages"][0]["content"]
        n, most = (int(x) for x in re.search(r"(\d+)-layer .* gets 0 to (\d+) parts", system).groups())
        rng = random.Random(body["seed"])
        return json.dumps([rng.randint(0, most) for _ in range(n)])  # total repaired by the sampler

    server = ChatServer(respond)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    with server.running():
        code = main([
            "search", "--model", str(tiny_checkpoint), "--sparsity", "0.25", "--sampler", "selfpruner",
            "--space", "rates", "--rate-resolution", "8", "--llm", server.url, "--calibration", "pydoc",
            "--n-samples", "2", "--seq-len", "16", "--population", "2", "--n-trials", "4",
            "--storage", storage, "--no-progress",
        ])
    assert code == 0
    (summary,) = optuna.get_all_study_summaries(open_storage(storage))
    assert "rates16of64" in summary.study_name
    study = load_existing_study(summary.study_name, storage)
    assert study.user_attrs["problem"]["space"] == "rates" and study.user_attrs["problem"]["sparsity"] == 0.25
    trials = study.get_trials()
    assert len(trials) == 4 and llm_stats(study)["llm"] >= 2
    for t in trials:
        assert sum(t.user_attrs["units"]) == 16 and t.user_attrs["mlp_sparsity"] == pytest.approx(0.25)
        assert sum(t.user_attrs["intermediate_sizes"]) == 8 * 64 * 3 // 4
        assert t.params == {f"rate_{i:02d}": u for i, u in enumerate(t.user_attrs["units"])}


def test_load_model_recognises_width_pruned_checkpoints(tiny_checkpoint, tmp_path):
    from optuna_prune.model.models import load_model

    model, tokenizer = load_model(str(tiny_checkpoint), device="cpu")
    cal = calibration(vocab=len(tokenizer))
    n = model.config.num_hidden_layers
    keep = kept_channels(channel_importance(model, cal), [4] * n, resolution=8)
    save_width_pruned(model, keep, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path), device="cpu")
    assert intermediate_sizes(loaded) == [len(k) for k in keep]
