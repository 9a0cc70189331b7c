"""The ``segment`` recipe section: one options object for the ensemble, with the one set of defaults.

``SegmentSection`` is what a recipe's ``segment:`` holds and what ``medidiff segment`` builds from its
options; ``sampling`` (``EnsembleOptions``) goes to ``medidiff.segment.sample.sample_members`` unchanged.
Unknown keys are errors.

Defaults: 10 members of 10 DDIM steps each (100 network evaluations per slice; Wolleb et al. 2022 use
5 x 1000), fused by the mean soft map thresholded at 1/2, with the predictive entropy as the
uncertainty map (``benchmarks/bench_segment.py`` compares the settings).
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PositiveInt

from medidiff.sections import TaskSection

__all__ = ["EnsembleOptions", "SegmentSection", "route", "DEFAULT_MODEL"]

#: The bundled lesion-segmentation model (``recipes/seg_lesion_2d.yaml``).
DEFAULT_MODEL = "data/weights/seg_lesion_2d.safetensors"

PathText = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnsembleOptions(_Section):
    """How the ensemble of masks is sampled (``segment.sampling``).

    Attributes:
        members: masks sampled per image, each from its own seed.
        sampler: reverse sampler (``ddim``, ``dpm_solver_2m``, ``ddpm``...).
        steps: sampler steps per member (``ddim``: one network evaluation per step).
        eta: DDIM's noise scale (0: deterministic given the starting noise).
        batch_size: member-slices per network call (members of one image are batched together).
    """

    members: PositiveInt = 10
    sampler: str = "ddim"
    steps: PositiveInt = 10
    eta: float = Field(0.0, ge=0.0)
    batch_size: PositiveInt = 32


class SegmentSection(TaskSection):
    """The ``segment`` section: segmentation ensembles with uncertainty maps (``medidiff.segment``).

    Relative paths are read from the working folder, else from the medidiff checkout (for the bundled model).

    Attributes:
        model: weights (``.safetensors`` with its ``.json``, or a folder) of a segmentation model.
        inputs: the scans: a NIfTI file or folder, DICOM, or a JSON datalist (``image``, ``label``, ``mask``,
            ``annotations``).
        mask: a foreground mask for a single input (a datalist gives one per case).
        labels: a reference label map for a single input (enables ``metrics.json``).
        intensity: ``match`` the scans' middle foreground quantiles to the training data's (default), ``own``
            foreground percentiles, or the ``model``'s training range.
        min_foreground: least foreground share of a slice for it to be segmented (others are background).
        sampling: the ensemble (``EnsembleOptions``).
        fusion: ``mean`` (the mean soft map, thresholded or argmax) or ``staple`` (SimpleITK's STAPLE).
        threshold: foreground probability threshold of a binary segmentation.
        uncertainty: the map written as ``<case>_uncertainty.nii.gz``: ``predictive_entropy`` (total, nats),
            ``mutual_information`` (the members' disagreement), ``expected_entropy`` or ``variance``.
        per_class: entropies per class (class against the rest) rather than over all classes.
        overlay_slices: slices shown in each case's overlay PNG.
        dicom: for DICOM scans, also write the segmentation as a DICOM SEG.
        deidentify: leave the patient's name, ID, birth date, study dates and IDs out of that DICOM SEG (the
            file names, logs, reports and manifests never hold them).
        select: DICOM series selection rule.
        progress: show progress bars.
    """

    model: PathText = DEFAULT_MODEL
    inputs: PathText | None = None
    mask: PathText | None = None
    labels: PathText | None = None
    intensity: Literal["match", "own", "model"] = "match"
    min_foreground: float = Field(0.01, ge=0.0, le=1.0)
    sampling: EnsembleOptions = Field(default_factory=EnsembleOptions)
    fusion: Literal["mean", "staple"] = "mean"
    threshold: float = Field(0.5, gt=0.0, le=1.0)
    uncertainty: Literal["predictive_entropy", "mutual_information", "expected_entropy", "variance"] = (
        "predictive_entropy")
    per_class: bool = False
    overlay_slices: PositiveInt = 6
    dicom: bool = True
    deidentify: bool = False
    select: str = "all"
    progress: bool = True

    @classmethod
    def route(cls, key: str) -> str:
        """The dotted key of an option given by its own name (see ``route``)."""
        return route(key)


def route(key: str) -> str:
    """The dotted key of an option given by its own name: ``members`` -> ``sampling.members``."""
    if "." not in key and key in EnsembleOptions.model_fields:
        return f"sampling.{key}"
    return key
