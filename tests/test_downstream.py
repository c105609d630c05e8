"""Downstream tasks run offline with lm-eval's own prompts and metrics, on a model loaded once."""

from __future__ import annotations

import re
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks._yaml_loader import load_yaml

from optuna_prune.model.downstream import (
    DEFAULT_TASKS,
    OFFLINE_FILES,
    TASKS_DIR,
    DownstreamError,
    downstream,
)
from optuna_prune.model.layers import find_layer_stack
from optuna_prune.model.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUILTIN = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
}
needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason=f"offline data not found at {DATA}")
pytestmark = pytest.mark.filterwarnings("ignore")


def _same(value):
    """A config value, with a function as its source file and name (lm-eval loads YAML-local modules
    by path, so the same function can be two objects)."""
    return (Path(value.__code__.co_filename).resolve(), value.__name__) if callable(value) else value


@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_offline_tasks_keep_the_builtin_prompts_targets_and_metrics(task):
    ours = load_yaml(TASKS_DIR / f"{task}.yaml")
    theirs = load_yaml(BUILTIN / BUILTIN_YAML[task])
    for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list",
                "metadata"):
        assert _same(ours[key]) == _same(theirs[key]), key  # winogrande: lm-eval's own functions
    assert ours["dataset_path"] == "json" and task in OFFLINE_FILES


@needs_data
def test_offline_hellaswag_items_are_clean():
    from datasets import load_dataset

    docs = load_yaml(TASKS_DIR / "hellaswag.yaml")["process_docs"](
        load_dataset("json", data_files={"test": str(DATA / OFFLINE_FILES["hellaswag"])}, split="test")
    )
    bracketed = re.compile(r"\[.*?\]")  # WikiHow artefacts lm-eval removes
    assert not any(bracketed.search(d["query"]) or any(map(bracketed.search, d["choices"])) for d in docs)
    assert docs[0]["gold"] == 3 and len(docs[0]["choices"]) == 4


@needs_data
def test_one_task_runs_offline_on_a_masked_model(tiny_checkpoint):
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    result = downstream(model, tokenizer, ["arc_easy"], limit=4, data_dir=DATA, dropped=(2, 5))
    row = result["arc_easy"]
    assert row["limit"] == 4 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    assert row["acc_stderr"] is not None and row["acc_norm_stderr"] is not None
    assert find_layer_stack(model).num_layers == 8  # the mask is gone again


def test_unknown_offline_task_or_missing_data_are_one_line_errors(tiny_model, tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(DownstreamError, match="no offline definition of tasks \\['mmlu'\\]"):
        downstream(tiny_model(), None, ["mmlu"], data_dir=tmp_path)
    with pytest.raises(DownstreamError, match="ARC-Easy-test.jsonl, which does not exist"):
        downstream(tiny_model(), None, ["arc_easy"], data_dir=tmp_path)


@pytest.mark.slow
@needs_data
def test_smollm2_is_well_above_chance_on_arc_easy():
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    # The first 20 questions (80 scored answers) keep the test to a minute on 2 cores. SmolLM2 gets
    # 12 of them right; at chance (0.25) 9 or more would happen with probability 0.04.
    result = downstream(model, tokenizer, ["arc_easy"], limit=20, data_dir=DATA)["arc_easy"]
    assert result["acc"] > 0.4, result  # chance is 0.25; SmolLM2-135M scores about 0.5-0.6
