"""A trial's mask ships as a plain checkpoint that reloads with no custom code and computes the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optuna_prune.cli import main
from optuna_prune.model.layers import masked
from optuna_prune.model.models import load_model
from optuna_prune.results.export import TrialChoiceError, choose_trial, export_trial
from optuna_prune.run.config import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore")


def test_best_trial_exports_a_checkpoint_with_the_masked_logits(recorded_study, tiny_checkpoint, tmp_path):
    out = export_trial(recorded_study, None, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 6
    original, tokenizer = load_model(tiny_checkpoint, device="cpu")
    ids = tokenizer("def f(x):\n    return x + 1", return_tensors="pt")["input_ids"]
    with torch.inference_mode(), masked(original, [1, 3]):  # trial 2, the best complete mask
        expected = original(ids).logits
    with torch.inference_mode():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    card = (out / "README.md").read_text()
    for fact in ("[1, 3]", "trial: 2", "method: evop", "sparsity: 0.25", "calibration: pydoc", "ab" * 32,
                 "fitness: perplexity", "10.8", str(tiny_checkpoint)):
        assert fact in card, fact
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_choose_trial_takes_only_complete_exact_k_masks(recorded_study):
    assert choose_trial(recorded_study).number == 2
    assert choose_trial(recorded_study, "best").number == 2
    assert choose_trial(recorded_study, 1).user_attrs["dropped"] == [3, 6]
    with pytest.raises(TrialChoiceError, match="no trial 42"):
        choose_trial(recorded_study, 42)
    with pytest.raises(TrialChoiceError, match=r"trial 0 .*: it is PRUNED and drops 1 of the study's 2 layers; .*--best"):
        choose_trial(recorded_study, 0)  # SLEB's partial step
    with pytest.raises(TrialChoiceError, match=r"trial 4 .*: it is FAIL; "):
        choose_trial(recorded_study, 4)


def test_study_without_config_is_refused(recorded_study, tmp_path):
    recorded_study.set_user_attr("config", None)
    with pytest.raises(ConfigError, match="no recorded optuna-prune config"):
        export_trial(recorded_study, 2, tmp_path / "x")


def test_cli_export_and_its_one_line_errors(recorded_study, tmp_path, capsys):
    storage = recorded_study.user_attrs["config"]["storage"]
    out = tmp_path / "cli-export"
    assert main(["export", "recorded", "--storage", storage, "--trial", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    for flags in (["--trial", "9"], ["--trial", "0"]):
        assert main(["export", "recorded", "--storage", storage, *flags, "--out", str(tmp_path / "y")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("optuna-prune: error: ") and "trial" in err and err.count("\n") == 1


def test_export_refuses_a_used_out_unless_overwrite_and_replaces_it_whole(recorded_study, tmp_path, capsys):
    storage = recorded_study.user_attrs["config"]["storage"]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "old-shard.safetensors").write_text("stale")
    argv = ["export", "recorded", "--storage", storage, "--trial", "1", "--out", str(out)]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "my notes"
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "old-shard.safetensors").exists()  # replaced, not merged
    assert "[3, 6]" in (out / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "recorded.db"]  # no temporary folder left


def test_a_failed_export_leaves_no_folder(recorded_study, tmp_path, monkeypatch):
    import optuna_prune.model.layers

    def half_written(model, dropped, out_dir, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        (out_dir / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(optuna_prune.model.layers, "save_pruned", half_written)
    with pytest.raises(OSError, match="No space left"):
        export_trial(recorded_study, 2, tmp_path / "new" / "pruned")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recorded.db"]
