"""Shared fixtures: tiny random causal LMs of every architecture the layer surgery must handle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf

_COMMON: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
_IDS: dict[str, Any] = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# arch -> (config class, kwargs without the layer count). Sliding windows of 8 tokens make short test
# prompts exercise the sliding-attention paths, a logit softcap near the logits' scale makes it matter,
# and OPT's word_embed_proj_dim adds project_in/project_out.
TINY_ARCHS: dict[str, tuple[type, dict[str, Any]]] = {
    "llama": (tf.LlamaConfig, _COMMON),
    "mistral": (tf.MistralConfig, {**_COMMON, "sliding_window": 8}),
    "qwen2": (tf.Qwen2Config, {**_COMMON, "use_sliding_window": True, "sliding_window": 8,
                               "max_window_layers": 3}),
    "qwen3": (tf.Qwen3Config, {**_COMMON, "head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": (tf.Gemma2Config, {**_COMMON, "head_dim": 16, "sliding_window": 8,
                                 "final_logit_softcapping": 0.5}),
    "gemma3": (tf.Gemma3TextConfig, {**_COMMON, "head_dim": 16, "sliding_window": 8,
                                     "sliding_window_pattern": 2, "final_logit_softcapping": 0.5}),
    "phi3": (tf.Phi3Config, _COMMON),
    "opt": (tf.OPTConfig, {**_IDS, "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
                           "max_position_embeddings": 128, "word_embed_proj_dim": 32}),
    "gpt2": (tf.GPT2Config, {**_IDS, "n_embd": 64, "n_head": 4, "n_positions": 128}),
    "gpt_neox": (tf.GPTNeoXConfig, {**_IDS, "hidden_size": 64, "intermediate_size": 128,
                                    "num_attention_heads": 4, "max_position_embeddings": 128}),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes an `arch` argument runs once per tiny architecture."""
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", list(TINY_ARCHS))


@pytest.fixture
def tiny_model() -> Callable[..., tf.PreTrainedModel]:
    """Factory: `tiny_model("llama", num_layers=6, seed=0)` -> seeded random causal LM in eval mode, fp32."""

    def make(arch: str = "llama", num_layers: int = 6, seed: int = 0) -> tf.PreTrainedModel:
        config_cls, kwargs = TINY_ARCHS[arch]
        config = config_cls(**kwargs, num_hidden_layers=num_layers)
        torch.manual_seed(seed)
        return tf.AutoModelForCausalLM.from_config(config).eval()

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An 8-layer random Llama saved as a normal checkpoint with SmolLM2's real tokenizer."""
    from optuna_prune.model.models import smollm2_checkpoint

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def recorded_study(tiny_checkpoint, tmp_path):
    """A study over `tiny_checkpoint` (drop 2 of 8) as searches leave it, without running one: config and
    problem attrs, SLEB's partial step (PRUNED) and final mask, two EvoP masks, a failed trial.
    Trial numbers: 0 sleb partial, 1 sleb [3, 6], 2 evop [1, 3] (best), 3 evop [2, 5], 4 FAIL."""
    import math

    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from optuna_prune.run.config import SearchConfig

    storage = f"sqlite:///{tmp_path / 'recorded.db'}"
    cfg = SearchConfig(model=str(tiny_checkpoint), drop=2, calibration="pydoc", n_samples=2, seq_len=32,
                       storage=storage, study="recorded")
    study = optuna.create_study(study_name="recorded", storage=storage)
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("problem", {
        "model": str(tiny_checkpoint), "num_layers": 8, "num_drop": 2, "sparsity": 0.25,
        "calibration": "pydoc", "calibration_sha256": "ab" * 32, "n_samples": 2, "seq_len": 32,
        "ccds_clusters": 0, "fitness": "perplexity", "objective_mode": "mean", "seed": 0,
    })
    names = [f"layer_{i:02d}" for i in range(8)]
    dists = {n: CategoricalDistribution([0, 1]) for n in names}

    def add(state, value, method, dropped):
        params = {n: int(i in dropped) for i, n in enumerate(names)}
        attrs = {"method": method, "dropped": list(dropped), "n_dropped": len(dropped)}
        if state == TrialState.COMPLETE:
            attrs["perplexity"] = math.exp(value)
        study.add_trial(create_trial(
            state=state, value=value if state == TrialState.COMPLETE else None, params=params,
            distributions=dists, user_attrs=attrs,
            intermediate_values={2: value} if state == TrialState.PRUNED else None,
        ))

    add(TrialState.PRUNED, 10.7, "sleb", [3])
    add(TrialState.COMPLETE, 10.9, "sleb", [3, 6])
    add(TrialState.COMPLETE, 10.8, "evop", [1, 3])
    add(TrialState.COMPLETE, 11.0, "evop", [2, 5])
    add(TrialState.FAIL, None, "evop", [4, 5])
    return study
