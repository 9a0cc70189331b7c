"""The one training engine for every task: a network, a process and a dataset in; weights out.

``fit`` trains a denoiser on a ``Dataset`` of dicts ``{"image": (C, *spatial) in [-1, 1], optional
"cond": (Cc, *spatial)}`` with the denoising loss of ``medidiff.core.losses`` (or the segmentation loss of a
deterministic network, or the cross entropy of a noise-aware classifier on items with an int ``"class"``:
``training.objective``, ``medidiff.train_objectives``; or a VQ-VAE's reconstruction and commitment loss). With a
frozen autoencoder (``codec``: latent diffusion, ``training.autoencoder``) the denoiser learns the codes of the
images, encoded batch by batch on the device (augmentations act on the images), and sample images are decoded. A
class-conditional U-Net is trained on items with a ``"class"`` too, each replaced by the null class with
probability ``training.class_dropout``. It does AdamW with linear warm-up then a cosine or constant learning rate,
gradient clipping and accumulation, bf16 autocast on CUDA, EMA, a validation loss at fixed times and noise, sample
images, TensorBoard, a progress bar, atomic checkpoints and exact resume, and DDP under ``torchrun`` (rank 0 does
the I/O).

Exact resume: the data order is a function of ``(seed, epoch)`` (``DistributedSampler``), the times
and noise of step ``s`` on rank ``r`` come from a generator seeded with ``(seed, r, s)``, and checkpoints
hold the model, EMA, optimizer, scheduler, scaler, the global RNG states of every rank and the position
in the epoch. ``run_recipe`` is the ``train`` task: it builds data, network and process from a recipe.

Beside it: ``train_config`` (the ``training`` section, the learning-rate schedule, ``TrainResult``),
``train_checkpoints`` (checkpoint files) and ``train_data`` (datasets, the batch stream); re-exported here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .core import noise as core_noise
from .core.denoiser import Denoiser
from .core.ema import EMA
from .core.processes import Process
from .errors import RecipeError, TrainingError
from .outputs import atomic_write, write_table
from .runtime import derived_seed, init_distributed, resolve_device, rng_state, seed_everything, set_rng_state
from .train_checkpoints import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    check_resumable,
    checkpoint_paths,
    find_checkpoint,
    weights_checksum,
    write_checkpoint,
)
from .train_config import TrainingConfig, TrainResult, lr_factor
from .train_data import BatchStream, checked_data_prep
from .train_objectives import check_objective, objective_loss
from .weights import WEIGHTS_NAME, model_paths, save_model

__all__ = [
    "TrainingConfig",
    "TrainResult",
    "fit",
    "run_recipe",
    "lr_factor",
    "find_checkpoint",
    "weights_checksum",
    "CHECKPOINT_DIR",
    "PAUSE_ENV",
]

log = logging.getLogger("medidiff.train")

#: Test hook: after writing the checkpoint of this step, rank 0 sleeps (so a test can kill it there).
PAUSE_ENV = "MEDIDIFF_TEST_PAUSE_AFTER_STEP"

_Batches = BatchStream  # the batch stream's earlier name, still importable from here


# -- pure pieces -----------------------------------------------------------------------------------
def _draw_noise(x0: torch.Tensor, kind: str, generator: torch.Generator, options: dict) -> torch.Tensor:
    return core_noise.noise_like(x0, kind, generator, **options)


def _write_png(path: Path, image: torch.Tensor) -> None:
    from matplotlib import image as mpimg  # no pyplot: the caller's backend is left alone

    buf = io.BytesIO()
    mpimg.imsave(buf, image.float().clamp(-1, 1).cpu().numpy(), cmap="gray", vmin=-1, vmax=1, format="png")
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _grid(x: torch.Tensor) -> torch.Tensor:
    """First channel of each image (middle slice along the last axis in 3D), side by side: ``(H, N * W)``."""
    x = x[:, 0]
    while x.ndim > 3:
        x = x.select(-1, x.shape[-1] // 2)
    return torch.cat(list(x), dim=-1)


# -- the engine ------------------------------------------------------------------------------------
class _Engine:
    """One training run; ``fit`` builds and runs it. Methods are the stages of a step."""

    def __init__(self, net: nn.Module, process: Process, train_set: Dataset, *, config: TrainingConfig,
                 out_dir: Path, prediction: str, val_set: Dataset | None, seed: int, device: torch.device,
                 data_prep: dict | None, extra_meta: dict | None, num_workers: int, codec: nn.Module | None = None):
        self.cfg, self.out_dir, self.prediction = config, out_dir, prediction
        self.num_workers = num_workers
        self.process, self.seed, self.device = process, seed, device
        self.train_set, self.val_set = train_set, val_set
        self.data_prep, self.extra_meta = checked_data_prep(data_prep), dict(extra_meta or {})
        cuda = device.type == "cuda"
        precision = config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32")
        if precision == "fp16" and not cuda:
            raise TrainingError("precision fp16 needs CUDA", where="training.precision", fix="use auto or fp32.")
        self.dist = init_distributed(device)
        self.main = self.dist.is_main
        self.net = net.to(device)
        self.codec = None if codec is None else codec.to(device).eval()  # frozen: images -> latents
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if cuda and config.channels_last:
            self.net.to(memory_format=torch.channels_last if net.config["spatial_dims"] == 2
                        else torch.channels_last_3d)
        module: nn.Module = self.net
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(self.net, device_ids=[device.index] if cuda else None)
        self.ddp = module if self.dist.active else None
        if config.compile:
            module = torch.compile(module)
        self.denoiser = Denoiser(module, process, prediction)
        self.null_class = getattr(net, "null_class", None)  # a class-conditional U-Net's
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=config.lr, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_factor, warmup=config.lr_warmup_steps, total=config.steps,
                                    schedule=config.lr_schedule, min_ratio=config.lr_min_ratio))
        self.ema = EMA(self.net, config.ema_decay, config.ema_warmup) if config.ema_decay is not None else None
        self.step = 0
        self.history: dict[str, list] = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": [],
                                         "val_loss_ema": []}
        self.last_checkpoint: Path | None = None
        self.writer = None

    # ---- state ----
    def _gather(self, obj: Any) -> list:
        if not self.dist.active:
            return [obj]
        out = [None] * self.dist.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def _state(self, batches: BatchStream, rngs: list) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": batches.epoch,
            "position": batches.position,
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "net_config": self.net.config,
            "process": self.process.config(),
            "prediction": self.prediction,
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rngs,
            "history": self.history,
        }

    def restore(self, path: Path, state: dict) -> tuple[int, int]:
        """Load a checkpoint; returns ``(epoch, position)`` of the data stream."""
        check_resumable(state, {"net_config": self.net.config, "process": self.process.config(),
                                "prediction": self.prediction}, path)
        self.net.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank], self.device)
        else:
            log.warning("checkpoint has RNG states for %d processes, this run has %d: reseeding",
                        len(rngs), self.dist.world_size)
            seed_everything(derived_seed(self.seed, self.dist.rank, state["step"]))
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return int(state["epoch"]), int(state["position"])

    def save_checkpoint(self, batches: BatchStream) -> None:
        rngs = self._gather(rng_state(self.device))
        if not self.main:
            return
        path = write_checkpoint(self.out_dir, self.step, self._state(batches, rngs), self.cfg.keep_checkpoints)
        self.last_checkpoint = path
        self.save_weights()
        self.write_history()
        log.info("checkpoint %s", path)

    def save_weights(self) -> Path:
        use_ema = self.ema is not None and self.cfg.save_ema
        extra = {
            "weights": "ema" if use_ema else "raw",
            "step": self.step,
            "noise": {"kind": self.cfg.noise, "options": self.cfg.noise_options},
            "loss_weighting": self.cfg.loss_weighting,
            "data_prep": self.data_prep,
            **self.extra_meta,
        }
        return save_model(self.out_dir, self.ema.shadow if use_ema else self.net, self.process, self.prediction, extra)

    def write_history(self) -> None:
        h = self.history
        vals = dict(zip(h["val_step"], zip(h["val_loss"], h["val_loss_ema"])))
        rows = []
        for s, loss, lr in zip(h["step"], h["loss"], h["lr"]):
            val, val_ema = vals.get(s, (None, None))
            rows.append({"step": s, "loss": loss, "lr": lr, "val_loss": val, "val_loss_ema": val_ema})
        write_table(rows, self.out_dir / "history.csv")

    # ---- one step ----
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _batch_loss(self, denoiser: Denoiser, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        x0 = batch["image"].to(self.device, non_blocking=True)
        if self.codec is not None:  # latent diffusion: the images' latents, in float32
            x0 = self.codec.encode(x0)
        cond = batch.get("cond")
        cond = None if cond is None else cond.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and self.cfg.channels_last:
            fmt = torch.channels_last if x0.ndim == 4 else torch.channels_last_3d
            x0 = x0.contiguous(memory_format=fmt)
        labels = batch.get("class")  # per-image classes, for a classifier or a class-conditional U-Net
        labels = None if labels is None else labels.to(self.device, non_blocking=True)
        t = self.process.sample_time(x0.shape[0], generator=generator, device=self.device)
        if self.cfg.max_time < 1.0:  # the loss on the lower times only (a classifier of the levels it guides)
            t = self.process.snap(t * self.cfg.max_time)
        eps = _draw_noise(x0, self.cfg.noise, generator, self.cfg.noise_options)
        with self._autocast():  # the class dropout is drawn after the times and the noise
            loss = objective_loss(self.cfg, denoiser, x0, cond, noise=eps, t=t, labels=labels,
                                  null_class=self.null_class, generator=generator)
        return loss, x0.shape[0]

    def train_step(self, batches: BatchStream) -> tuple[float, int]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss and images seen."""
        cfg = self.cfg
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        images = 0
        for micro in range(cfg.grad_accum_steps):
            g = torch.Generator(device=self.device).manual_seed(
                derived_seed(self.seed, self.dist.rank, self.step, micro))
            last = micro == cfg.grad_accum_steps - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                loss, n = self._batch_loss(self.denoiser, next(batches), g)
                scaled = loss / cfg.grad_accum_steps
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
            images += n
        total /= cfg.grad_accum_steps
        if self.dist.active:
            torch.distributed.all_reduce(total)
            total /= self.dist.world_size
        value = float(total)
        if not math.isfinite(value):
            self._fail(f"the training loss became {value} at step {self.step + 1}")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            if self.scaler is None and not torch.isfinite(norm):
                self._fail(f"the gradient norm became {float(norm)} at step {self.step + 1}")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net)
        self.step += 1
        return value, images * self.dist.world_size

    def _fail(self, what: str) -> None:
        last = self.last_checkpoint or (checkpoint_paths(self.out_dir) or [(0, None)])[0][1]
        kept = f" The last good checkpoint, {last}, is intact." if last else ""
        raise TrainingError(
            f"{what}; training stopped.{kept}", where=self.out_dir,
            fix=f"lower training.lr (now {self.cfg.lr:g}) or add training.lr_warmup_steps, keep training.grad_clip "
                "on, and check the data for NaN or Inf values; then resume with --resume.")

    # ---- evaluation ----
    @torch.no_grad()
    def validation_loss(self, net: nn.Module) -> float:
        """Mean loss over the validation set at times and noise fixed by the seed (comparable across steps)."""
        denoiser = Denoiser(net, self.process, self.prediction)
        was_training = net.training
        net.eval()
        loader = DataLoader(self.val_set, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.num_workers)
        total, count = 0.0, 0
        for j, batch in enumerate(loader):
            g = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, 0x7A1, j))
            loss, n = self._batch_loss(denoiser, batch, g)
            total, count = total + float(loss) * n, count + n
        net.train(was_training)
        return total / max(count, 1)

    def validate(self) -> None:
        if not (self.main and self.val_set is not None and len(self.val_set)):
            return
        loss = self.validation_loss(self.net)
        loss_ema = self.validation_loss(self.ema.shadow) if self.ema else loss
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(loss)
        self.history["val_loss_ema"].append(loss_ema)
        log.info("step %d validation loss %.5f (EMA %.5f)", self.step, loss, loss_ema)
        if self.writer:
            self.writer.add_scalar("val/loss", loss, self.step)
            self.writer.add_scalar("val/loss_ema", loss_ema, self.step)

    @torch.no_grad()
    def write_samples(self, shape: tuple[int, ...], cond: torch.Tensor | None) -> Path | None:
        if not self.main:
            return None
        from .core.samplers import ddim

        net = self.ema.shadow if self.ema else self.net
        denoiser = Denoiser(net, self.process, self.prediction, cond=cond)
        g = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, 0x5A3))
        x = self.process.prior_sample((self.cfg.sample_count, *shape), generator=g, device=self.device)
        with self._autocast():
            samples = ddim(denoiser, x, self.process, self.cfg.sample_steps, generator=g)
        if self.codec is not None:
            samples = self.codec.decode(samples.float())
        path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        grid = _grid(samples)
        _write_png(path, grid)
        if self.writer:
            self.writer.add_image("samples", ((grid + 1) / 2).clamp(0, 1)[None].float().cpu(), self.step)
        return path

    def _sample_inputs(self) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """The image shape of the sample grid and its conditioning (from the first training items)."""
        try:
            from .core.samplers import ddim  # noqa: F401
        except ImportError:
            raise TrainingError("sample images need medidiff.core.samplers.ddim, which is missing",
                                where="training.sample_every", fix="set training.sample_every: 0.") from None
        first = self.train_set[0]
        cond = None
        if "cond" in first:
            items = [self.train_set[i % len(self.train_set)] for i in range(self.cfg.sample_count)]
            cond = torch.stack([item["cond"] for item in items]).to(self.device)
        if self.codec is not None:  # the latents' shape
            return tuple(self.codec.encode(first["image"][None].float().to(self.device)).shape[1:]), cond
        return tuple(first["image"].shape), cond

    # ---- the loop ----
    def run(self) -> TrainResult:
        cfg = self.cfg
        epoch = position = 0
        found = find_checkpoint(self.out_dir) if cfg.resume else None
        if found is None and not cfg.resume and checkpoint_paths(self.out_dir):
            raise TrainingError("the output folder already holds checkpoints", where=self.out_dir,
                                fix="continue that run with --resume (training.resume: true), or use a new --out.")
        if found is not None:
            epoch, position = self.restore(*found)
            self.last_checkpoint = found[0]
        else:
            if cfg.resume:
                log.info("no checkpoint in %s: starting a new run", self.out_dir)
            seed_everything(derived_seed(self.seed, self.dist.rank))
        batches = BatchStream(self.train_set, cfg.batch_size, self.seed, self.dist, self.num_workers, epoch, position)
        sample_shape, sample_cond = self._sample_inputs() if cfg.sample_every else ((), None)
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1 if self.step else None)
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        pause = os.environ.get(PAUSE_ENV)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.main and cfg.progress))
        rate = None
        try:
            while self.step < end:
                tick = time.perf_counter()
                loss, images = self.train_step(batches)
                speed = images / max(time.perf_counter() - tick, 1e-9)
                rate = speed if rate is None else 0.9 * rate + 0.1 * speed
                lr = self.scheduler.get_last_lr()[0]
                self.history["step"].append(self.step)
                self.history["loss"].append(loss)
                self.history["lr"].append(lr)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", imgs_s=f"{rate:.1f}")
                if self.main and (self.step % cfg.log_every == 0 or self.step == end):
                    log.info("step %d/%d loss %.5f lr %.3g %.1f img/s", self.step, cfg.steps, loss, lr, rate)
                    if self.writer:
                        self.writer.add_scalar("train/loss", loss, self.step)
                        self.writer.add_scalar("train/lr", lr, self.step)
                        self.writer.add_scalar("train/imgs_per_s", rate, self.step)
                if (cfg.val_every and self.step % cfg.val_every == 0) or self.step == cfg.steps:
                    self.validate()
                if cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == cfg.steps):
                    self.write_samples(sample_shape, sample_cond)
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == end:
                    self.save_checkpoint(batches)
                    if self.main and pause is not None and int(pause) == self.step:
                        time.sleep(3600)  # the test that set PAUSE_ENV kills the process here
        finally:
            bar.close()
            if self.writer:
                self.writer.close()
        checksum = weights_checksum(self.net)
        sums = self._gather(checksum)
        if len(set(sums)) > 1:
            raise TrainingError(f"the {len(sums)} processes ended with different weights", where=self.out_dir,
                                fix="report this; check that every process runs the same recipe and data.")
        weights = self.out_dir / WEIGHTS_NAME if self.main else None
        return TrainResult(self.out_dir, self.step, self.history, weights, self.last_checkpoint, checksum,
                           self.dist.world_size, replica_checksums=list(sums))


def fit(
    net: nn.Module,
    process: Process,
    train_set: Dataset,
    *,
    config: TrainingConfig,
    out_dir: str | Path,
    prediction: str = "eps",
    val_set: Dataset | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    data_prep: dict | None = None,
    extra_meta: dict | None = None,
    num_workers: int = 0,
    codec: nn.Module | None = None,
) -> TrainResult:
    """Train ``net`` as a denoiser of ``process`` on ``train_set``.

    Works alike in one process and under ``torchrun`` (DDP; rank 0 writes the files). Writes into
    ``out_dir``: ``checkpoints/step_*.pt``, ``model.safetensors`` and ``model.json``, ``history.csv``,
    ``samples/*.png`` and ``tb/`` as configured.

    Args:
        net: the network (``medidiff.nets.build_unet``), initialised identically on every rank.
        process: the forward process.
        train_set: items ``{"image": (C, *spatial), optional "cond": (Cc, *spatial)}`` in ``[-1, 1]``.
        config: the ``training`` section.
        out_dir: the run's folder.
        prediction: the network's parametrisation.
        val_set: held-out items for the validation loss.
        seed: the run's seed (data order, times, noise).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:i`` (or a ``torch.device``).
        data_prep: how the data was prepared, saved in ``model.json``.
        extra_meta: further entries for ``model.json``.
        num_workers: data-loader worker processes.
        codec: latent diffusion: a frozen ``medidiff.nets.LatentCodec``; ``net`` is trained on
            ``codec.encode(image)`` and the sample images are ``codec.decode(sample)``.

    Returns:
        The run's ``TrainResult``.

    Raises:
        TrainingError: a NaN/Inf loss (the last good checkpoint is kept), a mismatched checkpoint on
            resume, or checkpoints in ``out_dir`` without ``resume``.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    out_dir = Path(out_dir)
    engine = _Engine(net, process, train_set, config=config, out_dir=out_dir, prediction=prediction,
                     val_set=val_set, seed=seed, device=device, data_prep=data_prep, extra_meta=extra_meta,
                     num_workers=num_workers, codec=codec)
    try:
        result = engine.run()
        if engine.main:
            result.outputs = [out_dir / WEIGHTS_NAME, out_dir / "model.json"]
            if result.checkpoint:
                result.outputs.append(result.checkpoint)
        return result
    finally:
        engine.dist.close()


def run_recipe(recipe: Any, out_dir: str | Path) -> TrainResult:
    """The ``train`` task: build data, network and process from a recipe and ``fit``.

    Args:
        recipe: a validated ``medidiff.recipes.Recipe``.
        out_dir: the run's folder.

    Returns:
        The ``TrainResult`` (its ``inputs`` attribute lists the input files read).
    """
    from .train_data import build_data

    bundle = build_data(recipe.data, recipe.seed)
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    extra: dict[str, Any] = {}
    codec = None
    if recipe.training.objective == "classification":  # the encoder half of the model section's U-Net
        from .train_classifier import classifier_network

        net, extra = classifier_network(recipe.model, recipe.data.spatial_dims, bundle)
    else:
        if recipe.training.autoencoder:  # latent diffusion on a frozen VQ-VAE's codes
            codec, extra["autoencoder"] = latent_codec(recipe.training.autoencoder, recipe.data, bundle)
        net, more = _denoiser_network(recipe, bundle, channels=codec.vqvae.embedding_dim if codec else None)
        extra.update(more)
        if recipe.training.objective == "vqvae":
            extra["task"] = "autoencoder"
    check_objective(recipe.training.objective, net.config, bundle.cond_channels,
                    class_dropout=recipe.training.class_dropout)
    init = recipe.training.init_from
    if init:
        extra["init_from"] = initial_weights(net, init, recipe.model.prediction)
    init_file = [model_paths(init)[0]] if init else []
    result = fit(net, recipe.process.build(), bundle.train, config=recipe.training, out_dir=out_dir,
                 prediction=recipe.model.prediction, val_set=bundle.val, seed=recipe.seed, device=recipe.device,
                 data_prep=bundle.data_prep, extra_meta=extra or None, num_workers=recipe.data.num_workers,
                 codec=codec)
    autoencoder = [model_paths(recipe.training.autoencoder)[0]] if recipe.training.autoencoder else []
    result.inputs = bundle.inputs + init_file + autoencoder
    return result


#: How many training images the latent scale of latent diffusion is estimated on.
LATENT_SCALE_IMAGES = 64


def latent_codec(path: str | Path, data: Any, bundle: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen VQ-VAE of latent diffusion (``training.autoencoder``) and its record for ``model.json``.

    The latents are the codes times ``scale``, one over the codes' standard deviation on the first
    ``LATENT_SCALE_IMAGES`` training images (Rombach et al. 2022's scale factor), so that the process's unit-variance
    noise fits them.

    Args:
        path: the VQ-VAE's weights.
        data: the recipe's ``data`` section.
        bundle: the data (its images are encoded).

    Returns:
        ``(codec, record)``: the ``medidiff.nets.LatentCodec`` and the ``AutoencoderInfo`` entries.

    Raises:
        ModelError: the file is missing, unsafe, corrupt or not a VQ-VAE.
        RecipeError: it does not fit the data (dimensions, channels, a size its levels do not divide, conditioning).
    """
    from .nets import LatentCodec
    from .weights import load_autoencoder

    vqvae, info, digest = load_autoencoder(path)
    where = "training.autoencoder"
    if vqvae.spatial_dims != data.spatial_dims or int(vqvae.config["in_channels"]) != bundle.channels:
        raise RecipeError(f"the VQ-VAE {path} encodes {vqvae.config['in_channels']}-channel {vqvae.spatial_dims}D "
                          f"images, the data are {bundle.channels}-channel {data.spatial_dims}D", where=where,
                          fix="train the VQ-VAE on the same data section.")
    if bundle.cond_channels:
        raise RecipeError("latent diffusion here models images alone, without conditioning channels", where=where,
                          fix="use an unlabelled image source (e.g. sample:brain).")
    if any(int(s) % vqvae.factor for s in data.size):
        raise RecipeError(f"data.size {list(data.size)} is not divisible by the VQ-VAE's factor {vqvae.factor}",
                          where="data.size", fix=f"use a size divisible by {vqvae.factor}.")
    n = min(len(bundle.train), LATENT_SCALE_IMAGES)
    images = torch.stack([bundle.train[i]["image"] for i in range(n)]).float()
    codes = vqvae.encode(images)
    std = float(codes.std())
    if not (math.isfinite(std) and std > 0):
        raise RecipeError(f"the codes of {path} do not vary on the training images (std {std})", where=where,
                          fix="train the VQ-VAE longer, or check it was trained on these data.")
    weights = model_paths(path)[0]
    record = {"name": weights.name, "path": str(path), "sha256": digest, "scale": 1.0 / std,
              "embedding_dim": vqvae.embedding_dim, "factor": vqvae.factor, "step": info.step}
    return LatentCodec(vqvae, 1.0 / std), record


def _denoiser_network(recipe: Any, bundle: Any, channels: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The ``model`` section's network for the data (``channels``: a latent denoiser's image channels), and what
    it adds to ``model.json`` (a class-conditional U-Net's class names, its null class last: ``classes`` then
    ``null``)."""
    classes: list[str] = []
    if recipe.model.class_conditional:
        if recipe.training.objective != "denoising":
            raise RecipeError("model.class_conditional is a denoiser's conditioning", where="model.class_conditional",
                              fix="use training.objective: denoising, or set model.class_conditional: false.")
        classes = list((bundle.data_prep.get("labels") or {}).get("classes") or [])
        if not classes or not isinstance(bundle.train[0].get("class"), (int, torch.Tensor)):
            raise RecipeError("model.class_conditional needs images labelled with classes", where="data.source",
                              fix="use data.source: sample:lesion_classes.")
    net = recipe.model.build(spatial_dims=recipe.data.spatial_dims, in_channels=channels or bundle.channels,
                             cond_channels=bundle.cond_channels, classes=len(classes))
    return net, ({"classes": [*classes, "null"]} if classes else {})


def initial_weights(net: nn.Module, path: str | Path, prediction: str) -> dict:
    """Load a saved model's weights into ``net`` (``training.init_from``: fine-tuning).

    A class-conditional U-Net may start from the same U-Net without classes (its class embeddings at zero, so every
    class begins as the saved model); a noise-aware classifier from a diffusion U-Net of its levels (the encoder)
    or from a classifier of the same network (every weight: a curriculum's next stage).

    Args:
        net: the recipe's network, freshly built.
        path: the saved model (checked and loaded without unpickling, ``medidiff.weights.load_checked``).
        prediction: the recipe's parametrisation, which the saved model must share.

    Returns:
        The record for ``model.json``: the weights file's name, its SHA-256 and its training step (and the
        zero-initialised class embeddings, or the encoder parts loaded).

    Raises:
        ModelError: the file is missing, unsafe or corrupt.
        TrainingError: its network or prediction differs from the recipe's.
    """
    import torch

    from .weights import load_checked

    denoiser, info, digest = load_checked(path)
    if net.config.get("arch") == "classifier" and info.net.get("arch") == "classifier":
        return _classifier_weights(net, denoiser.net, info, path, digest)
    if net.config.get("arch") == "classifier":
        return _encoder_weights(net, denoiser.net, info, path, digest)
    ours = dict(net.config)
    # a class-conditional network may start from an unconditional one: its class embeddings start at zero, so
    # every class begins as the saved model (Sanchez et al.'s counterfactual model fine-tuned from a healthy one)
    added = "num_class_embeds" in ours and "num_class_embeds" not in info.net
    if added:
        ours.pop("num_class_embeds")
    if not _same_json(info.net, ours):
        raise TrainingError(f"the network of {path} differs from the recipe's model section",
                            where="training.init_from",
                            fix="copy the saved model's network settings (its .json 'net') into the recipe's "
                                "model section.")
    if info.prediction != prediction:
        raise TrainingError(f"{path} predicts {info.prediction!r}, the recipe {prediction!r}",
                            where="training.init_from", fix=f"set model.prediction: {info.prediction}.")
    missing, unexpected = net.load_state_dict(denoiser.net.state_dict(), strict=not added)
    new = sorted(missing)
    if added:
        if unexpected or not new or any(".class_embedding." not in f".{k}" for k in new):
            raise TrainingError(f"the weights of {path} do not fit the recipe's network "
                                f"(missing {new}, unexpected {sorted(unexpected)})", where="training.init_from",
                                fix="start from a model with the recipe's network settings.")
        with torch.no_grad():
            for key in new:
                net.get_parameter(key).zero_()
    record = {"name": model_paths(path)[0].name, "sha256": digest, "step": info.step}
    return record | ({"zero_initialised": new} if added else {})


#: The parts of a diffusion U-Net a noise-aware classifier shares (``medidiff.nets.Classifier``).
ENCODER_PARTS = ("time_embed", "conv_in", "down_blocks", "middle_block")


def _classifier_weights(classifier, saved, info, path, digest: str) -> dict:
    """A classifier's every weight from a saved classifier of the same network (a curriculum's next stage).

    Raises:
        TrainingError: the saved classifier's network differs from the recipe's.
    """
    if not _same_json(info.net, dict(classifier.config)):
        raise TrainingError(f"the classifier of {path} differs from the recipe's model section",
                            where="training.init_from",
                            fix="copy the saved classifier's network settings (its .json 'net') into the recipe.")
    classifier.load_state_dict(saved.state_dict())
    return {"name": model_paths(path)[0].name, "sha256": digest, "step": info.step}


def _encoder_weights(classifier, unet, info, path, digest: str) -> dict:
    """A classifier's encoder loaded from a saved diffusion U-Net of the same levels (its head starts fresh).

    Raises:
        TrainingError: the saved model is not a U-Net, or its levels differ from the classifier's.
    """
    shared = ("spatial_dims", "in_channels", "channels", "attention_levels", "num_res_blocks", "num_head_channels",
              "norm_num_groups", "resblock_updown")
    differs = [k for k in shared if not _same_json(info.net.get(k), classifier.config.get(k))]
    if info.net.get("arch", "diffusion_unet") != "diffusion_unet" or info.net.get("cond_channels") or differs:
        raise TrainingError(f"the classifier's encoder does not fit the network of {path} "
                            f"({', '.join(differs) or 'not an unconditioned diffusion U-Net'})",
                            where="training.init_from",
                            fix="give the classifier the saved U-Net's level settings (its .json 'net').")
    state = {k[len("net."):]: v for k, v in unet.state_dict().items()
             if k.startswith("net.") and k[len("net."):].split(".")[0] in ENCODER_PARTS}
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise TrainingError(f"the encoder weights of {path} do not fit the classifier (missing {sorted(missing)}, "
                            f"unexpected {sorted(unexpected)})", where="training.init_from",
                            fix="start from a diffusion U-Net with the classifier's level settings.")
    return {"name": model_paths(path)[0].name, "sha256": digest, "step": info.step, "parts": list(ENCODER_PARTS)}


def _same_json(a, b) -> bool:
    """Whether two config values are equal as JSON writes them (tuples and lists alike)."""
    import json

    return json.dumps(a, sort_keys=True, default=list) == json.dumps(b, sort_keys=True, default=list)
