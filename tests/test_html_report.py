"""The HTML reports: orientation, run-wide colour scales, outlines, and each task's page in a real headless browser."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from anomaly_helpers import FAST as DETECT_FAST
from anomaly_helpers import save_tiny_model, volume, write_nifti

from medidiff.anomaly import detect
from medidiff.core.processes import make_process
from medidiff.nets import build_unet
from medidiff.outputs import figures
from medidiff.outputs import html as pages
from medidiff.recon.reconstruct import reconstruct
from medidiff.segment import segment
from medidiff.weights import save_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------------------- pure parts


def _ras(spacing=(1.0, 1.0, 1.0), flip_x=False):
    a = np.diag([*spacing, 1.0])
    if flip_x:
        a[0, 0] *= -1
    return a


def test_radiological_view_mirrors_the_neurological_one_and_puts_the_patients_right_on_the_left():
    layout = figures.SliceLayout.from_affine(_ras(), 2)
    assert (layout.across, layout.up, layout.plane) == (0, 1, "axial")
    plane = np.arange(12.0).reshape(4, 3)  # [x, y]: asymmetric in both
    plane[3, 0] = 100.0  # the patient's right-most column (x grows to the right in RAS), the back row (low y)
    radio = figures.orient_slice(plane, layout, "radiological")
    neuro = figures.orient_slice(plane, layout, "neurological")
    np.testing.assert_array_equal(radio, neuro[:, ::-1])
    assert radio.shape == (3, 4)
    assert radio[-1, 0] == 100.0 and neuro[-1, -1] == 100.0  # right side: image left (radiological); back: bottom
    assert layout.markers("radiological") == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert layout.markers("neurological") == {"left": "L", "right": "R", "top": "A", "bottom": "P"}


def test_a_volume_stored_left_to_right_is_shown_the_same_way_as_its_ras_copy():
    rng = np.random.default_rng(0)
    vol = rng.random((5, 4, 3))
    a = figures.orient_slice(vol[:, :, 1], figures.SliceLayout.from_affine(_ras(), 2))
    b = figures.orient_slice(vol[::-1, :, 1], figures.SliceLayout.from_affine(_ras(flip_x=True), 2))
    np.testing.assert_array_equal(a, b)


def test_the_slice_axis_is_the_head_foot_one_whatever_the_voxel_order():
    permuted = np.zeros((4, 4))
    permuted[:3, :3] = [[0, 0, 1], [1, 0, 0], [0, 1, 0]]  # array axis 1 runs along z (superior)
    permuted[3, 3] = 1
    assert figures.slice_axis(permuted, (5, 6, 7)) == 1
    assert figures.slice_axis(_ras(), (5, 6, 7)) == 2
    assert figures.slice_axis(_ras(), (5, 1, 7)) == 1  # a 2D image: its single slice
    coronal = figures.SliceLayout.from_affine(permuted, 1)
    assert coronal.plane == "axial" and coronal.markers()["top"] == "A"  # array axis 2 (y) runs up
    sagittal = figures.SliceLayout.from_affine(_ras(), 0)
    assert sagittal.plane == "sagittal" and sagittal.markers()["top"] == "S"


def test_one_colour_scale_for_every_case_of_a_run():
    affine = _ras()
    low = np.zeros((6, 6, 3), np.float32)
    low[2:4, 2:4, 1] = 1.0
    high = np.zeros((6, 6, 3), np.float32)
    high[1:5, 1:5, 2] = 10.0
    views = [pages.view_arrays(low, affine, layers={"heatmap": low}), pages.view_arrays(high, affine,
                                                                                      layers={"heatmap": high})]
    scale = pages.run_scale(views, "heatmap", label="Heatmap", units="u")
    assert (scale.vmin, scale.vmax) == figures.shared_scale([low, high])
    assert scale.vmin == 0.0 and scale.vmax == pytest.approx(10.0)
    own = [pages.run_scale([v], "heatmap", label="", units="") for v in views]
    assert own[0].vmax == pytest.approx(1.0) and own[1].vmax == pytest.approx(10.0)  # what one case alone would get
    # the same value gets the same colour in both cases' images
    panel = [pages.Panel("heatmap", overlay="heatmap", alpha=1.0)]
    sections = [pages.case_section(f"c{k}", v, panel, scales=[scale], grey=(0.0, 1.0)) for k, v in enumerate(views)]
    assert all(s.images for s in sections)
    assert figures.shared_scale([]) == (0.0, 1.0)


def test_the_reference_outline_lies_on_top_of_the_flagged_one():
    img = np.zeros((8, 8))
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    rgb = figures.render_slice(img, (0, 1), outlines=[(mask, "#0000ff"), (mask, "#00ff00")], zoom=3)
    edge = figures._edge(mask.repeat(3, 0).repeat(3, 1), 1)
    assert rgb.shape == (24, 24, 3) and (rgb[edge] == [0, 255, 0]).all()
    assert (rgb[~edge] == 0).all()


def test_the_slices_shown_are_every_slice_with_a_mask_voxel():
    vol = np.zeros((6, 6, 9), np.float32)
    flagged = np.zeros_like(vol)
    flagged[1, 1, [2, 3]] = 1
    lesion = np.zeros_like(vol)
    lesion[2, 2, [3, 7]] = 1
    view = pages.view_arrays(vol, _ras(), masks={"flagged": flagged, "lesion": lesion})
    assert view["view_index"].tolist() == [2, 3, 7]
    assert view["view_image"].shape == (3, 6, 6) and view["view_mask_lesion"][2].sum() == 1
    section = pages.case_section("c", view, [pages.Panel("scan", outlines=("flagged", "lesion"))],
                                 outlines={"flagged": pages.Outline("#00f", "flagged", "finding"),
                                           "lesion": pages.Outline("#0f0", "lesion", "lesion")})
    assert section.tags == [["finding"], ["finding", "lesion"], ["lesion"]]


# --------------------------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny detect (two cases, one with a lesion), segment and reconstruct run; each run's folder."""
    root = tmp_path_factory.mktemp("html")
    folders = {}
    # detect: two cases, a lesion in one, a threshold
    model = save_tiny_model(root / "anomaly_model")
    scans = root / "scans"
    scans.mkdir()
    entries = []
    for k, name in enumerate(("a", "b")):
        image, brain, affine = volume((16, 16, 5), seed=k, flip=k == 1)
        label = np.zeros_like(brain)
        if k == 0:
            label[6:10, 6:10, 1:3] = 1
            image = np.where(label > 0, image * 1.6, image)
        write_nifti(scans / f"{name}.nii.gz", image, affine)
        write_nifti(scans / f"{name}_label.nii.gz", label, affine)
        entries.append({"image": f"{name}.nii.gz", "label": f"{name}_label.nii.gz"})
    (scans / "list.json").write_text(json.dumps({"test": entries}))
    folders["detect"] = root / "detect"
    detect(model, scans / "list.json", folders["detect"], threshold=0.05, **{**DETECT_FAST, "n_samples": 2})
    # segment
    torch.manual_seed(0)
    net = build_unet(spatial_dims=2, in_channels=1, cond_channels=1, channels=(8, 16),
                     attention_levels=(False, False), norm_num_groups=8, num_head_channels=8)
    prep = {"source": "test", "orientation": "RAS", "spacing_mm": [2.0, 2.0], "slicing_axis": 2, "size": [16, 16],
            "intensity": {"method": "percentile", "percentiles": [0.5, 99.5]},
            "labels": {"classes": ["background", "lesion"]}}
    save_model(root / "seg_model", net, make_process("ddpm", n_steps=50), "eps", {"data_prep": prep})
    image, _, affine = volume((18, 16, 4), spacing=(1.5, 2.0, 2.5), flip=True)
    label = np.zeros(image.shape, np.uint8)
    label[7:11, 6:10, 1:3] = 1
    image = np.where(label > 0, image * 1.8, image)
    seg_in = root / "seg_in"
    seg_in.mkdir()
    write_nifti(seg_in / "s.nii.gz", image, affine)
    write_nifti(seg_in / "s_label.nii.gz", label, affine)
    (seg_in / "list.json").write_text(json.dumps({"test": [{"image": "s.nii.gz", "label": "s_label.nii.gz"}]}))
    folders["segment"] = root / "segment"
    segment(root / "seg_model", seg_in / "list.json", folders["segment"], members=2, steps=2, progress=False)
    # reconstruct
    torch.manual_seed(0)
    net = build_unet(spatial_dims=2, in_channels=1, channels=(8, 16), attention_levels=(False, False),
                     norm_num_groups=8, num_head_channels=8)
    save_model(root / "mri_prior", net, make_process("ddpm", n_steps=20), "eps",
               {"data_prep": {"source": "test", "orientation": "RAS", "slicing_axis": 2, "size": [16, 16],
                              "patch": True, "intensity": {"method": "percentile"}}})
    head, _, affine = volume((20, 18, 3), spacing=(1.0, 1.0, 2.0), flip=True)
    write_nifti(root / "head.nii.gz", head, affine)
    folders["reconstruct"] = root / "reconstruct"
    reconstruct(root / "mri_prior", root / "head.nii.gz", folders["reconstruct"], modality="mri", steps=2,
                tv_iters=5, progress=False, coils=1, slices=[0, 2])
    return folders


@pytest.mark.parametrize("task", ["detect", "segment", "reconstruct"])
def test_every_run_writes_a_self_contained_page(runs, task):
    path = runs[task] / "report.html"
    text = path.read_text(encoding="utf-8")
    assert (runs[task] / "report.md").is_file()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", text)  # nothing fetched from elsewhere
    srcs = re.findall(r"""<img[^>]*\ssrc="([^"]*)\"""", text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "How to read this report" in text and "Radiological view" in text


def test_the_detect_page_lists_every_slice_with_a_finding_or_a_lesion(runs):
    text = (runs["detect"] / "report.html").read_text(encoding="utf-8")
    label = nib.load(runs["detect"].parent / "scans" / "a_label.nii.gz").get_fdata()
    flagged = nib.load(runs["detect"] / "a_anomaly_mask.nii.gz").get_fdata()
    expected = sorted(set(np.nonzero(label.any(axis=(0, 1)))[0]) | set(np.nonzero(flagged.any(axis=(0, 1)))[0]))
    case_a = text[text.index('id="case-0"'):text.index('id="case-1"')]
    shown = [int(i) for i in re.findall(r'id="case-0-s(\d+)"', case_a)]
    assert shown == expected and {1, 2} <= set(shown)
    links = re.findall(r'<a class="go" href="#case-0-s(\d+)" data-k="(\d+)">\d+ \(([^)]*)\)</a>', case_a)
    assert [int(i) for i, _, _ in links] == expected and [int(k) for _, k, _ in links] == list(range(len(expected)))
    assert all(("lesion" in tags) == bool(label[..., int(i)].any()) for i, _, tags in links)
    assert text.count("<b>Heatmap</b>") == 1 and text.count("<b>Uncertainty (spread)</b>") == 1  # one scale per run


def _browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    return sync_api


@pytest.fixture(scope="module")
def browser():
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.mark.parametrize("task", ["detect", "segment", "reconstruct"])
def test_the_page_loads_in_a_headless_browser_with_every_image_shown(runs, browser, task):
    page = browser.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto((runs[task] / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    n_images = page.evaluate("document.images.length")
    assert n_images > 0
    broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.alt)")
    assert broken == []
    assert errors == []
    legend = page.inner_text("dl.legend")
    assert "Orientation letters" in legend and "Slice numbers" in legend
    marks = page.eval_on_selector_all(".frame .mk", "els => els.map(e => e.textContent)")
    assert marks and {"R", "L"} <= set(marks)
    # the first image's left letter: R in the radiological view, L once the box is cleared, the image mirrored
    first = ".slice.on .frame .mk.l"
    assert page.inner_text(first) == "R"
    page.uncheck("#radiological")
    assert page.inner_text(first) == "L"
    assert page.evaluate("getComputedStyle(document.querySelector('.slice.on .frame img')).transform") != "none"
    page.check("#radiological")
    assert page.inner_text(first) == "R"
    # the slider walks through the slices; one shown at a time
    if page.query_selector("input.slider"):
        n = page.eval_on_selector_all("section.case:first-of-type .slice", "els => els.length")
        page.eval_on_selector("section.case input.slider",
                              f"s => {{ s.value = '{n - 1}'; s.dispatchEvent(new Event('input')); }}")
        assert page.eval_on_selector_all("section.case .slice.on", "els => els.length") == len(
            page.query_selector_all("section.case"))
        last = page.eval_on_selector("section.case .where", "e => e.textContent")
        assert last.startswith(page.eval_on_selector("section.case .slice.on", "e => e.dataset.label")[:5])
    for word in {"detect": ("Heatmap", "Threshold", "FPR", "Flagged region", "Uncertainty"),
                 "segment": ("Segmentation (mask)", "Uncertainty", "Reference"),
                 "reconstruct": ("Error map", "Diffusion")}[task]:
        assert word in legend
    page.close()
