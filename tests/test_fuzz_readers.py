"""Fuzzing every reader with generated damaged inputs (hypothesis): only medidiff's own errors may come out.

Readers: DICOM (mutated headers with right and wrong VRs, truncated pixel data, odd transfer syntaxes,
MONOCHROME1, flipped and cut bytes), NIfTI (mutated header fields, truncated data, truncated or damaged
gzip), JSON datalists, CSV lists and recipes. Each test feeds ``MEDIDIFF_FUZZ_EXAMPLES`` inputs (500 by
default; more for a longer search), asserts that every one was read or refused with a ``MedidiffError``,
and prints the counts (``pytest -s``) that the README's table reports.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import Tag

from medidiff.data.discover import discover, load
from medidiff.data.nifti import read_nifti
from medidiff.errors import MedidiffError
from medidiff.recipes import load_recipe

N = int(os.environ.get("MEDIDIFF_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=N, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
_DIR = Path(tempfile.mkdtemp(prefix="medidiff-fuzz-"))


class Tally:
    """Counts the inputs of one reader and how each ended; fails on anything but a medidiff error."""

    def __init__(self, name: str):
        self.name, self.counts = name, Counter()

    def __call__(self, fn, *args) -> None:
        self.counts["inputs"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn(*args)
        except MedidiffError as e:
            self.counts[f"refused ({type(e).__name__})"] += 1
            assert str(e).strip()
            return
        self.counts["read"] += 1

    def report(self) -> int:
        """Print the counts; returns the number of inputs tried (each read or refused with a medidiff error)."""
        print(f"\nfuzz {self.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items())))
        return self.counts["inputs"]


def _bytes_mutations():
    """Optional cut and byte flips applied to a file's bytes."""
    return st.tuples(st.one_of(st.none(), st.floats(0, 1)),
                     st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4))


def _mutate(data: bytes, mutation) -> bytes:
    cut, flips = mutation
    buf = bytearray(data)
    for where, value in flips:
        if buf:
            buf[int(where * len(buf))] = value
    return bytes(buf if cut is None else buf[: int(cut * len(buf))])


# ------------------------------------------------------------------------------------------------ DICOM

_DICOM_FIELDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation", "PixelSpacing",
                 "ImageOrientationPatient", "ImagePositionPatient", "RescaleSlope", "RescaleIntercept",
                 "SliceThickness", "PlanarConfiguration", "Modality", "SeriesInstanceUID", "SeriesNumber")
_VALUES = {
    "US": st.integers(0, 65535), "SS": st.integers(-32768, 32767), "UL": st.integers(0, 2**32 - 1),
    "DS": st.sampled_from(["0", "-1", "1e309", "nan", "abc", "1\\2", "", "1e-30", "0.5\\0.5", "1\\0\\0\\0\\1\\0"]),
    "IS": st.sampled_from(["0", "-5", "99999999", "x", "", "3"]),
    "CS": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "", "??", "CT"]),
    "UI": st.sampled_from(["1.2.3", "", "not.a.uid", "1." * 40]),
    "OB": st.binary(max_size=12),
}
_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
             uid.DeflatedExplicitVRLittleEndian, uid.JPEGBaseline8Bit, uid.JPEG2000Lossless, uid.RLELossless,
             uid.JPEGLSLossless, uid.UID("1.2.3.4.5")]


def _dicom_base() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 4, 4
    ds.PixelData = np.arange(16, dtype=np.int16).tobytes()
    return ds


_BASE_DICOM = _dicom_base()


@st.composite
def dicom_files(draw) -> bytes:
    ds = copy.deepcopy(_BASE_DICOM)
    for keyword in draw(st.lists(st.sampled_from(_DICOM_FIELDS), max_size=4)):
        vr = draw(st.sampled_from([dictionary_VR(keyword), *_VALUES]))
        vr = vr if vr in _VALUES else "OB"
        tag, value = tag_for_keyword(keyword), draw(_VALUES[vr])
        if isinstance(value, str):  # stored as the raw text, unparsed, as a malformed file holds it
            raw = value.encode("latin-1") + b" " * (len(value) % 2)
            ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
        else:
            ds[tag] = DataElement(tag, vr, value)
    pixels = ds.PixelData
    ds.PixelData = pixels[: draw(st.integers(0, len(pixels) + 4))] if draw(st.booleans()) else pixels
    ds.file_meta.TransferSyntaxUID = draw(st.sampled_from(_SYNTAXES))
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
    except Exception:  # noqa: BLE001 - pydicom cannot encode this mutation: fuzz the base file's bytes
        data = (_DIR / "base.dcm").read_bytes()
    return _mutate(data, draw(_bytes_mutations()))


def _read_dicom(path: Path) -> None:
    for source in discover(path, select="all"):
        load(source)


def test_dicom_reader_fuzz():
    _BASE_DICOM.save_as(_DIR / "base.dcm", enforce_file_format=True)
    tally = Tally("DICOM")

    @FUZZ
    @given(dicom_files())
    def run(data):
        path = _DIR / "case.dcm"
        path.write_bytes(data)
        tally(_read_dicom, path)

    run()
    assert tally.report() >= N


# ------------------------------------------------------------------------------------------------ NIfTI

_FLOATS = st.sampled_from([0.0, -1.0, 1.0, 2.5, 1e30, float("nan"), float("inf"), -float("inf"), 1e-30])


@st.composite
def nifti_files(draw) -> tuple[bytes, bool]:
    image = nib.Nifti1Image(np.arange(48, dtype=np.int16).reshape(4, 4, 3), np.diag([2.0, 2.0, 2.0, 1.0]))
    header = image.header
    block = image.to_bytes()
    fields = {
        "dim": st.lists(st.integers(-2, 40000), min_size=8, max_size=8),
        "datatype": st.sampled_from([2, 4, 8, 16, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2304, 0, 99, 32767]),
        "bitpix": st.integers(-8, 128), "pixdim": st.lists(_FLOATS, min_size=8, max_size=8),
        "vox_offset": _FLOATS, "scl_slope": _FLOATS, "scl_inter": _FLOATS,
        "qform_code": st.integers(-1, 5), "sform_code": st.integers(-1, 5), "srow_x": st.lists(_FLOATS, min_size=4,
                                                                                              max_size=4),
        "quatern_b": _FLOATS, "magic": st.sampled_from([b"n+1", b"ni1", b"xxx", b""]),
        "sizeof_hdr": st.sampled_from([348, 540, 0, -1]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4)):
        try:
            header[name] = draw(fields[name])
        except (ValueError, TypeError, OverflowError):
            pass
    data = header.binaryblock + block[348:]
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    packed = draw(st.booleans())
    if packed:
        data = _mutate(gzip.compress(data, mtime=0), draw(_bytes_mutations()))  # truncated or damaged gzip
    return data, packed


def test_nifti_reader_fuzz():
    tally = Tally("NIfTI")

    @FUZZ
    @given(nifti_files())
    def run(item):
        data, packed = item
        path = _DIR / ("case.nii.gz" if packed else "case.nii")
        path.write_bytes(data)
        tally(read_nifti, path)

    run()
    assert tally.report() >= N


# ------------------------------------------------------------------------------------------ lists, recipes

_PATHS = st.sampled_from(["ok.nii.gz", "bad.nii.gz", "missing.nii.gz", "", "dir", "../", "ok.nii.gz\0x"])
_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | _PATHS,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=8)
_ENTRY = st.dictionaries(st.sampled_from(["image", "label", "mask", "annotations", "other"]), _PATHS | _ANY,
                         max_size=4)


def _list_folder() -> Path:
    folder = _DIR / "lists"
    (folder / "dir").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), folder / "ok.nii.gz")
    (folder / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    return folder


def test_datalist_fuzz():
    folder, tally = _list_folder(), Tally("JSON datalists")

    @FUZZ
    @given(st.one_of(st.dictionaries(st.sampled_from(["training", "validation", "test", "x"]),
                                     st.lists(_ENTRY, max_size=3) | _ANY, max_size=3), _ANY),
           st.booleans())
    def run(content, as_text):
        path = folder / "list.json"
        path.write_text(json.dumps(content)[:-1] if as_text else json.dumps(content))
        tally(discover, path)

    run()
    assert tally.report() >= N


def test_csv_list_fuzz():
    folder, tally = _list_folder(), Tally("CSV lists")
    cells = _PATHS | st.text(alphabet=st.characters(codec="utf-8"), max_size=6) | st.sampled_from(['"', ",", "\n"])

    @FUZZ
    @given(st.lists(st.sampled_from(["image", "label", "mask", "split", "Image ", ""]), max_size=4),
           st.lists(st.lists(cells, max_size=5), max_size=4), st.binary(max_size=6))
    def run(columns, rows, junk):
        text = "\n".join(",".join(row) for row in [columns, *rows])
        (folder / "list.csv").write_bytes(text.encode("utf-8", "surrogatepass") + junk)
        tally(discover, folder / "list.csv")

    run()
    assert tally.report() >= N


_KEYS = ["task", "seed", "device", "anomaly", "data", "model", "process", "training", "inputs", "fpr",
         "reconstruction", "t_levels", "steps", "map", "channels", "kind", "lr", "unknown"]
_YAML = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) |
                     st.sampled_from(["anomaly", "train", "cpu", "auto"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner,
                                                                                 max_size=4), max_leaves=10)
_TAGS = ["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary AAAA", "&a [*a]",
         "!!float x", "*undefined", "{", "- - -", "\t", "%YAML 9.9\n---"]


def test_recipe_fuzz():
    tally, path = Tally("recipes"), _DIR / "recipe.yaml"

    @FUZZ
    @given(st.dictionaries(st.sampled_from(_KEYS), _YAML, max_size=5), st.lists(st.sampled_from(_TAGS), max_size=2),
           st.integers(0, 200), st.text(max_size=20))
    def run(content, tags, where, noise):
        text = yaml.safe_dump(content, allow_unicode=True)
        for tag in tags:
            text = text[:where % (len(text) + 1)] + tag + text[where % (len(text) + 1):]
        path.write_text(text + noise, encoding="utf-8", errors="surrogatepass")
        tally(load_recipe, path)

    run()
    assert tally.report() >= N


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    import shutil

    shutil.rmtree(_DIR, ignore_errors=True)
