"""Every model family the layer surgery supports, from a checkpoint folder or from a GGUF file: for a
random mask, the search's fitness equals the loss of the exported checkpoint loaded with plain
``AutoModelForCausalLM.from_pretrained``, and the exported config's per-layer lists are the kept layers'.

GGUF sources are written by the ``gguf`` package's writer (tests/_gguf.py) for the families that
transformers' GGUF loader reads; it has no GPT-NeoX or OPT architecture.
"""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from transformers import AutoModelForCausalLM

from optuna_prune.model.calibration import CalibrationSet
from optuna_prune.model.fitness import PerplexityFitness
from optuna_prune.model.models import load_model
from optuna_prune.results.export import export_trial
from optuna_prune.run.config import SearchConfig
from tests._gguf import write_gguf
from tests.test_models import save_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

FAMILIES = ("llama", "qwen2", "gemma3", "mistral", "phi3", "gpt_neox", "opt")
GGUF_FAMILIES = ("llama", "qwen2", "gemma3", "mistral", "phi3")
CASES = [(f, "checkpoint") for f in FAMILIES] + [(f, "gguf") for f in GGUF_FAMILIES]
NUM_LAYERS, NUM_DROP = 6, 2


def _random_mask(config, seed: str) -> list[int]:
    """A random exact-k mask; with mixed layer types, one that keeps both kinds."""
    rng = random.Random(seed)
    types = getattr(config, "layer_types", None) or ["layer"] * NUM_LAYERS
    while True:
        dropped = sorted(rng.sample(range(NUM_LAYERS), NUM_DROP))
        kept = {t for i, t in enumerate(types) if i not in dropped}
        if len(kept) == len(set(types)):
            return dropped


def _study_with_trial(model: str, dropped: list[int], value: float) -> optuna.Study:
    """An in-memory study as a search leaves it: the config naming ``model`` and one complete trial."""
    cfg = SearchConfig(model=model, drop=NUM_DROP, calibration="pydoc", n_samples=2, seq_len=32, study="family")
    study = optuna.create_study(study_name="family")
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("problem", {"model": model, "num_layers": NUM_LAYERS, "num_drop": NUM_DROP,
                                    "fitness": "perplexity"})
    names = [f"layer_{i:02d}" for i in range(NUM_LAYERS)]
    study.add_trial(create_trial(
        state=TrialState.COMPLETE, value=value, params={n: int(i in dropped) for i, n in enumerate(names)},
        distributions={n: CategoricalDistribution([0, 1]) for n in names},
        user_attrs={"method": "evop", "dropped": dropped},
    ))
    return study


@pytest.mark.parametrize(("family", "source"), CASES)
def test_fitness_equals_the_exported_checkpoints_loss(family: str, source: str, tiny_model, tmp_path: Path,
                                                      monkeypatch) -> None:
    monkeypatch.setenv("OPTUNA_PRUNE_CACHE", str(tmp_path / "cache"))
    original = tiny_model(family, num_layers=NUM_LAYERS)
    if source == "gguf":
        path = write_gguf(original, tmp_path / f"tiny-{family}.gguf")
    else:
        path = save_tiny_checkpoint(original, tmp_path / f"tiny-{family}")
    model, _ = load_model(path, device="cpu")
    config = model.config
    dropped = _random_mask(config, f"{family}-{source}")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    calibration = CalibrationSet(input_ids=ids, source="random", seed=0, sha256="test")
    value = PerplexityFitness(model, calibration).evaluate(dropped).value

    out = export_trial(_study_with_trial(str(path), dropped, value), None, tmp_path / "pruned")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.inference_mode():
        loss = float(exported(input_ids=ids, labels=ids).loss)  # mean NLL over every next token
    assert loss == pytest.approx(value, rel=1e-5, abs=1e-6)

    kept = [i for i in range(NUM_LAYERS) if i not in dropped]
    assert exported.config.num_hidden_layers == len(kept)
    per_layer = {k: v for k, v in config.to_dict().items()
                 if isinstance(v, list) and len(v) == NUM_LAYERS and k != "architectures"}
    for name, values in per_layer.items():
        assert getattr(exported.config, name) == [values[i] for i in kept], name
    if family == "gemma3":  # the mixed sliding/full pattern survives, layer by layer
        assert set(per_layer["layer_types"]) == {"sliding_attention", "full_attention"}
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"# {path}, {NUM_DROP} of {NUM_LAYERS} decoder layers dropped" in card  # the user's name
    if source == "gguf":  # the search and the export loaded one cached conversion
        assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
