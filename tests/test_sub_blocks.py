"""Sub-block granularity: attention and MLP of a layer drop separately, in search, fitness and export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as tf
from test_fitness import random_calibration

from optuna_prune.model.fitness import KLFitness, PerplexityFitness, plain_forward_loss
from optuna_prune.model.layers import (
    SubBlocks,
    UnsupportedModelError,
    find_layer_stack,
    save_pruned,
    sub_block_names,
)
from optuna_prune.search.space import LayerMaskSpace, SpaceError, SubBlockSpace

UNIT_MASKS = [(), (0,), (1,), (0, 1), (3,), (2, 5), (4, 5, 6), (1, 2, 9), (10, 11), (0, 3, 4, 7, 11)]


def zeroed_copy(model: tf.PreTrainedModel, units: tuple[int, ...]) -> tf.PreTrainedModel:
    """Ground truth: a copy whose dropped blocks have every weight set to zero (nothing of ours runs)."""
    twin = copy.deepcopy(model)
    layers = find_layer_stack(twin).layers
    with torch.no_grad():
        for u in units:
            for p in getattr(layers[u // 2], sub_block_names(layers[u // 2])[u % 2]).parameters():
                p.zero_()
    return twin


def test_sub_block_fitness_equals_a_model_with_those_blocks_zeroed_for_every_arch(tiny_model, arch):
    model = tiny_model(arch, num_layers=6)
    calib = random_calibration()
    if arch == "opt":  # its MLP is two loose Linear layers, not a block
        with pytest.raises(UnsupportedModelError, match="OPTDecoderLayer has none of mlp"):
            PerplexityFitness(model, calib, sub_blocks=True)
        return
    fitness = PerplexityFitness(model, calib, sub_blocks=True)
    assert fitness.num_units == 12
    for units in UNIT_MASKS:
        got = fitness.evaluate(units).value
        want = plain_forward_loss(zeroed_copy(model, units), calib, ())
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), units
        assert plain_forward_loss(model, calib, SubBlocks(units)) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_dropping_both_blocks_of_a_layer_is_dropping_the_layer(tiny_model):
    model = tiny_model("llama", num_layers=6)
    calib = random_calibration()
    layers, blocks = PerplexityFitness(model, calib), KLFitness(model, calib, sub_blocks=True)
    assert KLFitness(model, calib).evaluate((1, 4)).value == pytest.approx(blocks.evaluate((2, 3, 8, 9)).value)
    whole = layers.evaluate((1, 4))
    assert whole.value != pytest.approx(PerplexityFitness(model, calib, sub_blocks=True).evaluate((2, 8)).value)
    assert SubBlocks((2, 3, 8, 11)).layers() == (1,) and SubBlocks((2, 3, 8, 11)).halves() == {4: 0, 5: 1}


def test_sub_block_masks_are_checked(tiny_model):
    fitness = PerplexityFitness(tiny_model("llama", num_layers=4), random_calibration(), sub_blocks=True)
    with pytest.raises(ValueError, match=r"sub-block indices \[8\] out of range"):
        fitness.evaluate((8,))
    with pytest.raises(ValueError, match="would drop every sub-block"):
        fitness.evaluate(range(8))


def test_export_of_sub_blocks_loads_with_plain_transformers_and_scores_the_same(tiny_model, tmp_path):
    model = tiny_model("llama", num_layers=6)
    calib = random_calibration()
    units = (0, 3, 4, 5, 11)  # attention of 0, MLP of 1, all of 2, MLP of 5
    want = PerplexityFitness(model, calib, sub_blocks=True).evaluate(units).value
    out = save_pruned(copy.deepcopy(model), SubBlocks(units), tmp_path / "pruned")
    loaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 5
    assert plain_forward_loss(loaded, calib, ()) == pytest.approx(want, rel=1e-5)
    card = (out / "README.md").read_text()
    assert "attention zeroed in layers: [0]" in card and "MLP zeroed in layers: [1, 5]" in card


def test_sub_block_space_is_an_exact_k_space_over_2l_units() -> None:
    space = SubBlockSpace(4, 3, protected=[0])
    assert space.num_layers == 8 and space.n_layers == 4 and space.protected == (0, 1)
    assert space.param_names[:3] == ["layer_00_attn", "layer_00_mlp", "layer_01_attn"]
    assert space.ends() == (0, 1, 6, 7)
    rng = np.random.RandomState(0)
    for _ in range(50):
        mask = space.repair(rng.rand(8) < 0.5, rng)
        assert mask.sum() == 3 and not mask[:2].any()
    params = space.to_params((2, 7))
    assert params["layer_01_attn"] == 1 and params["layer_03_mlp"] == 1 and sum(params.values()) == 2
    assert space.dropped_from_params(params) == (2, 7)
    again = LayerMaskSpace.from_dict(space.to_dict())
    assert isinstance(again, SubBlockSpace) and again == space and again != LayerMaskSpace(8, 3, [0, 1])
    with pytest.raises(SpaceError, match="protected layers"):
        SubBlockSpace(4, 2, protected=[4])


def sub_block_config(checkpoint, storage: str, **changes):
    from optuna_prune.run.config import SearchConfig

    base = dict(model=str(checkpoint), space="sublayers", drop=2, sampler="evop", calibration="pydoc",
                n_samples=2, seq_len=32, population=4, n_trials=6, seed=0, storage=storage, study="blocks")
    return SearchConfig(**{**base, **changes})


@pytest.mark.filterwarnings("ignore")
def test_searches_export_and_evaluation_speak_sub_blocks(tiny_checkpoint, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from optuna_prune.model.models import load_model
    from optuna_prune.model.perplexity import perplexity
    from optuna_prune.results.evaluation import EvalSettings, evaluate_study
    from optuna_prune.results.export import export_trial
    from optuna_prune.results.figures import all_figures
    from optuna_prune.run.problem import StudyMismatchError
    from optuna_prune.run.study import run_search
    from optuna_prune.search.samplers import sleb_result

    storage = f"sqlite:///{tmp_path / 'blocks.db'}"
    run_search(sub_block_config(tiny_checkpoint, storage, sampler="sleb", n_trials=None), progress=False)
    study = run_search(sub_block_config(tiny_checkpoint, storage, sampler="levelswitch"), progress=False)
    problem = study.user_attrs["problem"]
    assert problem["space"] == "sublayers" and problem["num_layers"] == 8 and problem["sparsity"] == 0.125
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert {"sleb", "levelswitch"} <= {t.user_attrs["method"] for t in complete}
    for t in complete:
        assert sorted(t.params) == sorted(f"layer_{i:02d}_{p}" for i in range(8) for p in ("attn", "mlp"))
        assert sum(t.params.values()) == 2 and len(t.user_attrs["dropped"]) == 2
    found = sleb_result(study)
    assert found is not None and len(found) == 2 and not {0, 1, 14, 15} & set(found)  # ends kept

    best = min(complete, key=lambda t: t.value)
    out = export_trial(study, best.number, tmp_path / "pruned")
    loaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 8 - len(SubBlocks(best.user_attrs["dropped"]).layers())
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    calib = random_calibration(n=2, t=32, vocab=len(tokenizer))
    want = PerplexityFitness(model, calib, sub_blocks=True).evaluate(best.user_attrs["dropped"]).value
    assert plain_forward_loss(loaded, calib, ()) == pytest.approx(want, rel=1e-5)

    settings = EvalSettings(seq_len=64, max_windows=4)
    result = evaluate_study(study, trial=best.number, datasets=["pydoc"], tasks=[], speed=False, settings=settings)
    ppl = result["evaluations"][f"trial-{best.number}"]["perplexity"]["pydoc"]
    assert ppl == pytest.approx(perplexity(loaded, tokenizer, "pydoc", **settings.perplexity()), rel=1e-4)
    axis = all_figures(study)["layer-drop-heatmap"].layout.xaxis  # one panel: no EvoP generations
    assert list(axis.ticktext[:3]) == ["layer_00_attn", "layer_00_mlp", "layer_01_attn"]

    with pytest.raises(StudyMismatchError, match="space"):  # the same study name, whole layers
        run_search(sub_block_config(tiny_checkpoint, storage, space="layers"), progress=False)
    assert optuna.load_study(study_name="blocks", storage=storage).user_attrs["problem"]["space"] == "sublayers"


@pytest.mark.parametrize(("changes", "message"), [
    ({"sampler": "shortgpt"}, "not with shortgpt"),
    ({"sampler": "darwin", "population": None}, "not with darwin"),
    ({"sampler": "evop", "seed_with": ["shortgpt"]}, "not with seed_with shortgpt"),
])
def test_sub_blocks_refuse_layer_only_methods(changes, message):
    from optuna_prune.run.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        sub_block_config("m", "sqlite://", **changes)
