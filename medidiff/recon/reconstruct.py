"""Reconstruction end to end: inputs in, the diffusion and classical reconstructions on the input's grid out.

``reconstruct(model, inputs, out_dir, options)`` loads the prior (``medidiff.weights.load_denoiser``) and
applies it to any image size (``medidiff.recon.prior.AnySize``; a 3D prior to the whole stack), then for
each case:

- images (NIfTI, DICOM, datalists: ``medidiff.cases``): reoriented as the prior's training data were
  (no resampling: the measurements are those of the scan's own grid), cut into slices along the prior's
  slicing axis, measurements simulated from them (``medidiff.recon.problems``: seeded, documented there);
  the image is the reference;
- fastMRI k-space (``.h5``) and sinograms (``.npz``): ``medidiff.recon.measured``;

solves with the chosen solver (``medidiff.recon.solvers``) slice batch by slice batch, and writes, in the
input's units (CT: HU) and on its grid:

- ``<case>_recon.nii.gz`` (the diffusion solver), ``<case>_zerofilled.nii.gz`` (MRI) or ``<case>_fbp.nii.gz``
  (CT), ``<case>_tv.nii.gz`` (total variation), ``<case>_panel.png`` (reference, baselines, diffusion and
  error maps);

and for the run ``scores.csv`` (per case and method: PSNR, SSIM, NMSE when there is a reference, network
evaluations, seconds), ``metrics.json`` (the same, with means, when a reference exists), ``report.md``,
``report.html`` (a self-contained page: the reconstructed slices by method, error maps on one scale for the
run; ``medidiff.recon.report``) and ``failures.csv`` for skipped cases.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medidiff import outputs
from medidiff.cases import find_cases, load_case, plain, prepare, restore, slicewise
from medidiff.core.ensemble import member_seed
from medidiff.core.noise import make_generators
from medidiff.errors import DataError, MedidiffError, ModelError
from medidiff.metrics import nmse, psnr, ssim
from medidiff.modelinfo import DataPrep, FixedIntensity, ModelInfo
from medidiff.results import TaskResult

from . import measured, problems, report, solvers
from .config import ReconSection
from .prior import AnySize, unet_multiple

__all__ = ["reconstruct", "CaseResult", "make_prior", "solve_problem"]

log = logging.getLogger("medidiff.recon")


@dataclass
class CaseResult:
    """One case reconstructed: slices ``(S, 1, H, W)`` in the output's units, by method.

    Attributes:
        name: the case name.
        images: ``{"recon": ..., "zerofilled" or "fbp": ..., "tv": ...}``.
        reference: the true slices, when known.
        nfe: network evaluations per slice of the diffusion solver.
        seconds: seconds per method for the whole case.
        settings: what was simulated or read.
    """

    name: str
    images: dict[str, torch.Tensor]
    reference: torch.Tensor | None
    nfe: int
    seconds: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)


def make_prior(denoiser, info: ModelInfo, options, *, seed: int = 0):
    """The denoiser for any image size: ``AnySize`` for a 2D prior; for a 3D prior, a stack of slices as a volume.

    Args:
        denoiser: the loaded denoiser.
        info: its ``ModelInfo``.
        options: ``PriorOptions``.
        seed: for the random shifts.
    """
    generator = torch.Generator().manual_seed(member_seed(seed, 7))
    patch = info.data_prep.size if options.mode == "patches" else None
    prior = AnySize(denoiser, multiple=unet_multiple(info.net), mode=options.mode, patch=patch,
                    overlap=options.overlap, shift=options.shift, generator=generator, batch_size=options.batch_size,
                    bf16=options.bf16)
    return prior if info.spatial_dims == 2 else _StackAsVolume(prior)


class _StackAsVolume(torch.nn.Module):
    """A 3D denoiser applied to a stack of slices ``(S, C, H, W)`` as one volume ``(1, C, S, H, W)``."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    @property
    def process(self):
        return self.denoiser.process

    def forward(self, x, t):
        out = self.denoiser(x.movedim(0, 1)[None], t[:1])
        return out[0].movedim(1, 0)


def solve_problem(prior, problem: problems.Problem, solver_options, *, seed: int = 0, first: int = 0,
                  device: torch.device | str = "cpu", progress: bool = False) -> tuple[torch.Tensor, int]:
    """The diffusion reconstruction of a problem's slices, in physical units, and NFE per slice.

    Slice ``first + i`` uses the generator seeded ``member_seed(seed, first + i)``, whatever the batching.
    """
    op, y, x_init = problem.network()
    fn = solvers.get_solver(solver_options.name)
    gens = make_generators([member_seed(seed, first + i) for i in range(x_init.shape[0])], device=device)
    result = fn(prior, op, y.to(device), x_init.to(device), generator=gens, progress=progress,
                **solver_options.kwargs(problem.modality))
    return problem.scale.to_physical(result.image.detach().cpu().double()), result.nfe


def _solve_all(prior, problem: problems.Problem, options: ReconSection, *, seed: int, device) -> CaseResult:
    """Baselines and the diffusion solver over a problem's slices, batch by batch."""
    n = problem.y.shape[0]
    batch = n if options.solver.z_tv > 0 else options.solver.batch_size
    recon, tv, nfe = [], [], 0
    seconds = {"recon": 0.0, "tv": 0.0}
    for start in tqdm(range(0, n, batch), desc="slices", disable=not options.progress, leave=False):
        part = problem.select(slice(start, start + batch))
        t0 = time.perf_counter()
        x, nfe = solve_problem(prior, part, options.solver, seed=seed, first=start, device=device,
                               progress=options.progress)
        seconds["recon"] += time.perf_counter() - t0
        recon.append(x)
        if options.baselines.tv:
            t0 = time.perf_counter()
            tv.append(part.tv(options.baselines.tv_weight, options.baselines.tv_iters))
            seconds["tv"] += time.perf_counter() - t0
    images = {"recon": torch.cat(recon), problem.baseline_kind: problem.baseline}
    if tv:
        images["tv"] = torch.cat(tv)
    images = {k: problem.to_output(v.double()).float() for k, v in images.items()}
    ref = None if problem.reference is None else problem.to_output(problem.reference.double()).float()
    return CaseResult("", images, ref, nfe, seconds, dict(problem.settings))


# -- image inputs: simulated measurements -----------------------------------------------------------
def _simulate(stack: torch.Tensor, options: ReconSection, info: ModelInfo, seed: int) -> problems.Problem:
    m = options.measurement
    if options.modality == "mri":
        return problems.simulate_mri(stack, acceleration=m.acceleration, center_fraction=m.center_fraction,
                                     mask=m.mask, coils=m.coils, noise=m.noise, known_maps=m.known_maps, seed=seed)
    return problems.simulate_ct(stack, views=m.views, limited_angle=m.limited_angle, dose=m.dose,
                                window=_window(info), seed=seed)


def _window(info: ModelInfo) -> tuple[float, float]:
    rec = info.data_prep.intensity
    if rec.method != "hu_window":
        raise ModelError(f"a CT prior needs a HU window (data_prep.intensity.method hu_window), not {rec.method!r}",
                         fix="use a CT prior (recipes/ct_2d.yaml).")
    return tuple(rec.window)


def _image_case(prior, info: ModelInfo, source, options: ReconSection, *, seed: int, device) -> tuple[CaseResult, Any]:
    case = load_case(source)
    prep = info.data_prep
    axis = 2 if prep.slicing_axis is None else prep.slicing_axis
    geometry = DataPrep(source=prep.source, orientation=prep.orientation, slicing_axis=axis,
                        intensity=FixedIntensity())
    prepared = prepare(case, geometry, spatial_dims=2)
    x = plain(prepared.image).float().mean(0, keepdim=True)
    fg = prepared.foreground
    if options.slices is not None:
        chosen = torch.zeros(x.shape[1 + axis], dtype=torch.bool)
        chosen[[s for s in options.slices if s < chosen.numel()]] = True
        fg = fg * chosen.reshape([-1 if d == 1 + axis else 1 for d in range(fg.ndim)])
    holder: dict[str, CaseResult] = {}

    def run(stack, _fg):
        hu_or_units = stack.double()
        problem = _simulate(hu_or_units, options, info, seed)
        result = _solve_all(prior, problem, options, seed=seed, device=device)
        holder["result"] = result
        return [result.images[k] for k in result.images] + ([result.reference] if result.reference is not None
                                                              else [])

    vols, n = slicewise(run, x, fg, spatial_dims=2, axis=axis,
                        min_foreground=0.0 if options.solver.z_tv > 0 else options.min_foreground)
    if not n:
        raise DataError("no slice has enough foreground to reconstruct", where=Path(source.paths[0]),
                        fix="lower recon.min_foreground or choose recon.slices.")
    result = holder["result"]
    result.name = case.name
    keys = list(result.images)
    volumes = {k: restore(v, prepared) for k, v in zip(keys, vols)}
    reference_volume = restore(vols[len(keys)], prepared) if len(vols) > len(keys) else None
    return result, (case, volumes, reference_volume)


# -- measured inputs ---------------------------------------------------------------------------------
def _measured_case(prior, info: ModelInfo, path: Path, options: ReconSection, *, seed: int, device
                   ) -> tuple[CaseResult, Any]:
    m = options.measurement
    if measured.is_kspace(path):
        if options.modality != "mri":
            raise ValueError(f"modality: {path.name} holds MRI k-space; set modality to mri")
        problem, read = measured.kspace_problem(path, acceleration=m.acceleration, center_fraction=m.center_fraction,
                                                mask=m.mask, seed=seed)
        spacing = 1.0
    else:
        if options.modality != "ct":
            raise ValueError(f"modality: {path.name} holds a sinogram; set modality to ct")
        problem, read = measured.sinogram_problem(path, window=_window(info))
        spacing = read["pixel_size_mm"]
    if options.slices is not None:
        keep = [s for s in options.slices if s < problem.y.shape[0]]
        problem = problem.select(keep)
    result = _solve_all(prior, problem, options, seed=seed, device=device)
    result.name = outputs.safe_case_name(path.name.split(".")[0])
    result.settings.update(read)
    affine = np.diag([spacing, spacing, 1.0, 1.0])

    def volume(stack):  # (S, 1, rows, cols) -> (1, rows, cols, S)
        return stack.permute(1, 2, 3, 0)

    volumes = {k: volume(v) for k, v in result.images.items()}
    return result, (affine, volumes, None if result.reference is None else volume(result.reference))


def _measured_inputs(path: Path) -> list[Path]:
    if path.is_file() and (measured.is_kspace(path) or measured.is_sinogram(path)):
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if measured.is_kspace(p) or measured.is_sinogram(p))
    return []


# -- the run ------------------------------------------------------------------------------------------
def _write_case(result: CaseResult, written_geometry, out_dir: Path, inputs: Path, options: ReconSection
                ) -> list[Path]:
    geometry, volumes, reference = written_geometry
    protected = [inputs]
    paths = []
    for kind, vol in volumes.items():
        path = outputs.result_path(out_dir, result.name, kind, "nii.gz")
        if isinstance(geometry, np.ndarray):
            paths.append(outputs.write_nifti(vol, path, geometry, protected=protected))
        else:
            paths.append(outputs.write_like(vol, geometry.image, path, protected=protected))
    paths.append(report.panel_png(result, outputs.result_path(out_dir, result.name, "panel", "png"),
                                  n_slices=options.panel_slices, protected=protected))
    return paths


def _rows(result: CaseResult) -> list[dict[str, Any]]:
    rows = []
    for method, img in result.images.items():
        row: dict[str, Any] = {"case": result.name, "method": method,
                               "nfe": result.nfe if method == "recon" else 0,
                               "seconds": round(result.seconds.get(method, 0.0), 3)}
        if result.reference is not None:
            row.update(slice_metrics(img, result.reference))
        rows.append(row)
    return rows


def slice_metrics(image: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR, SSIM and NMSE of slices ``(S, 1, H, W)``, each the mean over the slices (data range: the reference's)."""
    rng = float(reference.max() - reference.min()) or 1.0
    values = {"psnr": [], "ssim": [], "nmse": []}
    for a, b in zip(image[:, 0].numpy(), reference[:, 0].numpy()):
        values["psnr"].append(psnr(a, b, data_range=rng))
        values["ssim"].append(ssim(a, b, data_range=rng))
        values["nmse"].append(nmse(a, b))
    return {k: round(float(np.mean(v)), 5) for k, v in values.items()}


def reconstruct(model: str | Path, inputs: str | Path, out_dir: str | Path, options: ReconSection | None = None, *,
                seed: int = 0, device: str | torch.device = "cpu", **changes: Any) -> TaskResult:
    """Reconstructions for the inputs at ``inputs`` (see the module docstring for what is written).

    Args:
        model: the prior (``.safetensors`` with its ``.json``, or a folder).
        inputs: images, a fastMRI ``.h5`` or a sinogram ``.npz`` (or a folder of them).
        out_dir: the output folder.
        options: the ``recon`` section (default: its defaults); ``changes`` are applied to it, a stage's
            options given by their own names (``acceleration=8``, ``solver="pc"``).
        seed: seeds the simulated measurements and the solver's noise.
        device: where the prior runs.

    Returns:
        The ``TaskResult``.

    Raises:
        ValueError: an unknown or invalid option.
        ModelError, DataError: the model or the inputs cannot be used.
    """
    from medidiff.data.batch import FailureLog
    from medidiff.runtime import resolve_device
    from medidiff.weights import load_denoiser

    options = (options or ReconSection()).updated(**changes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    model_path = Path(model)
    denoiser, info = load_denoiser(model_path, device=device)
    prior = make_prior(denoiser, info, options.prior, seed=seed)
    inputs_path = Path(inputs)
    files = _measured_inputs(inputs_path)
    items = files or find_cases(inputs_path, select=options.select)
    failures = FailureLog(out_dir)
    written, rows, results, read, views = [], [], [], [], {}
    for item in tqdm(items, desc="cases", disable=not options.progress):
        name = item.name if isinstance(item, Path) else item.name
        try:
            if isinstance(item, Path):
                result, geometry = _measured_case(prior, info, item, options, seed=seed, device=device)
                read.append(item)
            else:
                result, geometry = _image_case(prior, info, item, options, seed=seed, device=device)
                read += geometry[0].files
            written += _write_case(result, geometry, out_dir, inputs_path, options)
            views[result.name] = report.case_view(geometry)
        except MedidiffError as e:
            failures.record(str(name), e)
            log.warning("skipped %s: %s", name, e)
            continue
        results.append(result)
        rows += _rows(result)
    written.append(outputs.write_table(rows, out_dir / "scores.csv"))
    metrics = report.metrics_table(rows) if any("psnr" in r for r in rows) else None
    settings = {"model": str(model_path), "inputs": str(inputs_path), "seed": seed, "model_step": info.step,
                **options.model_dump(mode="json", exclude={"model", "inputs"}),
                "simulation": results[0].settings if results else {}}
    if metrics is not None:
        written.append(outputs.write_json({**metrics, "settings": settings}, out_dir / "metrics.json"))
    if rows:
        written.append(report.write_report(out_dir, rows, metrics, settings))
        written.append(report.write_html(out_dir, rows, metrics, settings, views))
    if len(failures):
        written.append(failures.path)
    summary = f"{len(results)} case(s) reconstructed with {options.solver.name}, {len(failures)} skipped"
    if metrics:
        recon = metrics["methods"].get("recon", {})
        summary += f"; PSNR {recon.get('psnr', float('nan')):.2f} dB, SSIM {recon.get('ssim', float('nan')):.3f}"
    log.info("%s", summary)
    return TaskResult(outputs=written, inputs=[model_path, *read], rows=rows, metrics=metrics, summary=summary,
                      failures=len(failures))
