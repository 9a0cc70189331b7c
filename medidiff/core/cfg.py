"""Classifier-free guidance: one class-conditional network, its classes and a null class, as denoisers.

Ho & Salimans 2022 ("Classifier-free diffusion guidance") train one network ``eps(x_t, t, c)`` on classes ``c``
and, with probability ``p_uncond``, on the null class ``null`` instead (:func:`drop_classes`), so that the same
network is both the conditional and the unconditional model. Sampling combines the two noise estimates,

    eps_w = eps(x_t, null) + w (eps(x_t, c) - eps(x_t, null)),

the form Sanchez et al. 2022 ("What is healthy? Generative counterfactual diffusion for lesion localization",
sec. 2) use (``w = 0``: unconditional, ``w = 1``: conditional, ``w > 1``: pushed further toward ``c``; Ho &
Salimans' eq. 6 writes the same with their ``w`` equal to this ``w - 1``).

Every sampler here consumes ``x0_hat`` and derives ``eps = (x_t - alpha x0_hat) / sigma``. For fixed ``x_t`` and
``t`` that map is affine with the same coefficients for both estimates, and so is each parametrisation's
conversion of a network output to ``x0_hat`` (``medidiff.core.denoiser.x0_from_output``: eps, x0, v, score).
Hence the combination above is exactly

    x0_w = (x_t - sigma eps_w) / alpha = x0_null + w (x0_c - x0_null),

which is what :class:`CFGDenoiser` returns: the ``Denoiser`` converts each network output through the process
(``alpha``, ``sigma`` at ``t``) and the combination is taken on the two ``x0_hat``, for every parametrisation and
process, without dividing by ``sigma`` (exact at the smallest times too).
"""

from __future__ import annotations

import torch

from .denoiser import class_batch
from .utils import batch_time

__all__ = ["drop_classes", "WithClass", "CFGDenoiser"]


def drop_classes(labels: torch.Tensor, null: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each label replaced by the null class with probability ``p`` (the condition dropout of training).

    Args:
        labels: ``(B,)`` integer classes.
        null: the null class's index.
        p: the dropout probability in ``[0, 1]``.
        generator: the random generator (on ``labels``' device).

    Returns:
        ``(B,)`` labels; ``labels`` itself when ``p == 0`` (no random number is drawn).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the class dropout must lie in [0, 1], got {p}")
    if p == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, int(null)), labels)


class WithClass(torch.nn.Module):
    """A class-conditional denoiser bound to one class: ``D(x_t, t) = denoiser(x_t, t, class_labels=cls)``.

    Args:
        denoiser: a denoiser taking ``class_labels`` (``medidiff.core.denoiser.Denoiser`` of a class-conditional
            network).
        cls: the class (an int, or a ``(B,)`` tensor for a batch of ``B``).
    """

    def __init__(self, denoiser, cls: int | torch.Tensor):
        super().__init__()
        self.denoiser, self.cls = denoiser, cls

    @property
    def process(self):
        return self.denoiser.process

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.denoiser(x_t, t, class_labels=class_batch(self.cls, x_t.shape[0], x_t.device))


class CFGDenoiser(torch.nn.Module):
    """Classifier-free guidance toward class ``cls``: ``x0_null + w (x0_cls - x0_null)``, the ``x0_hat`` of
    ``eps_null + w (eps_cls - eps_null)`` (derived in the module docstring).

    Both estimates come from one call of the wrapped denoiser on the batch doubled (``cls`` for the first half,
    ``null`` for the second), so each evaluation costs two network evaluations per image (and twice the memory
    of one).

    Args:
        denoiser: a denoiser taking ``class_labels`` (``D(x_t, t, class_labels=y) -> x0_hat``).
        cls: the class steered toward (an int or a ``(B,)`` tensor).
        null: the null class's index (trained by :func:`drop_classes`).
        w: the guidance weight (0: unconditional, 1: conditional).
    """

    def __init__(self, denoiser, cls: int | torch.Tensor, null: int, w: float):
        super().__init__()
        self.denoiser, self.cls, self.null, self.w = denoiser, cls, int(null), float(w)

    @property
    def process(self):
        return self.denoiser.process

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        n = x_t.shape[0]
        t = batch_time(t, x_t)
        labels = torch.cat([class_batch(self.cls, n, x_t.device), class_batch(self.null, n, x_t.device)])
        x0 = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=labels)
        x0_cls, x0_null = x0[:n], x0[n:]
        return x0_null + self.w * (x0_cls - x0_null)
