"""Layer surgery on tiny random models of every supported architecture."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from optuna_prune.model.layers import (
    UnsupportedModelError,
    check_drop,
    find_layer_stack,
    lm_tail,
    masked,
    prune_model,
    save_pruned,
)

DROP = (1, 4)  # one layer of each kind where layer types alternate; layer 4 shifts to a new index
INPUT = torch.tensor([[1, 17, 99, 23, 250, 3, 44, 45, 46, 7, 8, 9, 120]])  # longer than the sliding windows


def logits(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(INPUT, use_cache=False).logits


def test_finds_the_decoder_stack(arch, tiny_model):
    model = tiny_model(arch)
    stack = find_layer_stack(model)
    assert stack.num_layers == 6
    assert getattr(stack.parent, stack.attr) is not None
    assert list(getattr(stack.parent, stack.attr)) == stack.layers


def test_masked_equals_pruned_copy_and_restores(arch, tiny_model):
    model = tiny_model(arch)
    dense = logits(model)
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    pruned = prune_model(copy.deepcopy(model), DROP)
    with masked(model, DROP) as m:
        assert m is model
        assert model.config.num_hidden_layers == 4 == pruned.config.num_hidden_layers
        torch.testing.assert_close(logits(model), logits(pruned), rtol=0, atol=0)
        assert not torch.equal(logits(model), dense)
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=0)
    assert model.config.num_hidden_layers == 6
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before


def test_masked_restores_config_and_indices_on_error(tiny_model):
    model = tiny_model("gemma3")
    layer_types = list(model.config.layer_types)
    with pytest.raises(KeyError), masked(model, [0, 2]):
        assert len(model.config.layer_types) == 4
        assert model.model.layers[0].self_attn.layer_idx == 0
        raise KeyError("boom")
    assert model.config.layer_types == layer_types
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6))
    assert [layer.layer_idx for layer in model.model.layers] == list(range(6))


def test_masked_generate_with_cache(arch, tiny_model):
    model = tiny_model(arch)
    kwargs = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(INPUT), pad_token_id=0)
    with masked(model, DROP):
        cached = model.generate(INPUT, use_cache=True, **kwargs)
        uncached = model.generate(INPUT, use_cache=False, **kwargs)
    assert cached.shape[1] == INPUT.shape[1] + 5
    torch.testing.assert_close(cached, uncached)


def test_export_reloads_without_custom_code(arch, tiny_model, tmp_path):
    model = tiny_model(arch)
    with masked(model, DROP):
        expected = logits(model)
    out = save_pruned(copy.deepcopy(model), DROP, tmp_path / "pruned", extra_card={"study": "s1"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 4
    assert find_layer_stack(reloaded).num_layers == 4
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)
    assert (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "[1, 4]" in card and "study: s1" in card


def last_layer_output(model: nn.Module) -> torch.Tensor:
    stack = find_layer_stack(model)
    captured = []
    handle = getattr(stack.parent, stack.attr)[-1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    logits(model)
    handle.remove()
    return captured[0]


def test_lm_tail_matches_forward(arch, tiny_model):
    model = tiny_model(arch)
    for dropped in ((), DROP):
        with masked(model, dropped), torch.inference_mode():
            hidden = last_layer_output(model)
            torch.testing.assert_close(lm_tail(model)(hidden), logits(model), rtol=0, atol=1e-6)


def test_mask_switching_is_cheap_and_exact(tiny_model):
    model = tiny_model("gemma3")
    layers = list(model.model.layers)
    for i in range(1000):
        with masked(model, [i % 6, (i + 3) % 6]):
            assert len(model.model.layers) == 4
    assert list(model.model.layers) == layers
    assert model.config.num_hidden_layers == 6


def test_check_drop():
    assert check_drop(6, [4, 1, 4]) == (1, 4)
    assert check_drop(6, []) == ()
    with pytest.raises(ValueError, match="every layer"):
        check_drop(3, [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        check_drop(6, [-1])
    with pytest.raises(ValueError, match="out of range"):
        check_drop(6, [6])


def test_bad_masks_leave_model_untouched(tiny_model):
    model = tiny_model("llama")
    for bad in ([0, 1, 2, 3, 4, 5], [-1], [6]):
        with pytest.raises(ValueError), masked(model, bad):
            pass
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    with masked(model, [1]), pytest.raises(RuntimeError, match="already masked"), masked(model, [2]):
        pass


def test_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        find_layer_stack(nn.Linear(2, 2))

    class NoLayers(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="NoLayers"):
        find_layer_stack(NoLayers(LlamaConfig(num_hidden_layers=4)))
