"""Training data for recipes: the ``data`` section, its sources, and the train/validation split.

The engine (``medidiff.train``) takes any ``Dataset`` of dicts ``{"image": (C, *spatial) in [-1, 1],
optional "cond": (Cc, *spatial)}``. This module turns a recipe's ``data`` section into such datasets:

- ``synthetic``: smooth random blobs (ellipsoids with soft edges) in 2D or 3D at ``data.size``, seeded;
  a stand-in that needs no files;
- ``sample:brain``: the bundled MNI152 brain slices (``medidiff.data.sample``), scaled to ``[-1, 1]``;
- a path: anything ``medidiff.data.discover`` finds (DICOM series, NIfTI files, datalists), prepared
  by ``medidiff.data.transforms.preset`` (orientation, spacing, intensity to ``[-1, 1]``, pad/crop) and
  cut into slices along ``data.slice_axis`` for 2D (``medidiff.data.datasets.SliceDataset``). The
  validation cases are the datalist's own, or a seeded share of the cases;
- with ``data.labels``: image and label pairs for segmentation models (``medidiff.train_segment``): a
  labelled path (datalists, nnU-Net folders) or ``sample:lesions`` (generated lesions, several raters).

Tasks add sources with ``register_source``; ``build_data`` returns a ``DataBundle`` that also carries
the ``data_prep`` record saved beside the weights (``checked_data_prep`` validates one before training).
``BatchStream`` is what the engine draws batches from: an order fixed by ``(seed, epoch)``, split between
DDP processes, that resumes exactly from a checkpoint's position.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .data.augment import Augmented
from .errors import RecipeError, TrainingError
from .modelinfo import DataPrep
from .runtime import Dist

__all__ = [
    "DataConfig",
    "LabelsConfig",
    "DataBundle",
    "TensorDataset",
    "SOURCES",
    "register_source",
    "build_data",
    "split",
    "BatchStream",
    "checked_data_prep",
    "synthetic_images",
]


#: Percentiles mapped to -1 and 1 when MRI intensities are scaled.
MRI_PERCENTILES = (0.5, 99.5)


class AugmentConfig(BaseModel):
    """Random training augmentation (``medidiff.data.augment``): other poses, shapes, scanners and contrasts.

    The elastic, resolution, bias-field, contrast and noise augmentations are off by default (``resolution_factor``
    matters only with ``resolution``), so older recipes train and draw as before.

    Attributes:
        rotate_deg: largest rotation angle in degrees (about each axis in 3D); 0 with ``scale`` and ``translate``
            0 switches warping off.
        scale: largest relative zoom in or out.
        translate: largest shift, as a fraction of the image size.
        gamma: largest intensity gamma, ``exp(U(-gamma, gamma))`` (0: off).
        flip: probability of a left-right mirror (0: off).
        elastic: largest elastic displacement along each axis, as a fraction of the image size: a smooth random
            field through control points every quarter of the image, in the same interpolation as the affine
            warp (0: off; below 1/16 a square 2D image cannot fold, 1/24 in 3D).
        resolution: probability that an image's resolution is lowered: blurred and resampled as voxels up to
            ``resolution_factor`` times larger along each axis would record it, then interpolated back (0: off).
        resolution_factor: largest voxel-size factor per axis of a lowered resolution (drawn in ``[1, factor]``
            per axis, so thick slices are simulated too).
        bias_field: largest log-amplitude of a smooth multiplicative bias field, ``exp(b)`` with ``|b| <=
            bias_field`` over control points every half image; the background stays at -1 (0: off).
        contrast: largest log-factor of a linear intensity scaling through the background, ``exp(U(-contrast,
            contrast))`` on the ``[0, 1]`` scale (0: off).
        noise: largest standard deviation of Rician noise on the tissue (drawn in ``[0, noise]``), as a fraction
            of the intensity range (``2 * noise`` on the ``[-1, 1]`` scale); the background stays at -1 (0: off).
    """

    model_config = ConfigDict(extra="forbid")

    rotate_deg: float = Field(8.0, ge=0.0)
    scale: float = Field(0.08, ge=0.0, lt=1.0)
    translate: float = Field(0.04, ge=0.0, lt=1.0)
    gamma: float = Field(0.15, ge=0.0)
    flip: float = Field(0.0, ge=0.0, le=1.0)
    elastic: float = Field(0.0, ge=0.0, le=0.25)
    resolution: float = Field(0.0, ge=0.0, le=1.0)
    resolution_factor: float = Field(2.0, ge=1.0, le=8.0)
    bias_field: float = Field(0.0, ge=0.0, le=1.0)
    contrast: float = Field(0.0, ge=0.0, le=1.0)
    noise: float = Field(0.0, ge=0.0, le=0.5)


class LabelsConfig(BaseModel):
    """Label maps a segmentation model generates, the image its condition (``data.labels``; ``medidiff.train_segment``).

    Attributes:
        classes: class names, background first; two classes give one mask channel, more give one-hot channels.
        raters: ``sample:lesions``: annotations per case (raters outlining at different contrast levels).
        rater_levels: their lowest and highest relative contrast level.
        boundary_mm: each outline's random border wobble (standard deviation, mm).
        lesions: least and most lesions per slice.
        radius_mm: lesion radius range in mm.
        contrast: lesion contrast range (relative to the tissue; bright and dark lesions alike).
        healthy_fraction: share of the generated cases without lesions.
        variants: lesion draws per brain slice.
        brains: the healthy brains the lesions are drawn on: ``templates`` (the bundled 2 mm MNI152 brain and
            nilearn's 1 mm one) or a MONAI datalist (JSON) of 2 mm brains with masks, e.g.
            ``data/brains/datalist.json`` (the IXI subjects): its ``training`` entries (``image``, ``mask``) give
            the training slices and its ``validation`` entries the validation slices. ``data.holdout`` applies
            to the templates only.
    """

    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(default_factory=lambda: ["background", "lesion"], min_length=2)
    raters: PositiveInt = 3
    rater_levels: tuple[float, float] = (0.3, 0.7)
    boundary_mm: float = Field(0.5, ge=0.0)
    lesions: tuple[PositiveInt, PositiveInt] = (1, 3)
    radius_mm: tuple[PositiveFloat, PositiveFloat] = (2.5, 10.0)
    contrast: tuple[PositiveFloat, PositiveFloat] = (0.2, 0.6)
    healthy_fraction: float = Field(0.25, ge=0.0, le=1.0)
    variants: PositiveInt = 6
    brains: str = "templates"


class DataConfig(BaseModel):
    """The ``data`` section of a recipe.

    Attributes:
        source: ``synthetic``, ``sample:brain`` (the bundled 2 mm brain), ``sample:mni152`` and ``sample:ct``
            (patches for priors, ``medidiff.train_patches``), ``sample:lesions`` (brain slices with generated
            lesions and several raters' masks, ``medidiff.train_segment``), ``sample:lesion_classes`` (the same
            slices labelled healthy or lesion per image, for a noise-aware classifier, ``medidiff.train_classifier``)
            or a folder/file path.
        spatial_dims: 2 or 3.
        size: image size per spatial axis (multiples of ``2 ** (levels - 1)`` of the U-Net).
        channels: image channels of synthetic data.
        num_samples: number of synthetic images (training and validation together).
        val_fraction: share of the images held out for the validation loss.
        slice_axis: axis volumes are sliced along for 2D (0 sagittal, 1 coronal, 2 axial).
        num_workers: data-loader worker processes.
        modality: ``mri`` (scaled by robust percentiles) or ``ct`` (by ``hu_window``), for a path.
        hu_window: CT window in HU mapped to ``[-1, 1]``.
        spacing: voxel size in mm to resample to (``null`` keeps each input's), for a path.
        orientation: orientation code to reorient to (``null`` keeps each input's), for a path.
        select: which DICOM series to use when a folder holds several (see ``medidiff.data.discover``).
        min_foreground: least foreground share of a kept 2D slice, for a path.
        holdout: ``[start, stop)`` ranges of slice indices left out of training (``sample:brain``), e.g.
            the slab the demo cases are cut from.
        augment: random training augmentation (``null`` for none).
        labels: train a segmentation model on image and label pairs (``sample:lesions``, or a path whose
            cases have labels: datalists, nnU-Net ``imagesTr``/``labelsTr``); ``null``: images only.
    """

    model_config = ConfigDict(extra="forbid")

    source: str = "synthetic"
    spatial_dims: Literal[2, 3] = 2
    size: list[PositiveInt] = Field(default_factory=lambda: [32, 32])
    channels: PositiveInt = 1
    num_samples: PositiveInt = 64
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    slice_axis: Literal[0, 1, 2] = 2
    num_workers: int = Field(0, ge=0)
    modality: Literal["mri", "ct"] = "mri"
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    spacing: list[PositiveFloat] | None = None
    orientation: str | None = "RAS"
    select: str = "all"
    min_foreground: float = Field(0.1, ge=0.0, le=1.0)
    holdout: list[tuple[int, int]] = Field(default_factory=list)
    augment: AugmentConfig | None = None
    labels: LabelsConfig | None = None

    @model_validator(mode="after")
    def _size_matches_dims(self) -> DataConfig:
        if len(self.size) != self.spatial_dims:
            raise ValueError(f"size {self.size} has {len(self.size)} entries for spatial_dims={self.spatial_dims}")
        if self.spacing is not None and len(self.spacing) != 3:
            raise ValueError(f"spacing {self.spacing} must give the voxel size of all 3 axes of a volume")
        return self


class TensorDataset(Dataset):
    """Items ``{"image": images[i]}`` (and ``"cond": cond[i]``) from in-memory tensors.

    Args:
        images: ``(N, C, *spatial)`` in ``[-1, 1]``.
        cond: optional ``(N, Cc, *spatial)`` conditioning channels.
    """

    def __init__(self, images: torch.Tensor, cond: torch.Tensor | None = None):
        if cond is not None and len(cond) != len(images):
            raise ValueError(f"{len(cond)} conditioning items for {len(images)} images")
        self.images, self.cond = images, cond

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.images[i]}
        if self.cond is not None:
            item["cond"] = self.cond[i]
        return item


@dataclass
class DataBundle:
    """What a data source yields.

    Attributes:
        train: the training dataset.
        val: the held-out dataset (``None`` without validation).
        channels: image channels ``C``.
        cond_channels: conditioning channels ``Cc`` (0 for none).
        data_prep: how the images were prepared (saved in ``model.json``).
        inputs: input files, for the manifest's checksums.
    """

    train: Dataset
    val: Dataset | None
    channels: int
    cond_channels: int = 0
    data_prep: dict[str, Any] = field(default_factory=dict)
    inputs: list[Path] = field(default_factory=list)


class BatchStream:
    """Endless batches in an order fixed by ``(seed, epoch)``; ``position`` counts batches into the epoch.

    Each process of a DDP run draws its own share (``DistributedSampler``, incomplete batches dropped);
    a stream built with a checkpoint's ``epoch`` and ``position`` continues exactly where it stopped.

    Raises:
        TrainingError: the dataset is too small for one batch per process.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, dist_: Dist, num_workers: int = 0,
                 epoch: int = 0, position: int = 0):
        self.sampler = DistributedSampler(dataset, num_replicas=dist_.world_size, rank=dist_.rank, shuffle=True,
                                          seed=seed, drop_last=True)
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise TrainingError(
                f"{len(dataset)} training images are too few for batches of {batch_size} on {dist_.world_size} "
                "process(es)", where="training.batch_size", fix="lower training.batch_size or add data.")
        self.epoch, self.position, self._it = epoch, position, None

    def _start(self) -> None:
        self.sampler.set_epoch(self.epoch)
        order = list(self.sampler)
        chunks = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.position, self.per_epoch)]
        self._it = iter(DataLoader(self.dataset, batch_sampler=chunks, num_workers=self.num_workers))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.per_epoch:
            self.epoch, self.position, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._start()
        self.position += 1
        return next(self._it)


def checked_data_prep(data_prep: dict | None) -> dict:
    """The ``data_prep`` record, validated before training starts (not when the weights are first saved).

    Raises:
        TrainingError: the record does not fit ``medidiff.modelinfo.DataPrep``.
    """
    try:
        return DataPrep.model_validate(dict(data_prep or {"source": "unknown"})).model_dump(mode="json",
                                                                                           exclude_none=True)
    except ValidationError as e:
        raise TrainingError(f"the data source's data_prep record is invalid: {e.errors()[0]['msg']}",
                            fix="see medidiff.modelinfo.DataPrep") from None


def split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded random split into training and validation subsets (at least one validation item if asked).

    Args:
        dataset: the full dataset.
        val_fraction: share held out, in ``[0, 1)``.
        seed: the split's seed.

    Returns:
        ``(train, val)``; ``val`` is ``None`` when ``val_fraction`` is 0.
    """
    n = len(dataset)
    n_val = 0 if val_fraction <= 0 else max(1, round(n * val_fraction))
    if n_val == 0:
        return dataset, None
    if n - n_val < 1:
        raise RecipeError(f"{n} images leave none for training after holding out {n_val}",
                          where="data.val_fraction", fix="lower data.val_fraction or add data.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[n_val:])), Subset(dataset, sorted(order[:n_val]))


def synthetic_images(n: int, size: list[int], channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random blob images in ``[-1, 1]``: 2-5 soft-edged ellipsoids on a dark background.

    Args:
        n: number of images.
        size: spatial size (2 or 3 entries).
        channels: channels (each a different mix of the same blobs).
        seed: the seed; the same seed gives the same images.

    Returns:
        A float32 tensor ``(n, channels, *size)``.
    """
    g = torch.Generator().manual_seed(seed)
    d = len(size)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    grid = torch.stack(axes)  # (d, *size)
    out = torch.zeros((n, channels, *size))
    for k in range(n):
        for _ in range(int(torch.randint(2, 6, (1,), generator=g))):
            centre = (torch.rand(d, generator=g) - 0.5) * 1.2
            radii = 0.15 + 0.35 * torch.rand(d, generator=g)
            weights = 0.3 + 0.7 * torch.rand(channels, generator=g)
            r2 = (((grid - centre.reshape(d, *[1] * d)) / radii.reshape(d, *[1] * d)) ** 2).sum(0)
            blob = torch.sigmoid((1 - r2) * 8)  # soft edge
            out[k] += weights.reshape(channels, *[1] * d) * blob
    return (out.clamp(0, 1) * 2 - 1).float()


def _synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    images = synthetic_images(cfg.num_samples, cfg.size, cfg.channels, seed)
    train, val = split(TensorDataset(images), cfg.val_fraction, seed)
    prep = {"source": "synthetic", "size": list(cfg.size), "slicing_axis": 2 if cfg.spatial_dims == 2 else None,
            "intensity": {"method": "fixed", "range": [-1.0, 1.0]}}
    return DataBundle(train, val, cfg.channels, data_prep=prep)


def _brain(cfg: DataConfig, seed: int) -> DataBundle:
    if cfg.spatial_dims != 2:
        raise RecipeError("sample:brain gives 2D slices of one volume", where="data.spatial_dims",
                          fix="set data.spatial_dims: 2 (and a 2-entry data.size).")
    from .data import sample
    from .data.transforms import MATCH_LEVELS, foreground_quantiles, foreground_range, scale_to_unit

    held = {i for start, stop in cfg.holdout for i in range(start, stop)}
    indices = [i for i in sample.brain_slice_indices(cfg.slice_axis) if i not in held]
    volume, brain = sample.brain_volume().as_tensor()[0].float(), sample.brain_mask().as_tensor()[0] > 0
    scaling = foreground_range(volume, brain, MRI_PERCENTILES)
    images, _ = sample.brain_slices(axis=cfg.slice_axis, size=cfg.size, indices=indices)
    images = scale_to_unit(images, scaling)
    chosen = torch.tensor(indices)  # the reference quantiles: the training slices' brain voxels
    reference = foreground_quantiles([scale_to_unit(volume, scaling).index_select(cfg.slice_axis, chosen)],
                                     [brain.index_select(cfg.slice_axis, chosen)])
    train, val = split(TensorDataset(images), cfg.val_fraction, seed)
    if cfg.augment is not None:
        train = Augmented(train, **cfg.augment.model_dump())
    folder = sample.data_dir()
    prep = {
        "source": "sample:brain",
        "modality": "MR T1",
        "orientation": "RAS",
        "spacing_mm": [2.0, 2.0],
        "slicing_axis": cfg.slice_axis,
        "size": list(cfg.size),
        "intensity": {"method": "percentile", "percentiles": list(MRI_PERCENTILES), "of": "foreground",
                      "low": scaling["a_min"], "high": scaling["a_max"], "range": [-1.0, 1.0],
                      "reference": reference, "reference_levels": list(MATCH_LEVELS)},
        "holdout": [list(r) for r in cfg.holdout],
        "slices": indices,
    }
    return DataBundle(train, val, 1, data_prep=prep, inputs=[folder / sample.BRAIN_FILES["t1"]])


def _split_cases(sources: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Training and validation cases: the datalist's own split when it has one, else a seeded split by case."""
    usable = [s for s in sources if s.split != "test"]
    if any(s.split == "validation" for s in usable):
        return [s for s in usable if s.split != "validation"], [s for s in usable if s.split == "validation"]
    if len(usable) < 2 or val_fraction <= 0:
        return usable, []
    train, val = split(usable, val_fraction, seed)
    return list(train), list(val)


def _path(cfg: DataConfig, seed: int) -> DataBundle:
    path = Path(cfg.source).expanduser()
    if not path.exists():
        known = difflib.get_close_matches(cfg.source, list(SOURCES), n=1)
        hint = f" Did you mean '{known[0]}'?" if known else ""
        raise RecipeError(f"data source {cfg.source!r} is neither a known source nor an existing path.{hint}",
                          where="data.source", fix=f"use one of {sorted(SOURCES)} or a folder of DICOM/NIfTI files.")
    from .data.datasets import SliceDataset
    from .data.discover import discover, load
    from .data.transforms import MATCH_LEVELS, foreground_quantiles, preset

    sources = discover(path, select=cfg.select)
    if cfg.spatial_dims == 2:  # scale whole volumes, crop in plane, keep every slice along the axis
        grid = list(cfg.size)
        grid.insert(cfg.slice_axis, -1)
    else:
        grid = list(cfg.size)
    prepare = preset(cfg.modality, spatial_size=grid, pixdim=cfg.spacing, axcodes=cfg.orientation,
                     hu_window=cfg.hu_window, percentiles=MRI_PERCENTILES, load=False)

    reference: list[float] = []

    def dataset(cases: list, *, train: bool = False) -> Dataset | None:
        if not cases:
            return None
        items = [prepare({"image": load(case)}) for case in cases]
        images = [item["image"].as_tensor() if hasattr(item["image"], "as_tensor") else item["image"] for item in items]
        masks = [item["foreground"] for item in items]
        if train and cfg.modality != "ct":  # what detection matches new scans' intensities to
            fg = [torch.as_tensor(m).reshape(im.shape[1:]) > 0.5 for m, im in zip(masks, images)]
            reference.extend(foreground_quantiles([im.float().mean(0) for im in images], fg))
        if cfg.spatial_dims == 3:
            return TensorDataset(torch.stack(images).float())
        return SliceDataset(images, masks=masks, axis=cfg.slice_axis, min_foreground=cfg.min_foreground)

    train_cases, val_cases = _split_cases(sources, cfg.val_fraction, seed)
    train, val = dataset(train_cases, train=True), dataset(val_cases)
    if val is None and cfg.val_fraction > 0:  # a single case: hold out some of its slices
        train, val = split(train, cfg.val_fraction, seed)
    if train is None or len(train) == 0:
        raise RecipeError("no training images found", where=path,
                          fix="check the folder (medidiff inspect PATH) and data.min_foreground.")
    channels = int(train[0]["image"].shape[0])
    prep = {
        "source": "path",
        "cases": len(train_cases) + len(val_cases),
        "modality": cfg.modality,
        "orientation": cfg.orientation,
        "spacing_mm": cfg.spacing,
        "size": list(cfg.size),
        "slicing_axis": cfg.slice_axis if cfg.spatial_dims == 2 else None,
        "intensity": ({"method": "hu_window", "window": list(cfg.hu_window)} if cfg.modality == "ct"
                      else {"method": "percentile", "percentiles": list(MRI_PERCENTILES)})
        | {"range": [-1.0, 1.0]}
        | ({"reference": reference, "reference_levels": list(MATCH_LEVELS)} if reference else {}),
    }
    inputs = [Path(p) for case in train_cases + val_cases for p in case.paths if Path(p).is_file()]
    return DataBundle(train, val, channels, data_prep=prep, inputs=inputs)


def _lazy(module: str, name: str) -> Callable[[DataConfig, int], DataBundle]:
    """A source defined in another module (``train_patches``: patch priors; ``train_segment``: image and label
    pairs), imported when used."""

    def build(cfg: DataConfig, seed: int) -> DataBundle:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(cfg, seed)

    return build


#: Named data sources; anything else is taken as a path.
SOURCES: dict[str, Callable[[DataConfig, int], DataBundle]] = {
    "synthetic": _synthetic, "sample:brain": _brain, "sample:mni152": _lazy("train_patches", "mni152"),
    "sample:ct": _lazy("train_patches", "ct"),
    "sample:lesions": _lazy("train_segment", "lesions"),
    "sample:lesion_classes": _lazy("train_classifier", "lesion_classes")}
#: Named sources that give image and label pairs (``data.labels``).
LABELLED_SOURCES = {"sample:lesions", "sample:lesion_classes"}


def register_source(name: str, build: Callable[[DataConfig, int], DataBundle]) -> None:
    """Make ``data.source: name`` build its data with ``build(data_config, seed) -> DataBundle``."""
    SOURCES[name] = build


def build_data(cfg: DataConfig, seed: int) -> DataBundle:
    """The datasets a ``data`` section describes.

    Args:
        cfg: the ``data`` section.
        seed: the run's seed (synthetic images and the split depend on it).

    Returns:
        The training and validation datasets with their channels and ``data_prep`` record.
    """
    if cfg.source in SOURCES:
        if cfg.labels is not None and cfg.source not in LABELLED_SOURCES:
            raise RecipeError(f"data source {cfg.source!r} has no labels", where="data.labels",
                              fix=f"remove data.labels, or use {sorted(LABELLED_SOURCES)} or a labelled dataset.")
        return SOURCES[cfg.source](cfg, seed)
    return (_lazy("train_segment", "paired") if cfg.labels is not None else _path)(cfg, seed)
