"""The ``anomaly`` recipe section: one options object per stage, with the one set of defaults.

``AnomalySection`` is what a recipe's ``anomaly:`` holds and what ``medidiff detect`` builds from its
options; ``reconstruction`` (``HealthyOptions``) goes to ``medidiff.anomaly.healthy.reconstruct_healthy``
and ``map`` (``MapOptions``) to ``medidiff.anomaly.maps.anomaly_map`` unchanged. Unknown keys are errors.

The defaults (one denoising step from ``t_L = 0.5``, median of 24 noise seeds: 24 network evaluations
per slice) are those of ``recipes/demo.yaml``, chosen with ``benchmarks/bench_anomaly.py``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt, model_validator

from medidiff.sections import TaskSection

__all__ = ["HealthyOptions", "MapOptions", "AnomalySection", "route"]


#: The options of ``HealthyOptions`` that only method ``guided`` uses.
GUIDANCE_OPTIONS = {"classifier", "guidance_scale", "target_class"}
#: The options of ``HealthyOptions`` that only method ``counterfactual`` uses.
COUNTERFACTUAL_OPTIONS = {"guidance_weight", "healthy_class"}
#: The options of ``HealthyOptions`` that only method ``latent`` uses.
LATENT_OPTIONS = {"autoencoder", "latent_thresholds", "latent_quantile"}
#: The options only one method uses, by method: they shape the map only with it.
METHOD_OPTIONS = {"guided": GUIDANCE_OPTIONS, "counterfactual": COUNTERFACTUAL_OPTIONS, "latent": LATENT_OPTIONS}
#: The methods that reconstruct by DDIM inversion then DDIM decoding (deterministic: one sample).
INVERTING_METHODS = ("invert", "guided", "counterfactual")

#: A path given as text or as a ``Path``.
PathText = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthyOptions(_Section):
    """How the healthy reconstruction is made (``anomaly.reconstruction``).

    Attributes:
        method: ``partial`` (AnoDDPM), ``invert`` (DDIM inversion), ``patch`` (pDDPM), ``guided`` (DDIM
            inversion, then a DDIM decoding steered toward ``target_class`` by a noise-aware classifier: Wolleb
            et al. 2022) or ``counterfactual`` (a class-conditional model's DDIM inversion with the null class, then
            its DDIM decoding toward ``healthy_class`` by classifier-free guidance: Sanchez et al. 2022) or ``latent``
            (a denoiser of a VQ-VAE's latents finds the anomalous latents from its predictions from ``t_L`` and
            re-denoises only those, the others kept: Pinaya et al. 2022; ``medidiff.anomaly.latent``).
        t_levels: noise levels ``t_L`` in ``(0, 1]`` reconstructed from and averaged.
        sampler: reverse sampler (``ddim``, ``dpm_solver_2m``, ``ddpm``...; ``latent``: ``ddim`` or ``ddpm``).
        steps: sampler steps from each level (``null``: the whole DDPM chain, as AnoDDPM).
        noise: the noise, ``gaussian`` or ``simplex``: of the forward noising and of every reverse step of a
            stochastic sampler (``ddpm``, ``ddim`` with ``eta``, ``euler_maruyama``), as AnoDDPM samples a model
            trained on simplex noise.
        noise_options: options of the noise (simplex ``octaves``, ``frequency``...); empty: the options the model was
            trained with, when it was trained on this kind of noise.
        n_samples: reconstructions per level from other noise seeds, reduced by ``reduce``.
        reduce: ``median`` or ``mean`` over the samples.
        spread: ``std`` or ``mad`` between the samples.
        patch_size, patch_margin: tiles and their noised context (``patch``).
        batch_size: images (times samples and tiles) per network call (``counterfactual``'s guided steps evaluate
            each image twice in one call: the healthy and the null class).
        bf16: evaluate the network under bf16 autocast where the device computes bf16 natively (CUDA, CPUs
            with AVX512-BF16/AMX; ``medidiff.core.precision``): ~2.5x faster on such a CPU.
        classifier: ``guided``: the noise-aware classifier's weights (trained with ``training.objective:
            classification``, e.g. ``recipes/classifier_lesion_2d.yaml``), on the model's process and grid.
        guidance_scale: ``guided``: the classifier gradient's scale ``s`` (0: plain DDIM inversion; Wolleb et
            al. used 100 on BRATS, not tuned here).
        target_class: ``guided``: the class steered toward (0: healthy).
        guidance_weight: ``counterfactual``: the classifier-free guidance weight ``w`` of the decoding,
            ``eps_null + w (eps_healthy - eps_null)`` (0: plain inversion with the null class; 1: the healthy
            class's own model). 3.0 is the authors' released BRATS setting (``norm_cond_scale``); not tuned here:
            choose it on validation cases.
        healthy_class: ``counterfactual``: the class decoded toward (0: healthy, as ``sample:lesion_classes``
            labels it) by a class-conditional model (``model.class_conditional``, e.g.
            ``recipes/counterfactual_lesion_2d.yaml``), whose null class is its last one.
        autoencoder: ``latent``: the VQ-VAE's weights (default: the path the latent model's ``model.json`` records,
            also looked up beside the model by its last name); it must be the one the model was trained on (its
            SHA-256 is checked).
        latent_thresholds: ``latent``: the per-latent-position threshold map calibrated on healthy scans (a
            ``latent_thresholds.safetensors`` that ``medidiff detect`` writes when given ``calibration`` scans and no
            map). Without one, each scan's latents above its own ``latent_quantile`` are re-denoised (a per-scan rule
            that always re-denoises that share of every scan: calibrate a map for real use).
        latent_quantile: ``latent``: the quantile of the healthy latent scores that is the threshold: per latent
            position over the calibration images, or over a scan's own latents without a map.
    """

    method: Literal["partial", "invert", "patch", "guided", "counterfactual", "latent"] = "partial"
    t_levels: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    sampler: str = "ddim"
    steps: PositiveInt | None = 1
    noise: Literal["gaussian", "simplex"] = "gaussian"
    noise_options: dict[str, Any] = Field(default_factory=dict)
    n_samples: PositiveInt = 24
    reduce: Literal["median", "mean"] = "median"
    spread: Literal["std", "mad"] = "std"
    patch_size: list[PositiveInt] | None = None
    patch_margin: int = Field(8, ge=0)
    batch_size: PositiveInt = 16
    bf16: bool = True
    classifier: PathText | None = None
    guidance_scale: float = Field(100.0, ge=0.0)
    target_class: int = Field(0, ge=0)
    guidance_weight: float = Field(3.0, ge=0.0)
    healthy_class: int = Field(0, ge=0)
    autoencoder: PathText | None = None
    latent_thresholds: PathText | None = None
    latent_quantile: float = Field(0.95, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _levels(self) -> HealthyOptions:
        bad = [t for t in self.t_levels if not 0 < t <= 1]
        if bad:
            raise ValueError(f"t_levels must lie in (0, 1], not {bad}")
        if self.method == "guided" and self.classifier is None:
            raise ValueError("method guided needs a classifier: set classifier to a noise-aware classifier's weights")
        return self

    @property
    def samples(self) -> int:
        """Reconstructions per level actually made (DDIM inversion, guided or not, is deterministic: one)."""
        return 1 if self.method in INVERTING_METHODS else self.n_samples


class MapOptions(_Section):
    """How the anomaly map is made from the scan and its healthy reconstruction (``anomaly.map``).

    Attributes:
        residual: ``abs`` or ``squared``.
        spread_floor: weight each voxel's residual by ``f / (f + spread)``, the spread between the
            reconstructions (less where the model is unsure of the healthy anatomy); ``null`` or 0: off.
        median_size: median filter window (0 or 1: none).
        smooth_sigma: Gaussian smoothing in voxels (0: none).
        erode: voxels eroded from the foreground mask's rim.
        scan_quantile: divide each scan's map by this quantile of its own values over its brain
            (``maps.per_scan``): the map then counts in multiples of the scan's typical residual and one
            threshold flags about the same share of every healthy scan, whatever its contrast, noise or subject;
            ``null``: off (the map stays a residual in intensity units). 0.9 (the default): of 0.5, 0.75, 0.9,
            0.95 and 0.98, the one whose threshold transferred best between the IXI validation brains (calibrated
            on two, the third's false-positive rate within 0.12 points of a nominal 5 %, against 2.1 without the
            scale); on the test brains every subject's rate lies within 0.33 points of 5 % (2.4 points off without;
            benchmarks/results/anomaly_subjects.md).
    """

    residual: Literal["abs", "squared"] = "abs"
    spread_floor: float | None = Field(0.2, ge=0.0)
    median_size: int = Field(5, ge=0)
    smooth_sigma: float = Field(1.0, ge=0.0)
    erode: int = Field(2, ge=0)
    scan_quantile: float | None = Field(0.9, gt=0.0, lt=1.0)


class AnomalySection(TaskSection):
    """The ``anomaly`` section: anomaly detection by healthy reconstruction (``medidiff.anomaly``).

    Relative paths are read from the working folder, else from the medidiff checkout (for the demo).

    Attributes:
        model: weights (``.safetensors`` with its ``.json``, or a folder with ``model.safetensors``).
        inputs: the scans: a NIfTI file or folder, DICOM, or a JSON datalist of ``image``/``label``/``mask``.
        calibration: healthy scans (same forms) on which the threshold is calibrated.
        threshold: a fixed threshold (a number, as ``thresholds.json`` records it, or a ``thresholds.json``);
            overrides ``calibration``. With ``map.scan_quantile`` (the default) it is in the heatmaps' own units,
            the same number for every scan; without, on the model's ``[-1, 1]`` intensity scale, and each case's
            heatmap is in its scan's units, where the threshold is the case's ``threshold_scan_units`` in
            ``scores.csv`` and its heatmap's ``cal_min``.
        fpr: voxel false-positive rate the threshold is calibrated for (without calibration scans: the threshold
            saved with the model for that rate). 1 % by default: the lesions of a brain often fill well under 1 % of
            it, and at 5 % the false positives outnumber them twenty to one.
        mask: a brain/foreground mask for a single input (a datalist gives one per case).
        labels: a ground-truth lesion mask for a single input (a datalist gives one per case).
        intensity: ``match`` the scans' middle foreground quantiles to the training data's (default), scale
            by their ``own`` foreground percentiles, or by the ``model``'s training range (same scanner only).
        min_foreground: least foreground share of a slice for it to be processed (others are skipped).
        reconstruction: the healthy reconstruction (``HealthyOptions``).
        map: the anomaly map (``MapOptions``).
        top_k: share of the highest voxels averaged into the case score.
        overlay_slices: slices shown in each case's overlay PNG.
        dicom: for DICOM scans, also write the heatmap as a DICOM Parametric Map and the anomaly mask as a
            DICOM SEG, in the scan's study and frame of reference.
        deidentify: leave the patient's name, ID, birth date, study dates and IDs out of those DICOM files
            (the file names, logs, reports and manifests never hold them).
        select: DICOM series selection rule.
        progress: show progress bars.
    """

    model: PathText = "data/weights/healthy_brain_2d.safetensors"
    inputs: PathText | None = None
    calibration: PathText | None = None
    threshold: float | PathText | None = None
    fpr: float = Field(0.01, gt=0.0, lt=1.0)
    mask: PathText | None = None
    labels: PathText | None = None
    intensity: Literal["match", "own", "model"] = "match"
    min_foreground: float = Field(0.01, ge=0.0, le=1.0)
    reconstruction: HealthyOptions = Field(default_factory=HealthyOptions)
    map: MapOptions = Field(default_factory=MapOptions)
    top_k: float = Field(0.01, gt=0.0, le=1.0)
    overlay_slices: PositiveInt = 6
    dicom: bool = True
    deidentify: bool = False
    select: str = "all"
    progress: bool = True

    def map_settings(self) -> dict[str, Any]:
        """Every option that shapes the map, as saved with a threshold: one calibrated with other settings
        is not reused (seed, batch size and bf16 autocast do not shape it: see HealthyOptions.bf16; a method's own
        options, ``METHOD_OPTIONS``, shape it only with that method)."""
        unused = {"batch_size", "bf16"}.union(*(keys for method, keys in METHOD_OPTIONS.items()
                                                if method != self.reconstruction.method))
        recon = self.reconstruction.model_dump(mode="json", exclude=unused)
        per_scan = {"scan_quantile"} if self.map.scan_quantile is None else set()  # off: as before the option
        return {"reconstruction": recon, "map": self.map.model_dump(mode="json", exclude=per_scan),
                "intensity": self.intensity,
                "min_foreground": self.min_foreground}

    @classmethod
    def route(cls, key: str) -> str:
        """The dotted key of an option given by its own name (see ``route``)."""
        return route(key)


def route(key: str) -> str:
    """The dotted key of an option given by its own name: ``t_levels`` -> ``reconstruction.t_levels``."""
    if "." not in key:
        for section, model in (("reconstruction", HealthyOptions), ("map", MapOptions)):
            if key in model.model_fields:
                return f"{section}.{key}"
    return key
