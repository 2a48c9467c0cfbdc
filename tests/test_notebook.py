"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom, headless, on tiny settings."""
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
# Overrides for the notebook's parameters cell: a few steps on short rows, so JAX compiles dominate.
TINY = {"STEPS": 6, "BATCH": 2, "SEQ": 32, "WARMUP": 2, "LOG_EVERY": 1, "EVAL_EVERY": 3, "EVAL_BATCHES": 1,
        "SAMPLE_TOKENS": 8}
CELL_TIMEOUT_S = 300  # the training cell takes ~30 s on 2 CPU cores; generous for a loaded machine


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    _parameters_cell(nb)


def test_runs_headless_with_tiny_settings(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = _parameters_cell(nb)
    workdir = tmp_path / "wd"
    overrides = {**TINY, "WORKDIR": str(workdir)}
    for name in overrides:  # a renamed parameter would otherwise leave the default silently in force
        assert re.search(rf"^{name} = ", params.source, re.MULTILINE), f"no parameter {name} in the notebook"
    params.source += "\n# test overrides\n" + "".join(f"{k} = {v!r}\n" for k, v in overrides.items())
    # The kernel is a fresh interpreter in tmp_path: make this checkout importable there whether or not
    # it is pip-installed (JAX_PLATFORMS=cpu comes from conftest through the environment).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))

    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    out = _stdout(nb)
    assert "trained steps 0 -> 6" in out
    assert "matches cfg.total_params (which counts the biases too): True" in out
    assert "restored logits identical: True" in out
    assert "same as the training run's sample: True" in out
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curves and the expert-load heat maps
    assert all(len(o.data["image/png"]) > 1000 for o in images)
    assert (workdir / "metrics.jsonl").is_file()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]
    assert os.listdir(workdir / "exported_variables")
