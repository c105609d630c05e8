"""Speed is measured on the masked model with its KV cache, side by side with the dense one."""

from __future__ import annotations

import pytest
import torch

from optuna_prune.model.layers import find_layer_stack
from optuna_prune.model.models import load_model
from optuna_prune.model.speed import compare_speed, measure_speed

pytestmark = pytest.mark.filterwarnings("ignore")
SMALL = dict(prompt_tokens=12, new_tokens=4, repeats=2, warmup=1)


def test_measure_and_compare_report_latency_throughput_and_ratios(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    threads = torch.get_num_threads()
    alone = measure_speed(model, tokenizer, (1, 2), threads=1, **SMALL)
    assert alone["prefill_ms"] > 0 and alone["decode_tokens_per_s"] > 0
    assert alone["device"] == "cpu (1 threads)" and alone["dtype"] == "float32"
    assert torch.get_num_threads() == threads

    both = compare_speed(model, tokenizer, (1, 2, 3, 4, 5, 6), **SMALL)
    for variant in ("dense", "pruned"):
        assert both[variant]["prefill_ms"] > 0 and both[variant]["decode_tokens_per_s"] > 0
    assert both["prefill_speedup"] == pytest.approx(both["dense"]["prefill_ms"] / both["pruned"]["prefill_ms"])
    assert both["decode_speedup"] == pytest.approx(
        both["pruned"]["decode_tokens_per_s"] / both["dense"]["decode_tokens_per_s"]
    )
    assert find_layer_stack(model).num_layers == 8


def test_bad_settings_are_refused(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        measure_speed(model, tokenizer, new_tokens=1)
