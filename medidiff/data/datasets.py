"""Datasets: 2D slices of 3D volumes, random and grid patches of large volumes, and cached datasets.

Thin wrappers over MONAI's datasets (``Dataset``, ``CacheDataset``, ``PersistentDataset``,
``GridPatchDataset``) and ``RandSpatialCropSamplesd``; ``SliceDataset`` adds what MONAI lacks: the
axial (or any-axis) slices of in-memory volumes, skipping slices with too little foreground.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, GridPatchDataset, PatchIter, PersistentDataset
from monai.transforms import Compose, RandSpatialCropSamplesd

from medidiff.arrays import plain
from medidiff.errors import DataError

#: Voxels above this share of a volume's robust range (from its minimum) count as foreground.
FOREGROUND_SHARE = 0.05


def foreground_of(volume: torch.Tensor, share: float = FOREGROUND_SHARE) -> torch.Tensor:
    """A foreground mask ``(*spatial)``: voxels above ``min + share * (99.5th percentile - min)`` in any channel.

    Args:
        volume: ``(C, *spatial)``.
        share: share of the robust range.

    Returns:
        A bool tensor of the spatial shape.
    """
    v = plain(volume, torch.float32)
    low = v.min()
    high = torch.quantile(v.flatten()[:: max(1, v.numel() // 1_000_000)], 0.995)
    return (v > low + share * (high - low)).any(dim=0)


class SliceDataset(torch.utils.data.Dataset):
    """2D slices along one axis of 3D volumes, as dicts ``{"image": (C, H, W), ["label"], "volume", "slice"}``.

    Slices whose foreground covers less than ``min_foreground`` of the slice are skipped. Scale
    intensities per volume before slicing (e.g. with ``medidiff.data.transforms.preset(...,
    spatial_size=(X, Y, Z))``) so that all slices of a volume share one scale; ``transform`` then runs
    on each slice's dict (2D MONAI dictionary transforms, e.g. augmentations).

    Args:
        volumes: ``(C, X, Y, Z)`` tensors, MetaTensors or arrays.
        labels: matching label volumes (optional).
        masks: matching foreground masks (optional; default: :func:`foreground_of` each volume).
        axis: spatial axis to slice along (2 = axial for RAS volumes).
        min_foreground: least foreground share of a kept slice.
        transform: callable applied to each slice's dict (optional).
    """

    def __init__(
        self,
        volumes: Sequence[Any],
        labels: Sequence[Any] | None = None,
        masks: Sequence[Any] | None = None,
        axis: int = 2,
        min_foreground: float = 0.1,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(volumes):
            raise DataError(f"{len(labels)} label volumes for {len(volumes)} volumes")
        if masks is not None and len(masks) != len(volumes):
            raise DataError(f"{len(masks)} masks for {len(volumes)} volumes")
        self.volumes = [plain(v, torch.float32) for v in volumes]
        self.labels = None if labels is None else [plain(v, torch.float32) for v in labels]
        self.axis = axis
        self.transform = transform
        self.index: list[tuple[int, int]] = []
        for i, vol in enumerate(self.volumes):
            if vol.ndim != 4:
                raise DataError(f"volume {i} has shape {tuple(vol.shape)}, expected (C, X, Y, Z)",
                                fix="add a channel axis: volume[None].")
            fg = foreground_of(vol) if masks is None else plain(masks[i], torch.float32).reshape(vol.shape[1:]) > 0
            share = fg.float().mean(dim=tuple(d for d in range(3) if d != axis))
            self.index += [(i, int(k)) for k in torch.nonzero(share >= min_foreground).flatten()]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, Any]:
        i, k = self.index[item]
        d: dict[str, Any] = {"image": self.volumes[i].select(self.axis + 1, k), "volume": i, "slice": k}
        if self.labels is not None:
            d["label"] = self.labels[i].select(self.axis + 1, k)
        return self.transform(d) if self.transform is not None else d


class RandomPatches(torch.utils.data.Dataset):
    """Random square patches of 2D images, ``{"image": (C, *size)}``, mostly on the foreground.

    A prior learned on patches applies to images of any size (a convolutional network sees local
    statistics; Hu et al. 2024, "Learning image priors through patch-based diffusion models"). Each item
    draws an image and an offset; up to ``tries`` offsets are drawn until the patch's foreground share
    reaches ``min_foreground``. Images smaller than a patch are padded with ``background``.

    Args:
        images: ``(C, H, W)`` tensors on the network scale (any sizes).
        size: the patch size ``(h, w)``.
        length: items per epoch.
        min_foreground: least share of voxels above ``background`` in a patch.
        background: the background value (``-1``).
        seed: ``None`` draws from torch's global generator (checkpointed by the training engine, so runs
            resume exactly); a number makes item ``i`` the same every time (a fixed validation set).
        tries: offsets drawn per item before the last is kept.
    """

    def __init__(self, images: Sequence[torch.Tensor], size: Sequence[int], length: int, *,
                 min_foreground: float = 0.2, background: float = -1.0, seed: int | None = None, tries: int = 20):
        if not images:
            raise ValueError("no images to cut patches from")
        h, w = (int(v) for v in size)
        self.images = []
        for image in images:
            x = plain(image, torch.float32)
            pad = (0, max(0, w - x.shape[-1]), 0, max(0, h - x.shape[-2]))
            self.images.append(torch.nn.functional.pad(x, pad, value=background) if any(pad) else x)
        self.size, self.length, self.min_foreground = (h, w), int(length), float(min_foreground)
        self.background, self.seed, self.tries = float(background), seed, int(tries)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        g = None if self.seed is None else torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        h, w = self.size
        for _ in range(self.tries):
            x = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
            top = int(torch.randint(x.shape[-2] - h + 1, (1,), generator=g))
            left = int(torch.randint(x.shape[-1] - w + 1, (1,), generator=g))
            patch = x[:, top:top + h, left:left + w]
            if float((patch > self.background + 1e-3).float().mean()) >= self.min_foreground:
                break
        return {"image": patch.clone()}


def cached_dataset(
    data: Sequence[Any],
    transform: Callable | None = None,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> Dataset:
    """A MONAI dataset caching the deterministic start of ``transform`` (up to its first random transform).

    Args:
        data: items (usually dicts of file paths).
        transform: a MONAI transform (e.g. a ``preset``).
        cache: ``"memory"`` (``CacheDataset``), ``"disk"`` (``PersistentDataset`` in ``cache_dir``) or
            ``"none"`` (plain ``Dataset``).
        cache_dir: folder for the disk cache.
        num_workers: workers that fill the memory cache.

    Returns:
        The dataset.
    """
    if cache == "memory":
        return CacheDataset(data, transform, num_workers=num_workers, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise DataError("a disk cache needs a folder", fix="pass cache_dir=... (e.g. <out>/cache).")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")


def patch_dataset(
    data: Sequence[Any],
    patch_size: Sequence[int],
    num_samples: int = 4,
    transform: Callable | None = None,
    keys: Sequence[str] = ("image",),
    cache: str = "none",
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Random patches of large volumes for training: ``transform`` then MONAI's ``RandSpatialCropSamplesd``.

    Each item yields a list of ``num_samples`` dicts; use ``monai.data.list_data_collate`` in the
    DataLoader to get a batch of ``batch_size * num_samples`` patches.

    Args:
        data: items (dicts).
        patch_size: patch size (2 or 3 entries).
        num_samples: patches per item.
        transform: the preparing transform (applied, and cached if asked, before cropping).
        keys: keys cropped together (image, label, foreground...).
        cache: ``"none"``, ``"memory"`` or ``"disk"`` (see :func:`cached_dataset`).
        cache_dir: folder for the disk cache.

    Returns:
        The dataset.
    """
    crop = RandSpatialCropSamplesd(list(keys), roi_size=list(patch_size), num_samples=num_samples,
                                   random_size=False)
    steps = ([transform] if transform is not None else []) + [crop]
    return cached_dataset(data, Compose(steps), cache=cache, cache_dir=cache_dir)


def grid_patch_dataset(
    images: Sequence[Any],
    patch_size: Sequence[int],
) -> GridPatchDataset:
    """Regular, non-overlapping patches tiling each ``(C, *spatial)`` image, for patch-wise evaluation.

    Items are ``(patch, coords)`` with ``coords`` the patch's ``(C, *spatial)`` start/stop in the image
    (MONAI's ``GridPatchDataset``); patches at the far edges are zero-padded to ``patch_size``.
    Overlapping, blended whole-volume inference is MONAI's ``sliding_window_inference``.

    Args:
        images: ``(C, *spatial)`` arrays or tensors.
        patch_size: spatial patch size.

    Returns:
        The dataset.
    """
    return GridPatchDataset(data=[np.asarray(plain(x, torch.float32)) for x in images],
                            patch_iter=PatchIter(patch_size=tuple(patch_size), mode="constant"))
