"""The notebooks run top to bottom on tiny settings (MEDIDIFF_FAST=1) without errors, and print what they claim.

The notebooks for users' own data (quick start, anomaly detection, reconstruction, segmentation) each have one
cell of plain settings pointing at the data, run as they are on bundled or packaged data, write their results
beside that data (here under TMPDIR, never into the working folder) and show an interactive slice viewer whose
every figure is drawn. Every notebook is committed without outputs.
"""

import ast
import os
import re
from pathlib import Path
from queue import Empty
from time import monotonic

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
#: The notebooks for users' own data, and the names their data cell sets.
FOR_USERS = {"00_quick_start": {"SCAN", "BRAIN_MASK", "MODEL"},
             "02_anomaly_detection": {"SCANS", "BRAIN_MASKS", "HEALTHY", "HEALTHY_MASKS", "LESIONS", "MODEL"},
             "03_reconstruction": {"MRI_SCAN", "CT_SCAN", "MRI_MODEL", "CT_MODEL"},
             "04_segmentation": {"SCANS", "BRAIN_MASKS", "LESIONS", "MODEL", "MEMBERS", "STEPS"}}
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _in_short_waits(get_msg):
    """``get_msg`` waiting in one-second polls: a message that arrives during a long wait is sometimes noticed only
    when the wait times out (seen with widget cells: a cell ran for its whole timeout; nbclient issue 312)."""

    async def wait(timeout=None):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            step = 1.0 if deadline is None else min(1.0, max(0.0, deadline - monotonic()))
            try:
                return await get_msg(timeout=step)
            except Empty:
                if deadline is not None and monotonic() >= deadline:
                    raise

    return wait


class Client(NotebookClient):
    """nbclient, with replies and outputs read in short waits (see ``_in_short_waits``)."""

    async def async_start_new_kernel_client(self):
        kc = await super().async_start_new_kernel_client()
        for channel in (kc.shell_channel, kc.iopub_channel):
            channel.get_msg = _in_short_waits(channel.get_msg)
        return kc


def _execute(path: Path, tmp_path: Path, monkeypatch) -> tuple[nbformat.NotebookNode, str, Path]:
    monkeypatch.setenv("MEDIDIFF_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the bundled examples are copied to
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: figures become outputs
    (tmp_path / "tmp").mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    nb = nbformat.read(path, as_version=4)
    Client(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    return nb, text, cwd


def _number(text: str, label: str) -> float:
    return float(re.search(re.escape(label) + r"\s*([-+0-9.]+)", text).group(1))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
    nb, text, cwd = _execute(path, tmp_path, monkeypatch)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.get("output_type") == "error" or "Traceback" in out.get("text", "")]
    assert not errors and "Error" not in text
    if path.stem == "01_diffusion_core":
        inside = _number(text, "inside the anomaly:")
        elsewhere = _number(text, "residual elsewhere:")
        assert inside > 3 * elsewhere  # the healthy reconstruction removes the anomaly
        assert text.count("NFE") >= 32  # 8 samplers x 4 processes
        return
    # written beside the data (copied under TMPDIR), nothing in the working folder
    assert not any(cwd.iterdir())
    outs = [Path(p) for p in re.findall(r"(?:results go to:|->) (\S+)", text)]
    assert outs and all(p.is_dir() and "_medidiff_" in p.name and p.is_relative_to(tmp_path / "tmp") for p in outs)
    assert all([q for q in p.parent.glob(p.name.split("_medidiff_")[0] + "*") if q != p] for p in outs)  # its data
    # the slice viewer: a slider, and every figure it drew is an image (no error inside the widget)
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    assert any(w["model_name"] == "IntSliderModel" for w in state.values())
    drawn = [o for w in state.values() if w["model_name"] == "OutputModel" for o in w["state"].get("outputs", [])]
    assert drawn and all("image/png" in o.get("data", {}) for o in drawn)
    if path.stem == "00_quick_start":
        assert "1 case(s) analysed, 0 skipped" in text and "demo_lesion_1_heatmap.nii.gz" in text
    if path.stem == "02_anomaly_detection":
        assert "4 case(s) analysed, 0 skipped" in text
        assert "demo_lesion_1.nii.gz | mask: demo_lesion_1_brainmask.nii.gz | lesions: demo_lesion_1_lesions" in text
        assert _number(text, "threshold (model scale):") > 0  # calibrated on the healthy folder
        assert _number(text, "auroc:") > 0.7  # even on the tiny settings, the inserted lesions stand out
    if path.stem == "03_reconstruction":
        assert text.count("1 case(s) reconstructed with dds, 0 skipped") == 2
        psnr = {(case, method): float(v) for case, method, v in re.findall(r"(\S+)\s+(\w+): psnr ([\d.]+)", text)}
        mri, ct = (next(c for c, m in psnr if m == baseline) for baseline in ("zerofilled", "fbp"))
        assert {m for c, m in psnr if c == mri} == {"recon", "zerofilled", "tv"}
        assert {m for c, m in psnr if c == ct} == {"recon", "fbp", "tv"}
        # the classical baselines behave as they should: TV improves on zero-filling and on FBP
        assert psnr[(mri, "tv")] > psnr[(mri, "zerofilled")] > 15 and psnr[(ct, "tv")] > psnr[(ct, "fbp")] > 20
    if path.stem == "04_segmentation":
        assert "2 case(s) segmented, 0 skipped" in text and "dice" in text
        bundled = (Path(__file__).parents[1] / "data" / "weights" / "seg_lesion_2d.safetensors").is_file()
        assert ("UNTRAINED" in text) != bundled  # the stand-in model is named as such, and only when needed
        assert "members disagree on" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("stem", sorted(FOR_USERS))
def test_one_cell_near_the_top_points_at_the_data(stem):
    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / f"{stem}.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "Point this at your data" in first.source and nb.cells.index(first) <= 2
    tree = ast.parse(first.source)
    assert all(isinstance(node, ast.Assign) for node in tree.body)  # plain settings, nothing run
    names = {t.id for node in tree.body for t in node.targets}
    assert FOR_USERS[stem] <= names
    assert all(ast.literal_eval(node.value) is None for node in tree.body  # the data default to the bundled
               if node.targets[0].id.endswith(("SCAN", "SCANS", "MODEL")))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5 and all(os.path.getsize(p) > 1000 for p in NOTEBOOKS)
    assert {p.stem for p in NOTEBOOKS} >= set(FOR_USERS)
