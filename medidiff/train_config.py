"""What a training run is told and what it returns: the ``training`` recipe section, the learning-rate
schedule (linear warm-up, then cosine or constant) and ``TrainResult``.

These are plain values, importable without the engine (``medidiff.train``), which re-exports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

__all__ = ["TrainingConfig", "TrainResult", "lr_factor"]


class TrainingConfig(BaseModel):
    """The ``training`` section of a recipe.

    Attributes:
        steps: optimizer steps in all.
        batch_size: images per micro-batch on each process.
        grad_accum_steps: micro-batches per optimizer step.
        lr: peak learning rate of AdamW.
        lr_schedule: ``cosine`` (decay to ``lr * lr_min_ratio``) or ``constant`` after the warm-up.
        lr_warmup_steps: steps of linear warm-up from 0.
        lr_min_ratio: final learning rate of the cosine, as a share of ``lr``.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        grad_clip: largest gradient norm (``null`` for no clipping).
        precision: ``auto`` (bf16 on CUDA, fp32 on a CPU), ``fp32``, ``bf16`` or ``fp16`` (CUDA, with a
            gradient scaler).
        ema_decay: EMA decay (``null`` for no EMA).
        ema_warmup: ramp the EMA decay up over the first steps.
        save_ema: write the EMA weights (not the raw ones) to ``model.safetensors``.
        objective: ``denoising`` (the diffusion loss; every diffusion model), ``segmentation`` (Dice + cross
            entropy of a deterministic segmentation network, ``model.arch: unet``) or ``classification`` (cross
            entropy of a noise-aware classifier of noised images against each image's class: the encoder half of
            the ``model`` section's U-Net with attention pooling, for classifier guidance; data with per-image
            classes such as ``sample:lesion_classes``; ``sample_every`` must be 0) or ``vqvae`` (a VQ-VAE,
            ``model.arch: vqvae``: the ``reconstruction_loss`` of its reconstruction plus the commitment loss
            MONAI's quantiser returns; ``sample_every`` must be 0); ``medidiff.train_objectives``.
        class_dropout: for a class-conditional model (``model.class_conditional``), the probability that an
            image's class is replaced by the null class in the denoising loss (classifier-free guidance: Ho &
            Salimans 2022's ``p_uncond``, 0.1-0.2 there; ``medidiff.core.cfg.drop_classes``).
        reconstruction_loss: ``vqvae``: ``l1`` (mean absolute) or ``l2`` (mean squared) error of the reconstruction.
        autoencoder: latent diffusion: a VQ-VAE's weights (trained with ``objective: vqvae``), frozen; the denoiser
            (``model``, with the VQ-VAE's ``embedding_dim`` channels) is trained on the codes of the data's images,
            scaled to unit variance (one over their standard deviation on the first training images); its
            ``model.json`` records the VQ-VAE's name, path, SHA-256 and scale (Pinaya et al. 2022's anomaly
            detection, ``anomaly.reconstruction.method: latent``). Sample images are decoded by the VQ-VAE.
        loss_weighting: ``uniform`` or ``min_snr``.
        min_snr_gamma: the Min-SNR clipping value.
        noise: training noise, ``gaussian`` or ``simplex``.
        noise_options: options of the noise (e.g. simplex octaves), passed to ``medidiff.core.noise``.
        log_every: steps between log lines and TensorBoard points.
        val_every: steps between validation losses (0: only at the end).
        sample_every: steps between sample images (0: none).
        sample_count: images per sample grid.
        sample_steps: DDIM steps for the sample images.
        checkpoint_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        resume: continue from the latest checkpoint in the output folder (start afresh if there is none).
        stop_after: end the run cleanly after this step (with a checkpoint), e.g. for time-limited jobs.
        max_time: draw the loss's times on ``(0, max_time]`` instead of ``(0, 1]`` (e.g. a noise-aware classifier
            of the levels guidance uses: ``t <= t_L``).
        init_from: start from the weights of a saved model (a ``.safetensors`` file with its ``.json``, or a
            run folder) instead of random ones: fine-tuning. Its network must be the recipe's (``model``)
            and its prediction the same; its name, SHA-256 and step are recorded in ``model.json``. A
            class-conditional U-Net may start from an unconditional one (its class embeddings at zero), and a
            noise-aware classifier from a diffusion U-Net of the same levels (its encoder; the head fresh) or from
            a classifier of the same network (every weight: the next stage of a curriculum).
        tensorboard: write TensorBoard logs to ``tb/``.
        progress: show a progress bar.
        compile: ``torch.compile`` the network (CUDA).
        channels_last: channels-last memory format on CUDA.
    """

    model_config = ConfigDict(extra="forbid")

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 8
    grad_accum_steps: PositiveInt = 1
    lr: PositiveFloat = 2e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_min_ratio: float = Field(0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: PositiveFloat | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    ema_decay: float | None = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = True
    save_ema: bool = True
    objective: Literal["denoising", "segmentation", "classification", "vqvae"] = "denoising"
    class_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    reconstruction_loss: Literal["l1", "l2"] = "l1"
    autoencoder: str | None = None
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: PositiveFloat = 5.0
    noise: Literal["gaussian", "simplex"] = "gaussian"
    noise_options: dict[str, Any] = Field(default_factory=dict)
    log_every: PositiveInt = 50
    val_every: int = Field(500, ge=0)
    sample_every: int = Field(0, ge=0)
    sample_count: PositiveInt = 4
    sample_steps: PositiveInt = 20
    checkpoint_every: int = Field(500, ge=0)
    keep_checkpoints: PositiveInt = 2
    resume: bool = False
    stop_after: PositiveInt | None = None
    init_from: str | None = None
    max_time: float = Field(1.0, gt=0.0, le=1.0)
    tensorboard: bool = True
    progress: bool = True
    compile: bool = False
    channels_last: bool = True

    @model_validator(mode="after")
    def _samples_need_a_denoiser(self) -> TrainingConfig:
        if self.objective == "classification" and self.sample_every:
            raise ValueError("a classifier makes no sample images: set sample_every: 0 with objective classification")
        if self.class_dropout and self.objective != "denoising":
            raise ValueError("class_dropout belongs to the denoising objective of a class-conditional model")
        if self.objective == "vqvae" and self.sample_every:
            raise ValueError("a VQ-VAE makes no sample images: set sample_every: 0 with objective vqvae")
        if self.autoencoder and self.objective != "denoising":
            raise ValueError("autoencoder belongs to the denoising objective of a latent diffusion model")
        return self


@dataclass
class TrainResult:
    """What ``fit`` leaves behind.

    Attributes:
        out_dir: the run's folder.
        step: the last step done.
        history: per-step ``step``, ``loss``, ``lr`` and the ``val_step``, ``val_loss``, ``val_loss_ema`` lists.
        weights: path of ``model.safetensors``.
        checkpoint: path of the last checkpoint.
        checksum: SHA-256 of the trained (raw) weights; under DDP every rank's is checked equal.
        world_size: number of processes that trained.
        outputs: files written (for the manifest's checksums; rank 0 only).
        inputs: input files read (set by ``run_recipe``).
        replica_checksums: every rank's ``checksum`` (all equal, or training fails).
    """

    out_dir: Path
    step: int
    history: dict[str, list]
    weights: Path | None
    checkpoint: Path | None
    checksum: str
    world_size: int = 1
    outputs: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)
    replica_checksums: list[str] = field(default_factory=list)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine decay or constant.

    Args:
        step: optimizer steps done so far.
        warmup: warm-up steps (the factor rises as ``(step + 1) / warmup``).
        total: all steps of the run.
        schedule: ``cosine`` or ``constant``.
        min_ratio: the cosine's final factor.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
