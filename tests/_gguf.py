"""Write a tiny transformers model as a GGUF file with the `gguf` package's writer, as llama.cpp's
converter lays it out, so tests can load GGUF sources without downloading one.

Only what transformers' GGUF loader reads back: per-architecture hyperparameters, a byte-level BPE
vocabulary of 256 byte tokens (ids = bytes), and fp32 tensors under GGUF names. llama.cpp's converter
permutes Llama/Mistral query and key rows and stores Gemma norm weights plus one; so does this.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

# transformers model_type -> GGUF architecture, for the families transformers' GGUF loader reads.
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
              "gemma2": "gemma2", "gemma3_text": "gemma3"}


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of query/key rows (interleaved rotary halves)."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return weights.reshape(n, 2, weights.shape[0] // n // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(model: PreTrainedModel, path: Path) -> Path:
    """Write ``model`` (vocabulary of 256) to ``path`` as an fp32 GGUF file; return the path."""
    config = model.config
    arch = GGUF_ARCHS[config.model_type]
    if config.vocab_size != 256:
        raise ValueError(f"write_gguf writes a 256-byte vocabulary; the model has {config.vocab_size}")
    writer = gguf.GGUFWriter(str(path), arch)
    # Named like real files ("Mistral-7B-Instruct-v0.3"): transformers reads a Mistral file as Llama, as
    # llama.cpp does. Named exactly "mistral", it maps it to a Mistral model and then fails to load it.
    writer.add_name(f"tiny-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    spelling = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([spelling[b] for b in range(256)])
    writer.add_token_types([gguf.TokenType.NORMAL] * 256)
    writer.add_token_scores([0.0] * 256)  # no merges: every byte is its own token
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_unk_token_id(config.pad_token_id)  # Gemma's tokenizer class needs one

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                     config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        name = names.get_name(stem)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name} of {config.model_type}")
        data = tensor.detach().to(torch.float32).numpy().copy()
        if arch == "llama" and name.endswith("attn_q"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and name.endswith("attn_k"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        elif arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1
        writer.add_tensor(f"{name}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
