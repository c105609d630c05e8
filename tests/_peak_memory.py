"""Run held-out perplexity on a 262k-vocabulary model with a tiny hidden size; print the RSS it adds.

Run as a script in its own process (``python tests/_peak_memory.py``), so the peak is this call's
alone: the process's peak RSS after the call minus its RSS before it, in MB.
"""

from __future__ import annotations

import psutil
import torch
import transformers as tf

from optuna_prune.model.perplexity import windows_perplexity

VOCAB, WINDOWS, SEQ_LEN = 262_144, 2, 512  # [B, T, V] fp32 logits: 1 GiB


def main() -> None:
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ_LEN)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, VOCAB, (WINDOWS * SEQ_LEN,))
    windows_perplexity(model, ids[: 2 * 16], seq_len=16, batch_size=2)  # warm up allocator and kernels
    before = psutil.Process().memory_info().rss
    ppl = windows_perplexity(model, ids, seq_len=SEQ_LEN, batch_size=WINDOWS)
    peak = _high_water_mark()
    print(f"{(peak - before) / 2**20:.0f} {ppl:.1f}")


def _high_water_mark() -> int:
    """This process's peak RSS in bytes (VmHWM). Not ``getrusage``'s ru_maxrss: that one keeps the
    peak of the process it was forked from (pytest, large after a long run) across exec."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


if __name__ == "__main__":
    main()
