"""Training data and network of a noise-aware classifier, the classifier of classifier guidance.

Wolleb et al. 2022 ("Diffusion Models for Medical Anomaly Detection", sec. 3) train a classifier of noisy
images on scans labelled only healthy or diseased, and steer a DDIM decoding toward "healthy" with its
gradient (``medidiff.core.guidance.ClassifierGuidance``; ``medidiff.anomaly`` method ``guided``). Here:

- ``sample:lesion_classes``: the axial brain slices of ``sample:lesions`` (``medidiff.train_segment.lesion_slices``:
  the bundled 2 mm MNI152 brain and nilearn's 1 mm one, ``data.holdout`` left out), each drawn
  ``labels.variants`` times with generated bright or dark lesions, or none (``labels.healthy_fraction``).
  Items are ``{"image": (1, H, W) in [-1, 1], "class": 0 (healthy) or 1 (lesion)}``: a label per image, no
  masks. The image is clipped to ``[-1, 1]`` as anomaly detection clips a scan before noising it. A slice whose
  lesions found no room is healthy. ``data.labels`` gives the lesion generator's settings; the raters' settings
  do not matter (one outline decides the class) and the classes are always ``healthy`` and ``lesion``.
- ``classifier_network``: the ``model`` section's U-Net as a classifier (``medidiff.nets.build_classifier``: the
  encoder half with attention pooling, as in the paper).

What differs from the paper: the lesions are generated on healthy templates (the paper's BRATS and CheXpert
labels mark real disease), and the network is MONAI's U-Net encoder rather than guided-diffusion's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .errors import RecipeError
from .train_data import MRI_PERCENTILES, DataBundle, DataConfig, LabelsConfig

__all__ = ["CLASSES", "ClassDataset", "lesion_classes", "classifier_network"]

#: The classes of ``sample:lesion_classes``, in label order.
CLASSES = ("healthy", "lesion")


class ClassDataset(Dataset):
    """Items ``{"image": images[i], "class": classes[i]}`` from in-memory tensors.

    Args:
        images: ``(N, C, *spatial)`` in ``[-1, 1]``.
        classes: ``(N,)`` integer classes.
    """

    def __init__(self, images: torch.Tensor, classes: torch.Tensor):
        if len(classes) != len(images):
            raise ValueError(f"{len(classes)} classes for {len(images)} images")
        self.images, self.classes = images, classes.long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "class": self.classes[i]}


def lesion_classes(cfg: DataConfig, seed: int) -> DataBundle:
    """``sample:lesion_classes``: brain slices, healthy or with generated lesions, labelled per image."""
    from .data.augment import Augmented
    from .train_segment import labelled_brains, lesion_slices

    if cfg.spatial_dims != 2 or cfg.slice_axis != 2:
        raise RecipeError("sample:lesion_classes gives axial 2D slices", where="data.spatial_dims",
                          fix="set data.spatial_dims: 2 and data.slice_axis: 2 (with a 2-entry data.size).")
    labels = (cfg.labels or LabelsConfig()).model_copy(update={"raters": 1, "boundary_mm": 0.0})
    one_rater = cfg.model_copy(update={"labels": labels})
    train_brains, val_brains, inputs = labelled_brains(cfg)

    def items(variants: int, stream: int, brains: list[dict]) -> tuple[ClassDataset, dict]:
        images, masks, _, record = lesion_slices(one_rater, seed, variants=variants, stream=stream, brains=brains)
        return ClassDataset(images.clamp(-1.0, 1.0), masks.flatten(1).any(dim=1).long()), record

    train, record = items(labels.variants, 0, train_brains)
    n_val = max(1, round(labels.variants * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    val = items(n_val, 1, val_brains)[0] if n_val else None
    if cfg.augment is not None:
        train = Augmented(train, **cfg.augment.model_dump())
    prep = {"source": "sample:lesion_classes", "modality": "MR T1", "orientation": "RAS", "spacing_mm": [2.0, 2.0],
            "slicing_axis": 2, "size": list(cfg.size), "cases": len(train),
            "intensity": {"method": "percentile", "percentiles": list(MRI_PERCENTILES),
                          "reference": record["reference"], "reference_levels": record["reference_levels"]},
            "labels": {"classes": list(CLASSES)}, "holdout": [list(r) for r in cfg.holdout] or None,
            "brains": record["brains"]}
    return DataBundle(train, val, 1, data_prep=prep, inputs=inputs)


def classifier_network(model: Any, spatial_dims: int, bundle: DataBundle) -> tuple[torch.nn.Module, dict]:
    """The ``model`` section's U-Net built as a noise-aware classifier of the bundle's classes.

    Args:
        model: the recipe's ``model`` section (``medidiff.recipes.ModelConfig``); its U-Net settings shape the
            encoder.
        spatial_dims: 2 or 3.
        bundle: the data (its ``data_prep["labels"]["classes"]`` name the classes).

    Returns:
        ``(net, record)``: the ``medidiff.nets.Classifier`` and the entries it adds to ``model.json``
        (``task: classifier`` and the class names).

    Raises:
        RecipeError: the model is not a diffusion U-Net, or the data have no per-image classes.
    """
    from .nets import build_classifier

    if model.arch != "diffusion_unet":
        raise RecipeError(f"training.objective classification uses the encoder half of a diffusion U-Net, not "
                          f"model.arch {model.arch}", where="model.arch", fix="set model.arch: diffusion_unet.")
    classes = (bundle.data_prep.get("labels") or {}).get("classes")
    if not classes or not isinstance(bundle.train[0].get("class"), (int, torch.Tensor)):
        raise RecipeError("training.objective classification needs images labelled with classes",
                          where="data.source", fix="use data.source: sample:lesion_classes.")
    net = build_classifier(spatial_dims=spatial_dims, in_channels=bundle.channels, num_classes=len(classes),
                           channels=model.channels, attention_levels=model.attention_levels,
                           num_res_blocks=model.num_res_blocks, num_head_channels=model.num_head_channels,
                           norm_num_groups=model.norm_num_groups, resblock_updown=model.resblock_updown)
    return net, {"task": "classifier", "classes": list(classes)}
