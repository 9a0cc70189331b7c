"""The notebooks run top to bottom on tiny settings (MEDIDIFF_FAST=1) without errors, and print what they claim."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDIDIFF_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "Error" not in text
    if path.stem == "01_diffusion_core":
        inside = float(text.split("inside the anomaly:")[1].split()[0])
        elsewhere = float(text.split("residual elsewhere:")[1].split()[0])
        assert inside > 3 * elsewhere  # the healthy reconstruction removes the anomaly
        assert text.count("NFE") >= 32  # 8 samplers x 4 processes
    if path.stem == "02_anomaly_detection":
        assert "4 case(s) analysed, 0 skipped" in text
        auroc = float(text.split("auroc:")[1].split()[0])
        assert auroc > 0.7  # even on the tiny settings, the inserted lesions stand out


def test_there_are_notebooks():
    assert NOTEBOOKS and all(os.path.getsize(p) > 1000 for p in NOTEBOOKS)
