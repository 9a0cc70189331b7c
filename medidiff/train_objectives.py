"""What the training engine minimises: the denoising loss, or a deterministic segmentation loss.

``training.objective`` picks one:

- ``denoising``: ``medidiff.core.losses.diffusion_loss`` (every diffusion model, conditional or not). A
  class-conditional U-Net (``medidiff.nets.build_unet``'s ``num_class_embeds``) gets each item's ``class``, replaced
  by the null class with probability ``training.class_dropout`` (``medidiff.core.cfg.drop_classes``: Ho & Salimans
  2022's classifier-free guidance training; Sanchez et al. 2022, sec. 2), drawn from the step's generator;
- ``segmentation``: Dice + cross entropy (Milletari et al. 2016, eq. 1 for the soft Dice; MONAI's
  ``DiceCELoss``, batch-wise Dice so healthy slices with empty masks count) of a deterministic network
  (``medidiff.nets.SegmentationUNet``) that segments the item's ``cond`` image; the item's ``image`` is the
  mask on the model's ``[-1, 1]`` scale (one channel: foreground; several: one-hot classes). The same
  pairs train the conditional diffusion model, so the two are compared on the same data;
- ``classification``: cross entropy of a noise-aware classifier ``p(y | x_t, t)`` (``medidiff.nets.Classifier``
  through ``medidiff.core.guidance.NoisyClassifier``) on the item's ``image`` noised to a random time by the
  process, against the item's ``class`` (Wolleb et al. 2022, sec. 3; Dhariwal & Nichol 2021, sec. 4: the
  classifier of classifier guidance, trained on the times and noise the denoiser is trained on);
- ``vqvae``: a VQ-VAE's (``medidiff.nets.VQVAE``) reconstruction error, ``l1`` or ``l2``
  (``training.reconstruction_loss``), plus the commitment loss MONAI's quantiser returns (van den Oord et al. 2017,
  eq. 3's last term; the codebook follows an exponential moving average of the encodings instead of its second
  term); the times and noise drawn for the step are not used. The autoencoder of latent diffusion (Pinaya et al.
  2022); the latent denoiser itself is trained by ``denoising`` on its codes (``training.autoencoder``).
"""

from __future__ import annotations

from typing import Any

import torch

from .core.cfg import drop_classes
from .core.guidance import NoisyClassifier
from .core.losses import diffusion_loss
from .errors import RecipeError, TrainingError

__all__ = ["OBJECTIVES", "objective_loss", "segmentation_loss", "classification_loss", "vqvae_loss",
           "check_objective"]

OBJECTIVES = ("denoising", "segmentation", "classification", "vqvae")


def segmentation_loss(net, masks: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Dice + cross entropy of a segmentation network's logits against masks on the ``[-1, 1]`` scale.

    Args:
        net: called as ``net(x, None, logits=True)`` with ``x`` the (zero) state and the image concatenated.
        masks: ``(B, C, *spatial)`` in ``[-1, 1]``: ``C = 1`` foreground, else one-hot classes.
        image: ``(B, Cc, *spatial)`` the conditioning image.

    Returns:
        The scalar loss.
    """
    from monai.losses import DiceCELoss

    target = (masks > 0).float()
    logits = net(torch.cat([torch.zeros_like(masks), image.to(masks.dtype)], dim=1), None, logits=True)
    binary = masks.shape[1] == 1
    loss = DiceCELoss(sigmoid=binary, softmax=not binary, batch=True)
    return loss(logits.float(), target)


def classification_loss(classifier: NoisyClassifier, x0: torch.Tensor, labels: torch.Tensor, *,
                        noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cross entropy of a noise-aware classifier on ``x_t = alpha(t) x0 + sigma(t) noise``.

    Args:
        classifier: ``classifier(x_t, t) -> logits (B, classes)``; its ``process`` noises the images.
        x0: the clean images ``(B, C, *spatial)``.
        labels: their classes ``(B,)``.
        noise: the noise ``(B, C, *spatial)``.
        t: the times ``(B,)``.

    Returns:
        The scalar loss (mean over the batch).
    """
    x_t = classifier.process.noised(x0, t, noise)
    logits = classifier(x_t, t)
    return torch.nn.functional.cross_entropy(logits.float(), labels.long())


def vqvae_loss(net, x0: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """A VQ-VAE's reconstruction error plus its quantiser's commitment loss.

    Args:
        net: called as ``net(x0) -> (reconstruction, commitment loss)`` (``medidiff.nets.VQVAE``).
        x0: the images ``(B, C, *spatial)``.
        kind: ``l1`` (mean absolute) or ``l2`` (mean squared) error.

    Returns:
        The scalar loss ``mean |x0 - x0'|`` (or ``mean (x0 - x0')^2``) ``+ commitment``.
    """
    reconstruction, commitment = net(x0)
    error = (reconstruction.float() - x0.float())
    error = error.abs() if kind == "l1" else error.square()
    return error.mean() + commitment.float()


def objective_loss(config: Any, denoiser, x0: torch.Tensor, cond: torch.Tensor | None, *, noise: torch.Tensor,
                   t: torch.Tensor, labels: torch.Tensor | None = None, null_class: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of one batch under ``config.objective`` (a ``TrainingConfig``).

    Args:
        config: the ``training`` section (``objective``, ``loss_weighting``, ``min_snr_gamma``).
        denoiser: the model (``denoiser.net`` is the network, DDP-wrapped or compiled as trained).
        x0: the batch's images ``(B, C, *spatial)`` (masks for a segmentation model).
        cond: its conditioning channels (the image segmented), or ``None``.
        noise: the noise of the denoising (and classification) loss.
        t: the times of the denoising (and classification) loss.
        labels: the images' classes ``(B,)`` (the items' ``class``), for ``classification`` and a class-conditional
            denoiser.
        null_class: the null class of a class-conditional denoiser (``None``: the denoiser is not one, and
            ``denoising`` ignores ``labels``).
        generator: draws the class dropout (``config.class_dropout``) of a class-conditional denoiser.

    Returns:
        The scalar loss.

    Raises:
        TrainingError: ``classification`` or a class-conditional denoiser on items without a ``class``.
    """
    if config.objective == "segmentation":
        return segmentation_loss(denoiser.net, x0, cond)
    if config.objective == "vqvae":
        return vqvae_loss(denoiser.net, x0, config.reconstruction_loss)
    if config.objective == "classification":
        if labels is None:
            raise TrainingError("training.objective classification needs each item's class",
                                where="data.source", fix="use data.source: sample:lesion_classes.")
        classifier = NoisyClassifier(denoiser.net, denoiser.process, scale_input=denoiser.scale_input,
                                     time_fn=denoiser.time_fn)
        return classification_loss(classifier, x0, labels, noise=noise, t=t)
    class_labels = None
    if null_class is not None:
        if labels is None:
            raise TrainingError("a class-conditional model needs each item's class", where="data.source",
                                fix="use data.source: sample:lesion_classes.")
        class_labels = drop_classes(labels.long(), null_class, config.class_dropout, generator)
    return diffusion_loss(denoiser, x0, cond=cond, weighting=config.loss_weighting, gamma=config.min_snr_gamma,
                          noise=noise, t=t, class_labels=class_labels)


def check_objective(objective: str, net_config: dict, cond_channels: int, *, class_dropout: float = 0.0) -> None:
    """Refuse a recipe whose objective, network and data do not go together.

    Raises:
        RecipeError: a segmentation objective without a segmentation network or without image pairs, a
            segmentation network trained as a denoiser, a classifier trained otherwise than by
            ``classification`` (or the reverse), a VQ-VAE trained otherwise than by ``vqvae`` (or the reverse), or a
            class dropout without a class-conditional U-Net.
    """
    if class_dropout and not net_config.get("num_class_embeds"):
        raise RecipeError("training.class_dropout needs a class-conditional U-Net", where="training.class_dropout",
                          fix="set model.class_conditional: true (with data labelled by class), or class_dropout: 0.")
    vqvae = net_config.get("arch") == "vqvae"
    if (objective == "vqvae") != vqvae:
        raise RecipeError(f"training.objective {objective} does not train a network of arch "
                          f"{net_config.get('arch', 'diffusion_unet')}", where="training.objective",
                          fix="a VQ-VAE (model.arch: vqvae) is trained with objective vqvae, and only it.")
    if vqvae:
        if cond_channels:
            raise RecipeError("a VQ-VAE encodes the image alone, without conditioning channels", where="data.source",
                              fix="use an unlabelled image source (e.g. sample:brain).")
        return
    classifier = net_config.get("arch") == "classifier"
    if (objective == "classification") != classifier:
        raise RecipeError(f"training.objective {objective} does not train a network of arch "
                          f"{net_config.get('arch', 'diffusion_unet')}", where="training.objective",
                          fix="a noise-aware classifier is trained with objective classification, and only it.")
    if classifier and cond_channels:
        raise RecipeError("a noise-aware classifier classifies the image alone, without conditioning channels",
                          where="data.source", fix="use data.source: sample:lesion_classes.")
    if classifier:
        return
    deterministic = net_config.get("arch") == "unet"
    if objective == "segmentation" and not deterministic:
        raise RecipeError("training.objective segmentation trains a deterministic network", where="model.arch",
                          fix="set model.arch: unet (and model.prediction: x0).")
    if objective != "segmentation" and deterministic:
        raise RecipeError("model.arch unet is a deterministic segmentation network, not a denoiser",
                          where="training.objective", fix="set training.objective: segmentation.")
    if objective == "segmentation" and cond_channels < 1:
        raise RecipeError("a segmentation network needs image and mask pairs", where="data.labels",
                          fix="use data.source: sample:lesions, or a labelled dataset with data.labels set.")
