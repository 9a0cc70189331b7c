"""The denoisers of method ``counterfactual`` (Sanchez et al. 2022): a class-conditional model, null and guided.

Sanchez et al. 2022 ("What is healthy? Generative counterfactual diffusion for lesion localization", sec. 2-3)
train one diffusion model on healthy and lesioned scans with classifier-free guidance (the class dropped to a null
class at random: ``training.class_dropout``), invert a scan by DDIM with the null class to ``t_L`` (the "abduction"
of its noise) and decode it by DDIM with the "healthy" class and guidance weight ``w``,
``eps = eps_null + w (eps_healthy - eps_null)``; the anomaly map is the difference between the scan and this
healthy counterfactual. ``counterfactual_denoisers`` turns a class-conditional model (``model.class_conditional``)
into the two denoisers of the core (``medidiff.core.cfg``); ``medidiff.anomaly.healthy`` runs the inversion and
the decoding.

What differs from the paper: the U-Net is conditioned by MONAI's class embedding added to the time embedding
(the paper conditions through attention), the lesions of ``sample:lesion_classes`` are generated on healthy
templates (the paper: BraTS labels), ``t_L`` and ``steps`` set the DDIM grid (the authors' released BraTS setting:
``t_L = 0.75`` of 1000 DDPM times on a 100-step DDIM grid, ``w = 3``; the dynamic normalisation of their sampler
is not used), and 3D volumes work alike (the paper is 2D).
"""

from __future__ import annotations

from medidiff.core.cfg import CFGDenoiser, WithClass

from .config import HealthyOptions

__all__ = ["null_class", "counterfactual_denoisers"]


def null_class(denoiser) -> int:
    """The null class of a class-conditional model (``denoiser.net.null_class``: its last class embedding).

    Raises:
        ValueError: the model is not class-conditional.
    """
    null = getattr(getattr(denoiser, "net", None), "null_class", None)
    if null is None:
        raise ValueError("method: counterfactual needs a class-conditional model (trained with "
                         "model.class_conditional: true and training.class_dropout, e.g. "
                         "recipes/counterfactual_lesion_2d.yaml)")
    return int(null)


def counterfactual_denoisers(denoiser, opts: HealthyOptions) -> tuple[WithClass, CFGDenoiser]:
    """The encoder (the null class) and the decoder (guided toward ``opts.healthy_class``) of the counterfactual.

    Args:
        denoiser: the class-conditional model, ``denoiser(x_t, t, class_labels=y) -> x0_hat`` (a
            ``medidiff.core.denoiser.Denoiser``; its network gives the null class, :func:`null_class`).
        opts: the options (``guidance_weight``, ``healthy_class``).

    Returns:
        ``(encoder, decoder)``: ``D(x_t, t | null)`` and ``D_w(x_t, t | healthy)``.

    Raises:
        ValueError: the model is not class-conditional, or ``healthy_class`` is not one of its classes.
    """
    null = null_class(denoiser)
    if not 0 <= opts.healthy_class < null:
        raise ValueError(f"healthy_class: {opts.healthy_class} is not one of the model's {null} classes "
                         f"(0-{null - 1}; {null} is its null class)")
    return WithClass(denoiser, null), CFGDenoiser(denoiser, opts.healthy_class, null, opts.guidance_weight)
