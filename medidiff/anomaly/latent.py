"""Method ``latent`` (Pinaya et al. 2022): a DDPM on a VQ-VAE's latents finds the anomalous latents and re-denoises
only those.

Pinaya et al. 2022 ("Fast unsupervised brain anomaly detection and segmentation with diffusion models", sec. 2)
encode a scan with a VQ-VAE, run the latent DDPM's backward process from the middle of the chain (the encoded
scan noised to ``t_L``), compare its intermediate predictions of the clean latents with the scan's latents, mask
the latents where they differ more than on healthy scans, run the backward process again from ``t_L`` re-noising
only the masked latents (the others are the scan's own, noised to each step), and decode the result: the healthy
image, compared with the scan as for every method (``medidiff.anomaly.maps``). Here, per image ``x`` and noise
seed:

1. ``z = scale * codes(x)`` (``medidiff.nets.LatentCodec``; ``scale`` from the latent model's ``model.json``);
2. ``z_t = alpha(t_L) z + sigma(t_L) eps``; a DDIM pass (``ddim``; ``ddpm``: the ancestral pass) of ``steps``
   steps from ``t_L``; its ``x0`` predictions at every step are averaged into ``z_bar``;
3. the latent score ``s = mean_c |z_bar - z|`` per latent position (the mean over the code's channels);
4. the mask ``m = s > T``: ``T`` is a per-position threshold map calibrated on healthy scans
   (``calibrate_thresholds``: the ``latent_quantile`` of ``s`` per latent position over every healthy image and
   seed; ``medidiff detect`` makes one from ``calibration`` scans, or reads ``latent_thresholds``). **Without a
   map**, a per-scan rule is used instead: ``T`` is the ``latent_quantile`` of ``s`` over all latents of the images
   reconstructed together (a 2D model's slices of one scan, which ``detect`` passes together, or a 3D model's
   volume), so the highest ``1 - latent_quantile`` share of every scan's latents is always re-denoised, anomalous
   or not; calibrate a map for real use;
5. ``z_hat = masked_ddim(z_t, known=z, keep=~m)`` (``medidiff.core.samplers.masked_ddim``): the same grid from the
   same ``z_t``, the unmasked latents replaced by ``z`` noised to each step, so they end exactly as ``z``;
6. the healthy image ``decode(z_hat)`` (the latents snapped to their nearest codes, then decoded).

``n_samples`` seeds are reduced by ``reduce`` as for ``partial``. Network evaluations: ``2 k`` per seed and level for
``k`` steps (the VQ-VAE's encoding and decoding are not counted).

What differs from the paper: the backward passes run on a few-step DDIM grid from ``t_L`` (the paper steps through
its DDPM's Markov chain), the latent score is the mean absolute difference between the averaged ``x0`` predictions
and the input's latents, the thresholds are per-position quantiles over healthy calibration images (with the
per-scan fallback above when none are given), the masked latents are re-denoised without RePaint's resampling
jumps, and the VQ-VAE is MONAI's (trained here with an L1 or L2 reconstruction loss, no perceptual or adversarial
loss). The VQ-VAE's own reconstruction error is part of the residual everywhere, as in the paper.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from medidiff.core import ensemble, samplers
from medidiff.core.noise import gaussian_like
from medidiff.core.precision import Autocast
from medidiff.core.processes import Process
from medidiff.nets import LatentCodec

from .config import HealthyOptions

__all__ = ["LATENT_THRESHOLDS_FILE", "open_codec", "latent_scores", "latent_mask", "latent_healthy",
           "calibrate_thresholds", "save_thresholds", "load_thresholds"]

#: The threshold map ``medidiff detect`` calibrates into its output folder.
LATENT_THRESHOLDS_FILE = "latent_thresholds.safetensors"
#: The samplers of the latent passes and their DDIM noise scale.
_ETA = {"ddim": 0.0, "ddpm": 1.0}


@functools.lru_cache(maxsize=4)
def _load_vqvae(path: str, stamp: tuple[int, int], device: str):
    from medidiff.weights import load_autoencoder

    return load_autoencoder(path, device)


def open_codec(opts: HealthyOptions, info: Any, device: torch.device | str = "cpu") -> tuple[LatentCodec, str]:
    """The latent model's VQ-VAE as a codec: ``opts.autoencoder``, else the path its ``model.json`` records.

    Args:
        opts: the options (``autoencoder``).
        info: the latent denoiser's ``ModelInfo`` (its ``autoencoder`` record: path, SHA-256, scale).
        device: where the VQ-VAE runs.

    Returns:
        ``(codec, sha256)``.

    Raises:
        ValueError: the model is not a latent denoiser, or the VQ-VAE is not the one it was trained on.
        ModelError: the file is missing, unsafe, corrupt or not a VQ-VAE.
    """
    from medidiff.weights import model_paths

    record = getattr(info, "autoencoder", None)
    if record is None:
        raise ValueError("method: latent needs a latent diffusion model (trained with training.autoencoder, e.g. "
                         "recipes/latent_brain_2d.yaml); this model has no autoencoder")
    path = str(opts.autoencoder or record.path)
    weights = model_paths(path)[0]
    stat = weights.stat() if weights.is_file() else None
    vqvae, _, digest = _load_vqvae(path, (stat.st_mtime_ns, stat.st_size) if stat else (0, 0), str(device))
    if digest != record.sha256:
        raise ValueError(f"autoencoder: {path} (SHA-256 {digest[:12]}...) is not the VQ-VAE the model was trained on "
                         f"({record.name}, SHA-256 {record.sha256[:12]}...)")
    return LatentCodec(vqvae, record.scale), digest


def _eta(opts: HealthyOptions) -> float:
    if opts.sampler not in _ETA:
        raise ValueError(f"sampler: method latent runs ddim or ddpm passes, not {opts.sampler!r}")
    return _ETA[opts.sampler]


def latent_scores(denoiser, z: torch.Tensor, process: Process, steps: int, t_start: float, generator,
                  eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-3: the latent score of each latent position and the noised latents it started from.

    Args:
        denoiser: the latent denoiser.
        z: the input's latents ``(B, C, *grid)``.
        process: its process.
        steps: grid steps from ``t_start``.
        t_start: ``t_L`` (a grid time of the process).
        generator: one ``torch.Generator`` or one per latent (the noise of ``z_t``, then of a ``ddpm`` pass).
        eta: 0 (DDIM) or 1 (ancestral).

    Returns:
        ``(score, z_t)``: ``mean_c |z_bar - z|`` ``(B, 1, *grid)`` with ``z_bar`` the mean of the pass's ``x0``
        predictions, and ``z_t``.
    """
    eps = gaussian_like(z, generator)
    z_t = process.noised(z, torch.full((z.shape[0],), t_start, dtype=z.dtype, device=z.device), eps)
    predictions: list[torch.Tensor] = []
    samplers.ddim(denoiser, z_t, process, steps, t_start=t_start, eta=eta, generator=generator,
                  callback=lambda info: predictions.append(info["x0_hat"]))
    z_bar = torch.stack(predictions).mean(dim=0)
    return (z_bar - z).abs().mean(dim=1, keepdim=True), z_t


def latent_mask(score: torch.Tensor, thresholds: torch.Tensor | None = None, quantile: float = 0.95) -> torch.Tensor:
    """Step 4: the anomalous latents, ``score > T``.

    Args:
        score: latent scores ``(B, 1, *grid)`` (of one scan's images without a map).
        thresholds: the calibrated per-position map ``(1, *grid)``; ``None``: the per-scan rule, ``T`` the
            ``quantile`` of all of ``score``.
        quantile: the per-scan rule's quantile.

    Returns:
        A bool mask shaped like ``score``.

    Raises:
        ValueError: a map of another grid.
    """
    if thresholds is None:
        return score > torch.quantile(score.flatten().float(), quantile).to(score.dtype)
    if tuple(thresholds.shape[-(score.ndim - 2):]) != tuple(score.shape[2:]):
        raise ValueError(f"latent_thresholds: a map of grid {list(thresholds.shape[1:])} for latents of grid "
                         f"{list(score.shape[2:])}; calibrate it with this model on images of its size")
    return score > thresholds.to(score.device, score.dtype)


def _prepare(denoiser, x: torch.Tensor, opts: HealthyOptions, codec: LatentCodec | None, process: Process | None):
    if codec is None:
        raise ValueError("method: latent needs the model's VQ-VAE (medidiff.anomaly.latent.open_codec)")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, *spatial) with 2 or 3 spatial dims, got {x.ndim} dims")
    process = process if process is not None else denoiser.process
    z = codec.encode(x.clamp(-1.0, 1.0).float())
    return Autocast(denoiser, opts.bf16), process, z, _eta(opts)


def _level(process: Process, opts: HealthyOptions, t_level: float) -> tuple[int, float]:
    from .healthy import sampler_steps

    steps = sampler_steps(process, opts.sampler, opts.steps, float(t_level))
    return steps, float(process.snap(torch.tensor([float(t_level)], dtype=torch.float64))[0])


def _scores(denoiser, z, process, opts, steps, t_start, eta, *, seed, stream, progress) -> torch.Tensor:
    """Every (seed, image)'s latent score: ``(n_samples, B, 1, *grid)``."""

    def members(items, _members, gens):
        return latent_scores(denoiser, z.index_select(0, items.to(z.device)), process, steps, t_start, gens, eta)[0]

    return ensemble.run_members(members, z.shape[0], opts.n_samples, seed=seed, stream=stream,
                                batch_size=opts.batch_size, device=z.device, progress=progress, desc="latent scores")


def latent_healthy(denoiser, x: torch.Tensor, opts: HealthyOptions, *, codec: LatentCodec | None,
                   thresholds: torch.Tensor | None = None, seed: int = 0, process: Process | None = None,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Healthy images by latent masked re-denoising (steps 1-6 of the module docstring).

    Args:
        denoiser: the latent denoiser.
        x: images ``(B, C, *spatial)`` on the model's scale (clipped to ``[-1, 1]`` before encoding); without a
            threshold map, the images of one scan (the per-scan rule).
        opts: the options (``t_levels``, ``steps``, ``sampler``, ``n_samples``, ``reduce``, ``spread``,
            ``latent_quantile``...).
        codec: the VQ-VAE (:func:`open_codec`).
        thresholds: the per-position threshold map ``(1, *grid)`` (default: ``opts.latent_thresholds`` when set,
            else the per-scan rule).
        seed: base seed; image ``i``, level ``j``, sample ``k`` use ``member_seed(seed, j, k, i)``.
        process: the latent process (default: ``denoiser.process``).
        progress: show progress bars.

    Returns:
        ``(healthy, spread)`` shaped like ``x``, as ``medidiff.anomaly.healthy.reconstruct_healthy``.
    """
    denoiser, process, z, eta = _prepare(denoiser, x, opts, codec, process)
    if thresholds is None and opts.latent_thresholds is not None:
        thresholds = load_thresholds(opts.latent_thresholds)[0]
    centres, spreads = [], []
    for level, t_level in enumerate(opts.t_levels):
        steps, t_start = _level(process, opts, t_level)
        scores = _scores(denoiser, z, process, opts, steps, t_start, eta, seed=seed, stream=level, progress=progress)
        if thresholds is None:  # the per-scan rule: each seed's scores over all the images
            masks = torch.stack([latent_mask(s, None, opts.latent_quantile) for s in scores])
        else:
            masks = latent_mask(scores.flatten(0, 1), thresholds).reshape(scores.shape)

        def members(items, which, gens, steps=steps, t_start=t_start, masks=masks):
            latents = z.index_select(0, items.to(z.device))
            eps = gaussian_like(latents, gens)  # the same z_t as the scoring pass: the same generators' first draw
            z_t = process.noised(latents, torch.full((len(items),), t_start, dtype=z.dtype, device=z.device), eps)
            mask = masks[which.to(masks.device), items.to(masks.device)]
            z_hat = samplers.masked_ddim(denoiser, z_t, process, steps, known=latents, keep=~mask, t_start=t_start,
                                         eta=eta, generator=gens)
            return codec.decode(z_hat).to(x.dtype)

        out = ensemble.run_members(members, x.shape[0], opts.n_samples, seed=seed, stream=level,
                                   batch_size=opts.batch_size, device=x.device, progress=progress, desc="latent")
        centres.append(ensemble.reduce(out, opts.reduce))
        spreads.append(ensemble.spread(out, opts.spread))
    return torch.stack(centres).mean(dim=0), torch.stack(spreads).mean(dim=0)


def calibrate_thresholds(denoiser, images: list[torch.Tensor], opts: HealthyOptions, *, codec: LatentCodec,
                         seed: int = 0, process: Process | None = None, progress: bool = False
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The per-position threshold map of healthy images: the ``latent_quantile`` of the latent score of every
    image, seed and level at each latent position.

    Args:
        denoiser: the latent denoiser.
        images: healthy images, batches ``(B, C, *spatial)`` of one grid (e.g. each scan's slices).
        opts: the options of detection (the map holds for these ``t_levels``, ``steps``, ``sampler``).
        codec: the VQ-VAE.
        seed: base seed (batch ``b`` uses ``seed + b``).
        process: the latent process (default: ``denoiser.process``).
        progress: show progress bars.

    Returns:
        ``(thresholds (1, *grid), record)``: the map and what it was made with (saved beside it).
    """
    scores = []
    for b, x in enumerate(images):
        den, proc, z, eta = _prepare(denoiser, x, opts, codec, process)
        for level, t_level in enumerate(opts.t_levels):
            steps, t_start = _level(proc, opts, t_level)
            scores.append(_scores(den, z, proc, opts, steps, t_start, eta, seed=seed + b, stream=level,
                                  progress=progress).flatten(0, 1).cpu())
    if not scores:
        raise ValueError("latent_thresholds: no healthy image to calibrate on")
    stacked = torch.cat(scores).float()  # (N, 1, *grid)
    thresholds = torch.quantile(stacked.flatten(1), opts.latent_quantile, dim=0).reshape(stacked.shape[1:])
    record = {"quantile": opts.latent_quantile, "n_scores": len(stacked), "t_levels": list(opts.t_levels),
              "steps": opts.steps, "sampler": opts.sampler, "n_samples": opts.n_samples, "seed": seed}
    return thresholds, record


def save_thresholds(path: str | Path, thresholds: torch.Tensor, record: dict[str, Any]) -> Path:
    """Write a threshold map as safetensors (tensor ``thresholds``, the record as JSON in the metadata)."""
    from safetensors.torch import save

    from medidiff.outputs import atomic_write

    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_bytes(save({"thresholds": thresholds.detach().float().cpu().contiguous()},
                             metadata={"record": json.dumps(record, sort_keys=True)}))
    return path


def load_thresholds(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """A threshold map written by :func:`save_thresholds` (read with safetensors, never unpickled).

    Raises:
        ModelError: the file is missing, not safetensors or fails its recorded checksum.
        ValueError: it holds no ``thresholds`` tensor.
    """
    from safetensors import safe_open

    from medidiff.weights import check_weights_file

    check_weights_file(path)
    with safe_open(str(path), framework="pt") as f:
        if "thresholds" not in f.keys():
            raise ValueError(f"latent_thresholds: {path} holds no threshold map")
        record = json.loads((f.metadata() or {}).get("record", "{}"))
        return f.get_tensor("thresholds"), record
