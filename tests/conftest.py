"""Shared test fixtures. Fixtures for the data layer are prefixed ``data_``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

# Tests use tiny tensors: one intra-op thread avoids OpenMP oversubscription, which slows small ops
# by 10-100x when the machine is shared.
torch.set_num_threads(1)


def _data_write_series(folder: Path, n: int = 5, *, base: str = "CT_small.dcm", rows: int = 6, columns: int = 8,
                       orientation=(1, 0, 0, 0, 1, 0), origin=(-20.0, 10.0, 30.0), gap: float = 2.5,
                       pixel_spacing=(0.8, 0.6), positions=None, drop=(), series_number: int = 7,
                       modality: str | None = None, description: str = "synthetic", series_uid: str | None = None,
                       orientations=None, shuffle: bool = True, seed: int = 0) -> list[Path]:
    """Writes a synthetic series made from a pydicom test file: one file per slice, in shuffled order.

    Stored pixel ``[row j, column i]`` of slice ``k`` is ``1000 k + 10 j + i``; positions run along the
    plane normal (``orientation[:3] x orientation[3:]``) from ``origin`` in steps of ``gap`` mm unless
    ``positions`` are given; slices whose index is in ``drop`` are not written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(get_testdata_file(base))
    series_uid = series_uid or generate_uid()
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    if positions is None:
        positions = [np.asarray(origin, float) + k * gap * normal for k in range(n)]
    jj, ii = np.mgrid[0:rows, 0:columns]
    order = [k for k in range(len(positions)) if k not in drop]
    if shuffle:
        random.Random(seed).shuffle(order)
    paths = []
    for number, k in enumerate(order):
        ds = template.copy()
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = (1000 * k + 10 * jj + ii).astype(np.int16).tobytes()
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[k]]
        iop = orientations[k] if orientations is not None else orientation
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.SliceThickness = f"{gap:.4f}"
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.PatientName = "Doe^Jane"
        if modality:
            ds.Modality = modality
        path = folder / f"img{number:03d}_{ds.SOPInstanceUID[-6:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def data_series():
    """A function writing a synthetic single-slice-per-file DICOM series (see ``_data_write_series``)."""
    return _data_write_series
