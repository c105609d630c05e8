"""Shared fixtures: tiny random causal LMs of every architecture the layer surgery must handle."""

from __future__ import annotations

from collections.abc import Callable
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
