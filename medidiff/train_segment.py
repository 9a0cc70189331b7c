"""Training pairs for segmentation models: the label map is what the model generates, the image its condition.

A conditional diffusion model of masks (Wolleb et al. 2022, MIDL, sec. 3: the image concatenated to the
noisy mask) and the deterministic baseline learn from the same items ``{"image": mask, "cond": image}``:
the mask on the model's ``[-1, 1]`` scale (one channel, foreground 1 and background -1, for two classes;
one-hot channels for more) and the image scaled as every MRI is (``[-1, 1]`` by robust percentiles,
unclipped above, the background clamped at -1: ``COND_FLOOR``). Two sources (``data.labels`` set):

- a path: every case ``medidiff.data.discover`` finds with a label (datalists' ``label``, nnU-Net
  ``imagesTr/`` + ``labelsTr/``), prepared by ``medidiff.data.transforms.preset`` like image-only data
  (labels resampled by nearest neighbour) and cut into slices along ``data.slice_axis`` for a 2D model;
- ``sample:lesions``: axial slices of the bundled 2 mm MNI152 brain and of nilearn's 1 mm MNI152
  (averaged to 2 mm), each drawn ``labels.variants`` times with 1-3 bright or dark lesions outlined by
  ``labels.raters`` raters at different contrast levels (``medidiff.data.raters``; one item per rater, so
  the model learns the raters' spread), or without lesions (``labels.healthy_fraction``: an empty mask,
  so healthy brains stay empty). Axial slabs in ``data.holdout`` (indices of the 2 mm brain, the same
  millimetres of the 1 mm one) are left out of training for evaluation.

``PairedAugmented`` mirrors and warps (affine and elastic) image and mask together, the mask re-binarised, and
changes only the image's resolution, bias field, gamma, contrast and noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .data.augment import Augmented
from .errors import DataError, RecipeError
from .train_data import MRI_PERCENTILES, DataBundle, DataConfig, TensorDataset, _split_cases

__all__ = ["lesions", "paired", "mask_channels", "conditioning", "COND_FLOOR", "PairedAugmented", "lesion_slices",
           "brain_volumes"]

#: The conditioning image is clamped below at this value (a scan's background lies anywhere below the brain).
COND_FLOOR = -1.0


def conditioning(image: torch.Tensor) -> torch.Tensor:
    """The network-scale image as a segmentation model's condition: clamped below at ``COND_FLOOR``."""
    return image.clamp_min(COND_FLOOR)


def mask_channels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps ``(N, 1, *spatial)`` as mask channels in ``[-1, 1]`` (one for 2 classes, else one-hot).

    Raises:
        DataError: a label outside ``[0, num_classes)``.
    """
    y = labels.round().long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels range over [{int(y.min())}, {int(y.max())}] for {num_classes} classes",
                        fix="list every class in data.labels.classes (background first).")
    onehot = (y == 1) if num_classes == 2 else torch.cat([y == k for k in range(num_classes)], dim=1)
    return onehot.float() * 2.0 - 1.0


class PairedAugmented(Augmented):
    """Pairs warped together by one random affine and elastic warp (mask channels re-binarised); the image alone
    gets the intensity changes (a scanner changes how the anatomy looks, not where the lesion is).

    Draws come from torch's global generator, as ``medidiff.data.augment.Augmented``'s (exact resume).
    """

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        mask, image = item["image"], item["cond"]
        if self.flip and float(torch.rand(())) < self.flip:
            mask, image = mask.flip(1), image.flip(1)
        if self.warps:
            both = self.geometry(torch.cat([mask, image]))
            mask, image = _binarised(both[:mask.shape[0]]), both[mask.shape[0]:]
        item["image"], item["cond"] = mask, self.intensity(image)
        return item


def _binarised(mask: torch.Tensor) -> torch.Tensor:
    """Interpolated mask channels back to -1 and 1: one channel thresholded at 0, one-hot channels by argmax."""
    if mask.shape[0] == 1:
        return torch.where(mask > 0, 1.0, -1.0)
    return torch.nn.functional.one_hot(mask.argmax(0), mask.shape[0]).movedim(-1, 0).float() * 2 - 1


def _bundle(train: Dataset, val: Dataset | None, cfg: DataConfig, channels: int, cond_channels: int,
            prep: dict, inputs: list[Path]) -> DataBundle:
    if cfg.augment is not None:
        train = PairedAugmented(train, **cfg.augment.model_dump())
    prep["labels"] = {"classes": list(cfg.labels.classes), "one_hot": len(cfg.labels.classes) > 2}
    return DataBundle(train, val, channels, cond_channels=cond_channels, data_prep=prep, inputs=inputs)


# ----------------------------------------------------------------------------------------- a labelled path


def paired(cfg: DataConfig, seed: int) -> DataBundle:
    """Image and label pairs of every labelled case at the path ``data.source``."""
    from .data.discover import discover, load, load_companion
    from .data.transforms import MATCH_LEVELS, foreground_quantiles, preset

    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise RecipeError(f"data source {cfg.source!r} is neither a known source nor an existing path",
                          where="data.source", fix="give a labelled dataset (a datalist, an nnU-Net folder) or "
                                                   "sample:lesions.")
    sources = [s for s in discover(path, select=cfg.select) if s.label is not None]
    if not sources:
        raise RecipeError("no case at the path has a label", where=path,
                          fix="pair images with labels (datalist 'label' entries, or nnU-Net imagesTr/ + labelsTr/).")
    n_classes = len(cfg.labels.classes)
    grid = list(cfg.size)
    if cfg.spatial_dims == 2:
        grid.insert(cfg.slice_axis, -1)
    prepare = preset(cfg.modality, spatial_size=grid, pixdim=cfg.spacing, axcodes=cfg.orientation,
                     hu_window=cfg.hu_window, percentiles=MRI_PERCENTILES, label_key="label", load=False)
    reference: list[float] = []

    def dataset(cases: list, *, train: bool = False) -> Dataset | None:
        images, masks = [], []
        for case in cases:
            item = prepare({"image": load(case), "label": load_companion(case, case.label, "label")})
            image, label = (torch.as_tensor(item[k]).float() for k in ("image", "label"))
            fg = torch.as_tensor(item["foreground"]).reshape(image.shape[1:]) > 0.5
            if train and cfg.modality != "ct":
                reference.append((image.mean(0), fg))
            if cfg.spatial_dims == 3:
                images.append(image[None])
                masks.append(label[None])
                continue
            keep = fg.movedim(cfg.slice_axis, 0).flatten(1).float().mean(1) >= cfg.min_foreground
            images.append(image.movedim(1 + cfg.slice_axis, 0)[keep])
            masks.append(label.movedim(1 + cfg.slice_axis, 0)[keep])
        if not images or not sum(len(i) for i in images):
            return None
        return TensorDataset(mask_channels(torch.cat(masks), n_classes), conditioning(torch.cat(images)))

    train_cases, val_cases = _split_cases(sources, cfg.val_fraction, seed)
    train, val = dataset(train_cases, train=True), dataset(val_cases)
    if train is None:
        raise RecipeError("no training slices found", where=path, fix="check the cases and data.min_foreground.")
    if reference:
        reference_q = foreground_quantiles([v for v, _ in reference], [m for _, m in reference])
    prep = {"source": "path", "cases": len(train_cases) + len(val_cases), "modality": cfg.modality,
            "orientation": cfg.orientation, "spacing_mm": cfg.spacing, "size": list(cfg.size),
            "slicing_axis": cfg.slice_axis if cfg.spatial_dims == 2 else None,
            "intensity": ({"method": "hu_window", "window": list(cfg.hu_window)} if cfg.modality == "ct" else
                          {"method": "percentile", "percentiles": list(MRI_PERCENTILES)}
                          | ({"reference": reference_q, "reference_levels": list(MATCH_LEVELS)} if reference else {}))}
    inputs = [Path(p) for case in train_cases + val_cases for p in [*case.paths, case.label] if Path(p).is_file()]
    return _bundle(train, val, cfg, int(train[0]["image"].shape[0]), int(train[0]["cond"].shape[0]), prep, inputs)


# ----------------------------------------------------------------------------------------- generated lesions

#: World z (mm) of the bundled 2 mm brain's axial slice 0 and of nilearn's 1 mm template's (both MNI152).
_Z0_2MM, _Z0_1MM = -72.0, -72.0


def brain_volumes(with_1mm: bool = True) -> list[dict]:
    """The brains ``sample:lesions`` uses, at 2 mm: ``{"name", "t1" (X, Y, Z), "brain" (bool), "z" (mm per slice)}``.

    The 1 mm template (nilearn, when installed) is averaged over 2 x 2 x 2 blocks; without nilearn only the
    bundled brain is used.
    """
    from .data import packaged, sample

    out = [{"name": "mni152_2mm", "t1": sample.brain_volume().as_tensor()[0].float(),
            "brain": sample.brain_mask().as_tensor()[0] > 0}]
    out[0]["z"] = _Z0_2MM + 2.0 * torch.arange(out[0]["t1"].shape[2]).double()
    if with_1mm:
        try:
            t1, brain = packaged.mni152_1mm()
        except DataError:
            return out
        pool = torch.nn.functional.avg_pool3d
        t1_2 = pool(t1[None, None].float(), 2)[0, 0]
        brain_2 = pool(brain[None, None].float(), 2)[0, 0] > 0.5
        out.append({"name": "mni152_1mm", "t1": t1_2 * brain_2, "brain": brain_2,
                    "z": _Z0_1MM + 0.5 + 2.0 * torch.arange(t1_2.shape[2]).double()})
    return out


def datalist_brains(path: str | Path, split: str) -> list[dict]:
    """The 2 mm brains of a MONAI datalist's ``split`` (``training``, ``validation``), as ``brain_volumes`` gives them.

    The datalist is read as every input is (``medidiff.cases.find_cases`` and ``load_case``: each entry's
    ``image`` and ``mask``, relative to the datalist's folder, the mask checked to lie on the image's grid); the
    brains are reoriented to RAS; ``z`` is ``nan`` (``data.holdout``'s template slices do not apply).

    Raises:
        RecipeError: the datalist is missing or unreadable, lists no training brains, an entry has no mask, or a
            brain is not at 2 mm.
    """
    return _split_brains(_datalist_sources(path), path, split)


def _datalist_sources(path: str | Path) -> list:
    """The sources of a datalist of brains (nothing read yet)."""
    from .cases import find_cases

    try:
        return find_cases(path, where="data.labels.brains")
    except DataError as err:
        raise RecipeError(f"cannot read the datalist {path}: {err}", where="data.labels.brains",
                          fix="give a MONAI datalist JSON with 'training' entries of 'image' and 'mask', or "
                              "'templates'.") from err


def _split_brains(sources: list, path: str | Path, split: str) -> list[dict]:
    """The brains of one split of a datalist's sources (``datalist_brains``)."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    from .cases import load_case, plain

    where = "data.labels.brains"
    chosen = [s for s in sources if s.split == split]
    if split == "training" and not chosen:
        raise RecipeError(f"{path} lists no training brains", where=where,
                          fix="add 'training' entries with 'image' and 'mask' to the datalist.")
    out = []
    for source in chosen:
        name = Path(source.paths[0]).name
        if source.mask is None:
            raise RecipeError(f"the entry of {path} for {name} lacks 'image' or 'mask'", where=where,
                              fix="give every brain its T1 ('image') and brain mask ('mask').")
        case = load_case(source)  # the image and its mask on one grid, reoriented together
        both = Orientation("RAS", labels=None)(MetaTensor(torch.cat([plain(case.image)[:1].float(), case.mask]),
                                             affine=case.image.affine))
        zooms = np.linalg.norm(np.asarray(both.affine, dtype=np.float64)[:3, :3], axis=0)
        if not np.allclose(zooms, 2.0, atol=0.05):
            raise RecipeError(f"{name} has voxels of {tuple(np.round(zooms, 3))} mm; the lesion generator draws on "
                              "2 mm brains", where=where,
                              fix="resample the brains to 2 mm isotropic (e.g. scripts/prepare_brains.py).")
        image, mask = plain(both)
        brain = mask > 0.5
        t1 = image * brain
        out.append({"name": name.split(".")[0], "t1": t1, "brain": brain,
                    "z": torch.full((t1.shape[2],), float("nan"), dtype=torch.float64)})
    return out


def labelled_brains(cfg: DataConfig) -> tuple[list[dict], list[dict], list[Path]]:
    """The training and validation brains of ``data.labels.brains`` and the files they came from.

    ``templates``: the same brains for both (validation draws other lesions); a datalist: its splits
    (validation falls back to the training brains when it lists none).
    """
    choice = cfg.labels.brains if cfg.labels is not None else "templates"
    if choice == "templates":
        from .data.sample import data_dir

        brains = brain_volumes()
        return brains, brains, [data_dir() / "mni152_2mm_t1.nii.gz", data_dir() / "mni152_2mm_brainmask.nii.gz"]
    sources = _datalist_sources(choice)
    train, val = _split_brains(sources, choice, "training"), _split_brains(sources, choice, "validation")
    files = [Path(choice)] + [Path(f) for s in sources if s.split in ("training", "validation")
                              for f in (s.paths[0], s.mask)]
    return train, val or train, files


def _centred(volume: torch.Tensor, brain: torch.Tensor, size: list[int], fill: float) -> torch.Tensor:
    """Crop/pad the in-plane axes (0, 1) of ``(X, Y, Z)`` so the brain's bounding box is centred in ``size``."""
    plane = brain.any(dim=2)
    out = torch.full((*size, volume.shape[2]), fill, dtype=volume.dtype)
    src, dst = [], []
    for axis, n in enumerate(size):
        idx = torch.nonzero(plane.any(dim=1 - axis)).flatten()
        start = (int(idx[0]) + int(idx[-1]) + 1) // 2 - n // 2
        lo, hi = max(start, 0), min(start + n, volume.shape[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[dst[0], dst[1]] = volume[src[0], src[1]]
    return out


def lesion_slices(cfg: DataConfig, seed: int, *, variants: int | None = None, stream: int = 0,
                  brains: list[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Brain slices with generated lesions and every rater's mask (``sample:lesions``' items).

    Args:
        cfg: the ``data`` section (``size``, ``holdout``, ``labels``).
        seed: the run's seed.
        variants: lesion draws per slice (default ``labels.variants``).
        stream: a further seed part (validation draws differ from training draws).
        brains: the brains (default ``brain_volumes()``).

    Returns:
        ``(images, masks, brain, record)``: images ``(N, 1, H, W)`` on the network scale, masks
        ``(N, K, 1, H, W)`` bool (``K`` raters), brain masks ``(N, 1, H, W)``, and ``record`` with the
        per-brain intensity scaling and the training brains' reference quantiles.
    """
    from .data.raters import annotated_lesion_case
    from .data.sample import MIN_BRAIN_FRACTION
    from .data.transforms import MATCH_LEVELS, foreground_quantiles, foreground_range, scale_to_unit

    lab = cfg.labels
    variants = lab.variants if variants is None else variants
    brains = brain_volumes() if brains is None else brains
    held = [(_Z0_2MM + 2.0 * a - 1.0, _Z0_2MM + 2.0 * b - 1.0) for a, b in cfg.holdout]
    images, masks, fgs, scaled_all, fg_all = [], [], [], [], []
    for b, brain in enumerate(brains):
        scaling = foreground_range(brain["t1"], brain["brain"], MRI_PERCENTILES)
        t1 = _centred(brain["t1"], brain["brain"], cfg.size, 0.0)
        mask = _centred(brain["brain"].float(), brain["brain"], cfg.size, 0.0) > 0.5
        keep = [k for k in range(t1.shape[2]) if float(mask[..., k].float().mean()) >= MIN_BRAIN_FRACTION / 2
                and not any(lo <= float(brain["z"][k]) < hi for lo, hi in held)]
        scaled_all.append(scale_to_unit(t1[..., keep], scaling, clip=False))
        fg_all.append(mask[..., keep])
        for k in keep:
            for v in range(variants):
                rng = np.random.default_rng([seed, stream, b, k, v])
                image = t1[..., k][None].numpy().astype(np.float64)
                raters = np.zeros((lab.raters, 1, *cfg.size), dtype=bool)
                n = 0 if rng.random() < lab.healthy_fraction else int(rng.integers(lab.lesions[0], lab.lesions[1] + 1))
                while n > 0:
                    try:
                        case = annotated_lesion_case(image, n_raters=lab.raters, levels=lab.rater_levels,
                                                     boundary_mm=lab.boundary_mm, spacing=2.0, seed=rng, n=n,
                                                     mask=mask[..., k].numpy(), radius_mm=lab.radius_mm,
                                                     contrast=lab.contrast, polarity="both")
                        image, raters = case.image, np.asarray(case.annotations)
                        break
                    except DataError:  # no room for so many lesions in this slice: fewer
                        n -= 1
                images.append(conditioning(scale_to_unit(torch.from_numpy(image).float(), scaling, clip=False)))
                masks.append(torch.from_numpy(raters))
                fgs.append(mask[..., k][None])
    if not images:
        raise RecipeError("no brain slice is left for training", where="data.holdout", fix="hold out fewer slices.")
    reference = foreground_quantiles(scaled_all, fg_all)
    record = {"reference": reference, "reference_levels": list(MATCH_LEVELS), "brains": [b["name"] for b in brains]}
    return torch.stack(images), torch.stack(masks), torch.stack(fgs), record


def lesions(cfg: DataConfig, seed: int) -> DataBundle:
    """``sample:lesions``: brain slices with generated bright and dark lesions, one item per rater's mask."""

    if cfg.spatial_dims != 2 or cfg.slice_axis != 2:
        raise RecipeError("sample:lesions gives axial 2D slices", where="data.spatial_dims",
                          fix="set data.spatial_dims: 2 and data.slice_axis: 2 (with a 2-entry data.size).")
    if cfg.labels is None or len(cfg.labels.classes) != 2:
        raise RecipeError("sample:lesions has two classes (background, lesion)", where="data.labels.classes",
                          fix="set data.labels.classes: [background, lesion].")
    train_brains, val_brains, inputs = labelled_brains(cfg)

    def items(variants: int, stream: int, brains: list[dict]) -> tuple[TensorDataset, dict]:
        images, masks, _, record = lesion_slices(cfg, seed, variants=variants, stream=stream, brains=brains)
        k = masks.shape[1]  # one item per rater: (slice 0, rater 0), (slice 0, rater 1)...
        return TensorDataset(mask_channels(masks.flatten(0, 1).long(), 2), images.repeat_interleave(k, 0)), record

    train, record = items(cfg.labels.variants, 0, train_brains)
    n_val = max(1, round(cfg.labels.variants * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    val = items(n_val, 1, val_brains)[0] if n_val else None
    prep = {"source": "sample:lesions", "modality": "MR T1", "orientation": "RAS", "spacing_mm": [2.0, 2.0],
            "slicing_axis": 2, "size": list(cfg.size), "cases": len(train) // cfg.labels.raters,
            "intensity": {"method": "percentile", "percentiles": list(MRI_PERCENTILES),
                          "reference": record["reference"], "reference_levels": record["reference_levels"]},
            "holdout": [list(r) for r in cfg.holdout] or None, "brains": record["brains"]}
    return _bundle(train, val, cfg, 1, 1, prep, inputs)
