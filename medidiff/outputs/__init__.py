"""Writing results: files and tables, NIfTI volumes with the input's geometry, DICOM objects, figures.

Modules: ``files`` (safe case names, atomic writes, text, JSON, CSV), ``volumes`` (NIfTI with the
input's affine), beside a DICOM input ``dicom_pm`` (a float map as a DICOM Parametric Map) and ``dicom_seg``
(a label map as DICOM SEG), both highdicom, sharing ``dicom`` (sources, geometry); ``figures`` (PNG overlays).
Results are moved back onto an input's grid by ``medidiff.cases.restore`` before they are written.
"""

from .dicom_pm import write_parametric_map
from .dicom_seg import write_dicom_seg
from .figures import overlay_png, relevant_slices
from .files import (
    atomic_write,
    cell,
    check_not_input,
    result_path,
    safe_case_name,
    write_json,
    write_table,
    write_text,
)
from .volumes import affine_of, spatial_shape, write_like, write_nifti

__all__ = [
    "affine_of",
    "atomic_write",
    "cell",
    "check_not_input",
    "overlay_png",
    "relevant_slices",
    "result_path",
    "safe_case_name",
    "spatial_shape",
    "write_dicom_seg",
    "write_json",
    "write_like",
    "write_nifti",
    "write_parametric_map",
    "write_table",
    "write_text",
]
