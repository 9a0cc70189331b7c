"""The ``recon`` recipe section: one options object per stage, with the one set of defaults.

``ReconSection`` is what a recipe's ``recon:`` holds and what ``medidiff reconstruct`` builds from its
options. Its stages: ``measurement`` (``MeasurementOptions``: how measurements are simulated from images,
or how measured k-space is masked), ``prior`` (``PriorOptions``: how the prior is applied to any image
size, ``medidiff.recon.prior.AnySize``), ``solver`` (``SolverOptions``, passed to
``medidiff.recon.solvers``) and ``baselines`` (``BaselineOptions``). Unknown keys are errors.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, model_validator

from medidiff.sections import TaskSection

__all__ = ["MeasurementOptions", "PriorOptions", "SolverOptions", "BaselineOptions", "ReconSection", "route",
           "DEFAULT_MODELS", "DEFAULT_STEPS", "DPS_ZETA", "DDS_ETA"]

#: The bundled prior of each modality, used when ``recon.model`` is not given.
DEFAULT_MODELS = {"mri": "data/weights/mri_brain_2d.safetensors", "ct": "data/weights/ct_2d.safetensors"}
#: Each solver's default number of steps (network evaluations: dds and dps 1 per step, pc 2, merge 1).
DEFAULT_STEPS = {"dds": 50, "dps": 200, "pc": 500, "merge": 200}
#: DPS's step size per modality where a recipe leaves ``zeta`` null: chosen on the reconstruction benchmark's
#: validation slices (``benchmarks/bench_recon.py``; never its test slices) with the bundled priors. The step is
#: relative to the measurements' residual, whose scale differs per modality (CT diverges from 0.3 on).
DPS_ZETA = {"mri": 3.0, "ct": 0.03}
#: DDS's DDIM noise per modality where a recipe leaves ``eta`` null, chosen likewise (among 0, 0.15 and 0.5).
DDS_ETA = {"mri": 0.15, "ct": 0.0}

PathText = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MeasurementOptions(_Section):
    """How measurements are made from images (retrospective simulation), or how full k-space is masked.

    Attributes:
        acceleration: MRI acceleration ``R``.
        center_fraction: fully sampled centre (fastMRI's default: 0.08 at 4x, 0.04 at 8x).
        mask: ``random`` or ``equispaced`` (fastMRI column masks), ``gaussian`` or ``poisson`` (2D variable
            density; ``poisson`` is a variable-density Poisson-disc sampler, ``medidiff.recon.masks``).
        coils: 1 for single coil, or the number of simulated birdcage coils.
        known_maps: reconstruct simulated multi-coil data with the simulated maps (else: estimated ones).
        noise: complex Gaussian k-space noise, relative to the largest k-space magnitude.
        views: CT views over the arc.
        limited_angle: CT arc in degrees (``null``: 180, sparse view).
        dose: CT incident photons per detector bin (``null``: noiseless).
    """

    acceleration: float = Field(4.0, ge=1.0)
    center_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    mask: Literal["random", "equispaced", "gaussian", "poisson"] = "random"
    coils: PositiveInt = 1
    known_maps: bool = False
    noise: float = Field(0.0, ge=0.0)
    views: PositiveInt = 60
    limited_angle: float | None = Field(None, gt=0.0, le=180.0)
    dose: float | None = Field(None, gt=0.0)


class PriorOptions(_Section):
    """How the prior is applied to images of any size (``medidiff.recon.prior.AnySize``).

    Attributes:
        mode: ``whole`` (pad to the U-Net's multiple, one piece) or ``patches`` (the training patch size).
        overlap: pixels by which tiles overlap (``patches``).
        shift: move the padding or the tiling by a random offset at every evaluation.
        batch_size: tiles per network call (``patches``).
        bf16: evaluate the network under bf16 autocast where the device computes bf16 natively (CUDA, CPUs
            with AVX512-BF16/AMX): about 2x faster on such a CPU; DDS at 50 evaluations on a held-out 1 mm
            MNI152 slice (4x, single coil) gave 27.54 dB against 27.53 dB in float32.
    """

    mode: Literal["whole", "patches"] = "whole"
    overlap: int = Field(0, ge=0)
    shift: bool = True
    batch_size: PositiveInt = 32
    bf16: bool = True


class SolverOptions(_Section):
    """The diffusion solver (``medidiff.recon.solvers``) and its options.

    Attributes:
        name: ``dds`` (default), ``dps``, ``pc`` (score-MRI's predictor-corrector) or ``merge`` (Song et al.).
        steps: sampler steps (``null``: the solver's default, ``DEFAULT_STEPS``).
        t_start: start time; below 1 a warm start from the classical estimate (CCDF).
        cg_iters, rho, eta: DDS's CG iterations, Tikhonov weight and DDIM noise (``eta`` also for DPS; ``null``:
            for DDS the modality's, ``DDS_ETA``: 0.15 for MRI, 0 for CT; for DPS 1, ancestral sampling).
        noise_estimate: DDS's step: ``network`` (the network's own noise estimate, as DDS's Algorithm 1) or
            ``corrected`` (the noise estimate from the CG-corrected image).
        clip: DDS's CG starts from the network's estimate clamped to ``[-clip, clip]`` on its scale (``null``: as
            it is). The defaults, ``network`` and 1 (the priors' data range), were chosen over six seeds on the
            benchmark's validation slices of both modalities: on CT they end DDS's rare failures (the Tweedie
            estimate leaving the data range early and the state keeping its noise), 32.2 against 30.2 dB; on MRI
            28.2 against 26.5 dB.
        zeta: DPS's step size (``null``: the modality's, ``DPS_ZETA``: 3 for MRI, 0.03 for CT).
        lam: the merge's weight of the measurements (1, the hard projection: best on the benchmark's validation
            slices of both modalities, above 0.9 and 0.5).
        snr, n_corrector: the predictor-corrector's corrector.
        z_tv: DiffusionMBIR's total-variation weight along the slices (0: slices independent).
        batch_size: slices reconstructed together (all of a volume when ``z_tv > 0``).
    """

    name: Literal["dds", "dps", "pc", "merge"] = "dds"
    steps: PositiveInt | None = None
    t_start: float = Field(1.0, gt=0.0, le=1.0)
    cg_iters: PositiveInt = 5
    rho: float = Field(0.0, ge=0.0)
    eta: float | None = Field(None, ge=0.0, le=1.0)
    noise_estimate: Literal["corrected", "network"] = "network"
    clip: float | None = Field(1.0, gt=0.0)
    zeta: float | None = Field(None, ge=0.0)
    lam: float = Field(1.0, ge=0.0, le=1.0)
    snr: float = Field(0.16, gt=0.0)
    n_corrector: PositiveInt = 1
    z_tv: float = Field(0.0, ge=0.0)
    batch_size: PositiveInt = 8

    @property
    def n_steps(self) -> int:
        """The steps to run."""
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.name]

    def kwargs(self, modality: str) -> dict[str, Any]:
        """The keyword arguments of the solver function for a modality (``steps`` included)."""
        common = {"steps": self.n_steps, "t_start": self.t_start, "z_tv": self.z_tv}
        eta = {} if self.eta is None else {"eta": self.eta}
        dds_eta = {"eta": DDS_ETA[modality] if self.eta is None else self.eta}
        zeta = DPS_ZETA[modality] if self.zeta is None else self.zeta
        extra = {"dds": {"cg_iters": self.cg_iters, "rho": self.rho, "noise_estimate": self.noise_estimate,
                         "clip": self.clip, **dds_eta}, "dps": {"zeta": zeta, **eta},
                 "pc": {"snr": self.snr, "n_corrector": self.n_corrector}, "merge": {"lam": self.lam}}[self.name]
        return {**common, **extra}


class BaselineOptions(_Section):
    """The classical reconstructions written beside the diffusion one.

    Attributes:
        tv: compute the total-variation reconstruction (``<case>_tv``).
        tv_weight: its weight (``null``: the modality's documented ``baselines.TV_WEIGHT``).
        tv_iters: ADMM iterations.
    """

    tv: bool = True
    tv_weight: float | None = Field(None, ge=0.0)
    tv_iters: PositiveInt = 100


class ReconSection(TaskSection):
    """The ``recon`` section: score-based MRI and CT reconstruction (``medidiff.recon``).

    Relative paths are read from the working folder, else from the medidiff checkout.

    Attributes:
        modality: ``mri`` or ``ct``.
        model: the prior (``null``: the bundled one for the modality, ``DEFAULT_MODELS``).
        inputs: images (NIfTI, DICOM, a folder or datalist: measurements are simulated), fastMRI k-space
            (``.h5``) or a sinogram (``.npz``).
        slices: indices of the slices to reconstruct along the model's slicing axis (``null``: every slice
            with at least ``min_foreground`` foreground); the others are written as 0.
        min_foreground: least foreground share of a slice for it to be reconstructed.
        measurement, prior, solver, baselines: the stages' options.
        panel_slices: slices shown in each case's PNG panel.
        select: DICOM series selection rule.
        progress: show progress bars.
    """

    modality: Literal["mri", "ct"] = "mri"
    model: PathText | None = None
    inputs: PathText | None = None
    slices: list[int] | None = None
    min_foreground: float = Field(0.01, ge=0.0, le=1.0)
    measurement: MeasurementOptions = Field(default_factory=MeasurementOptions)
    prior: PriorOptions = Field(default_factory=PriorOptions)
    solver: SolverOptions = Field(default_factory=SolverOptions)
    baselines: BaselineOptions = Field(default_factory=BaselineOptions)
    panel_slices: PositiveInt = 1
    select: str = "all"
    progress: bool = True

    @model_validator(mode="after")
    def _slices(self) -> ReconSection:
        if self.slices is not None and any(s < 0 for s in self.slices):
            raise ValueError(f"slices must be non-negative indices, got {self.slices}")
        return self

    @property
    def model_path(self) -> str:
        """The prior's path: ``model``, or the bundled one for the modality."""
        return self.model if self.model is not None else DEFAULT_MODELS[self.modality]

    @classmethod
    def route(cls, key: str) -> str:
        """The dotted key of an option given by its own name (see ``route``)."""
        return route(key)


_STAGES = (("measurement", MeasurementOptions), ("solver", SolverOptions), ("prior", PriorOptions),
           ("baselines", BaselineOptions))
_ALIASES = {"solver": "solver.name", "prior_mode": "prior.mode"}


def route(key: str) -> str:
    """The dotted key of an option given by its own name: ``acceleration`` -> ``measurement.acceleration``.

    ``solver`` is ``solver.name``; names shared by stages (``batch_size``) resolve to the solver's.
    """
    if key in _ALIASES:
        return _ALIASES[key]
    if "." not in key and key not in ReconSection.model_fields:
        for section in ("solver", "measurement", "prior", "baselines"):
            model = dict(_STAGES)[section]
            if key in model.model_fields:
                return f"{section}.{key}"
    return key
