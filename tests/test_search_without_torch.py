"""The search side installs and runs with optuna and numpy alone: nothing in it imports torch.

A subprocess refuses every import of the ``llm`` extra (torch, transformers, ...), then imports
the public search API and runs the README's example, as a user of ``pip install optuna-prune``
would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLM_EXTRA = (
    "torch", "transformers", "datasets", "lm_eval", "sklearn", "sentence_transformers",
    "accelerate", "gguf", "safetensors", "plotly", "optuna_dashboard",
)  # fmt: skip
BLOCKER = f"""
import sys
class _NoLLMExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {set(LLM_EXTRA)!r}:
            raise ImportError(f"{{name}} is not installed (blocked: the llm extra)")
        return None
sys.meta_path.insert(0, _NoLLMExtra())
"""


def run_without_llm_extra(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_the_blocker_blocks() -> None:
    done = run_without_llm_extra("import torch")
    assert done.returncode != 0 and "blocked: the llm extra" in done.stderr


def test_search_api_imports_and_the_example_runs_without_torch() -> None:
    done = run_without_llm_extra(
        "import optuna_prune, optuna_prune.search, optuna_prune.search.samplers, optuna_prune.search.pruners\n"
        "import optuna_prune.search.record, optuna_prune.search.samplers.darwin\n"
        "import runpy; runpy.run_path('examples/subset_selection.py', run_name='__main__')\n"
        f"assert not {{m for m in sys.modules if m.partition('.')[0] in {set(LLM_EXTRA)!r}}}\n"
    )
    assert done.returncode == 0, done.stderr
    assert "EvoP:" in done.stdout and "level switch:" in done.stdout
