"""The HPO notebook runs top to bottom in a real Jupyter kernel (nbclient)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.slow  # a Jupyter kernel and three HPO iterations: ~25 s


def test_hpo_notebook_executes_and_plots_convergence(monkeypatch):
    # The kernel is started as "python" from PATH: make it this environment's.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    notebook = nbformat.read(EXAMPLES / "hpo.ipynb", as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "iteration 3: best so far" in text
    assert "best cross-validated accuracy: 0." in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1
    tables = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("MapResult: 8 done" in table for table in tables)
    assert any("Workflow hpo-notebook" in table for table in tables)
