"""The comparison notebook runs end to end (on a tiny model), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_samplers.ipynb"


def test_outputs_are_stripped_in_git():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def test_compare_samplers_notebook_executes(tiny_checkpoint, tmp_path, monkeypatch):
    env = {
        "NOTEBOOK_MODEL": str(tiny_checkpoint), "NOTEBOOK_CALIBRATION": "pydoc", "NOTEBOOK_SEQ_LEN": "32",
        "NOTEBOOK_DROP": "3", "NOTEBOOK_POPULATION": "4", "NOTEBOOK_STORAGE": f"sqlite:///{tmp_path / 'nb.db'}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "only EvoP" in text and "SLEB used" in text
    plots = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(plots) >= 3
