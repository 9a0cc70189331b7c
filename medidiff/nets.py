"""Network builders: MONAI's ``DiffusionModelUNet`` and ``UNet`` in 2D or 3D, configured by keyword arguments.

``build_unet`` returns a ``UNet`` module called as ``net(x, timesteps)`` whose ``config`` dictionary
(JSON-serialisable) rebuilds it with ``build_network(**config)``; that config is saved beside the weights.
Conditioning channels (``cond_channels``) are extra input channels: the denoiser concatenates them to
the noisy image. The time input is any float (``Process.net_time`` maps continuous ``t`` and VE
sigmas to the 0-1000 range the sinusoidal embedding is made for).

With ``num_class_embeds`` the U-Net is class-conditional, for classifier-free guidance (``medidiff.core.cfg``;
Sanchez et al. 2022's counterfactual anomaly detection): MONAI's class embedding (one learned vector per class,
added to the time embedding) and ``net(x, timesteps, class_labels)``. The last index is the null class (the
unconditional model; training replaces a class by it at random), used when no class is given. Sanchez et al.
condition through attention layers instead; the additive embedding is MONAI's built-in form, the one
Dhariwal & Nichol 2021 use. A config without ``num_class_embeds`` is an unconditional U-Net, as before.

``build_segmentation_unet`` wraps MONAI's deterministic ``UNet`` (Ronneberger et al. 2015; Kerfoot et al.
2018's residual units) in the same call signature (config ``arch: unet``): it ignores the noisy state
and the time, segments the conditioning image and returns class probabilities ``p`` as ``2 p - 1``, so it
is an ``x0``-denoiser whose estimate does not depend on ``x_t`` and runs through every sampler unchanged
(one step gives its segmentation).

``build_classifier`` (config ``arch: classifier``) is the noise-aware classifier of classifier guidance
(Wolleb et al. 2022, sec. 3; Dhariwal & Nichol 2021, sec. 4): the encoder half of the diffusion U-Net (its
time embedding, input convolution, down blocks and middle block, as MONAI's ``DiffusionModelUNet`` builds
them) with attention pooling (``AttentionPool``), called as ``net(x_t, timesteps) -> logits (B, classes)``.
MONAI's own ``DiffusionModelEncoder`` ends in a flattening fully connected head tied to one input size and
has no middle block, so it is not used.

``build_vqvae`` (config ``arch: vqvae``) is the autoencoder of latent diffusion (Pinaya et al. 2022's anomaly
detection): MONAI's ``VQVAE`` (van den Oord et al. 2017, with the EMA codebook), each level halving the grid
(stride 2, kernel 4). ``VQVAE.encode`` gives an image's codes (the codebook vectors, ``embedding_dim`` channels on
a grid ``2 ** levels`` times coarser), ``VQVAE.decode`` snaps latents to their nearest codes and decodes them.
The latent denoiser is ``build_unet`` with ``in_channels = embedding_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConfiguredNet", "UNet", "SegmentationUNet", "Classifier", "AttentionPool", "VQVAE", "LatentCodec",
           "build_unet", "build_segmentation_unet", "build_classifier", "build_vqvae", "build_network",
           "count_parameters"]


class ConfiguredNet(nn.Module):
    """A MONAI network with the build config that made it attached (``config``, saved in ``model.json``).

    Args:
        net: the MONAI network.
        config: the keyword arguments of the builder that made it.
    """

    def __init__(self, net: nn.Module, config: dict):
        super().__init__()
        self.net, self.config = net, dict(config)

    @property
    def spatial_dims(self) -> int:
        return int(self.config["spatial_dims"])


class UNet(ConfiguredNet):
    """A MONAI ``DiffusionModelUNet`` with its build config attached.

    Args:
        net: the MONAI network.
        config: the keyword arguments of ``build_unet`` that made it.
    """

    @property
    def null_class(self) -> int | None:
        """The null class of a class-conditional U-Net (its last class embedding), else ``None``."""
        n = int(self.config.get("num_class_embeds", 0))
        return n - 1 if n else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The network output; ``class_labels`` ``(B,)`` for a class-conditional U-Net (default: the null class).

        Raises:
            ValueError: classes given to an unconditional U-Net.
        """
        null = self.null_class
        if null is None:
            if class_labels is not None:
                raise ValueError("class_labels given to a U-Net without class embeddings (num_class_embeds)")
            return self.net(x, timesteps=timesteps)
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
        return self.net(x, timesteps=timesteps, class_labels=class_labels)


def _levels(spatial_dims: int, channels, attention_levels, num_res_blocks, num_head_channels: int,
            norm_num_groups: int, resblock_updown: bool) -> dict:
    """The checked U-Net level settings shared by the denoiser and the classifier, as their config writes them.

    Raises:
        ValueError: unsupported dimensions, or levels that do not fit together.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if len(attention_levels) != len(channels):
        raise ValueError(f"attention_levels has {len(attention_levels)} entries for {len(channels)} levels")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every channel count, not {bad}")
    return {
        "channels": [int(c) for c in channels],
        "attention_levels": [bool(a) for a in attention_levels],
        "num_res_blocks": num_res_blocks if isinstance(num_res_blocks, int) else [int(n) for n in num_res_blocks],
        "num_head_channels": int(num_head_channels),
        "norm_num_groups": int(norm_num_groups),
        "resblock_updown": bool(resblock_updown),
    }


def build_unet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int | None = None,
    cond_channels: int = 0,
    channels: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int | Sequence[int] = 1,
    num_head_channels: int = 32,
    norm_num_groups: int = 16,
    resblock_updown: bool = False,
    dropout_cattn: float = 0.0,
    num_class_embeds: int = 0,
) -> UNet:
    """Build MONAI's diffusion U-Net.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (the noisy input).
        out_channels: predicted channels (defaults to ``in_channels``).
        cond_channels: conditioning channels concatenated to the input.
        channels: feature channels per level; image sizes must be divisible by ``2 ** (len - 1)``.
        attention_levels: self-attention per level (keep it to the lowest levels in 3D).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: group-norm groups (must divide every entry of ``channels``).
        resblock_updown: use residual blocks for up/down-sampling.
        dropout_cattn: dropout in cross-attention (unused without context).
        num_class_embeds: class embeddings of a class-conditional U-Net, the null class included (the last
            index): ``classes + 1``; 0 (the default) for an unconditional one (then not written to the config).

    Returns:
        a ``UNet`` called as ``net(x, timesteps)`` (``net(x, timesteps, class_labels)`` when class-conditional).
    """
    from monai.networks.nets import DiffusionModelUNet

    levels = _levels(spatial_dims, channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups,
                     resblock_updown)
    out_channels = in_channels if out_channels is None else out_channels
    config = {
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "cond_channels": int(cond_channels),
        **levels,
        "dropout_cattn": float(dropout_cattn),
    }
    if num_class_embeds:
        if num_class_embeds < 2:
            raise ValueError(f"num_class_embeds counts the classes and the null class (at least 2), got "
                             f"{num_class_embeds}")
        config["num_class_embeds"] = int(num_class_embeds)
    net = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels + cond_channels,
        out_channels=out_channels,
        num_res_blocks=num_res_blocks,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels),
        norm_num_groups=norm_num_groups,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        dropout_cattn=dropout_cattn,
        num_class_embeds=int(num_class_embeds) or None,
    )
    return UNet(net, config)


class SegmentationUNet(ConfiguredNet):
    """MONAI's ``UNet`` segmenting the conditioning channels; the noisy state and the time are ignored.

    Args:
        net: the MONAI ``UNet`` (input: the conditioning channels; output: one logit per model channel).
        config: the keyword arguments of ``build_segmentation_unet`` that made it (with ``arch: unet``).
    """

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None, *, logits: bool = False) -> torch.Tensor:
        """Segment ``x[:, in_channels:]`` (the conditioning image).

        Args:
            x: ``(B, in_channels + cond_channels, *spatial)``: the (ignored) state, then the image.
            timesteps: ignored.
            logits: return the raw logits (for the training loss) instead of ``2 p - 1``.

        Returns:
            ``(B, out_channels, *spatial)``: logits, or probabilities on the ``[-1, 1]`` scale (sigmoid for
            one channel, softmax over several).
        """
        out = self.net(x[:, int(self.config["in_channels"]):])
        if logits:
            return out
        p = torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)
        return 2.0 * p - 1.0


def build_segmentation_unet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int | None = None,
    cond_channels: int = 1,
    channels: Sequence[int] = (16, 32, 64, 128),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
) -> SegmentationUNet:
    """Build MONAI's ``UNet`` as a deterministic segmentation network (strides of 2 between levels).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the (ignored) state: the mask channels the model outputs.
        out_channels: output channels (defaults to ``in_channels``).
        cond_channels: image channels segmented.
        channels: feature channels per level; sizes must be divisible by ``2 ** (len - 1)``.
        num_res_units: residual units per level.
        norm: MONAI norm name.
        dropout: dropout probability.

    Returns:
        a ``SegmentationUNet`` called as ``net(x, timesteps)``.
    """
    from monai.networks.nets import UNet as MonaiUNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if cond_channels < 1 or len(channels) < 2:
        raise ValueError(f"a segmentation U-Net needs image channels and two levels, got {cond_channels}, {channels}")
    out_channels = in_channels if out_channels is None else out_channels
    config = {"arch": "unet", "spatial_dims": int(spatial_dims), "in_channels": int(in_channels),
              "out_channels": int(out_channels), "cond_channels": int(cond_channels),
              "channels": [int(c) for c in channels], "num_res_units": int(num_res_units), "norm": str(norm),
              "dropout": float(dropout)}
    net = MonaiUNet(spatial_dims=spatial_dims, in_channels=cond_channels, out_channels=out_channels,
                    channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=num_res_units,
                    norm=norm, dropout=dropout)
    return SegmentationUNet(net, config)


class AttentionPool(nn.Module):
    """Attention pooling of a feature map into one vector (Radford et al. 2021's CLIP head, as in Dhariwal & Nichol
    2021's classifier): the mean feature attends to every position; its output is projected to ``out_features``.

    Unlike guided-diffusion's ``AttentionPool2d`` it has no learned positional embedding, so it pools any
    number of spatial dims and any size.

    Args:
        channels: feature channels.
        out_features: output size (the number of classes).
        num_head_channels: channels per attention head (must divide ``channels``).
    """

    def __init__(self, channels: int, out_features: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"num_head_channels={num_head_channels} must divide the last level's {channels} channels")
        self.attention = nn.MultiheadAttention(channels, channels // num_head_channels, batch_first=True)
        self.proj = nn.Linear(channels, out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, out_features)``."""
        tokens = h.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        pooled, _ = self.attention(tokens[:, :1], tokens, tokens, need_weights=False)
        return self.proj(pooled[:, 0])


class Classifier(nn.Module):
    """The encoder half of a MONAI ``DiffusionModelUNet`` with an attention-pooling head: class logits of ``x_t``.

    Args:
        unet: a ``DiffusionModelUNet``; its time embedding, input convolution, down blocks and middle block are
            kept (its up blocks and output are dropped).
        head: maps the middle block's features ``(B, C, *spatial)`` to logits ``(B, classes)``.
        config: the keyword arguments of ``build_classifier`` that made it (with ``arch: classifier``).
    """

    def __init__(self, unet: nn.Module, head: nn.Module, config: dict):
        super().__init__()
        self.time_embed, self.conv_in = unet.time_embed, unet.conv_in
        self.down_blocks, self.middle_block = unet.down_blocks, unet.middle_block
        self.head, self.config = head, dict(config)

    @property
    def spatial_dims(self) -> int:
        return int(self.config["spatial_dims"])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` of noisy images ``x`` at network times ``timesteps`` (``(B,)``)."""
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        emb = self.time_embed(get_timestep_embedding(timesteps, self.config["channels"][0]).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb, context=None)
        return self.head(self.middle_block(hidden_states=h, temb=emb, context=None))


def build_classifier(
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    channels: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int | Sequence[int] = 1,
    num_head_channels: int = 32,
    norm_num_groups: int = 16,
    resblock_updown: bool = False,
) -> Classifier:
    """Build a noise-aware classifier: the encoder half of ``build_unet``'s U-Net with attention pooling.

    The arguments shared with ``build_unet`` mean the same; the head is group norm, SiLU and
    ``AttentionPool`` (guided-diffusion's ``pool="attention"`` head, Wolleb et al. 2022's choice).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: classes (logits).
        channels: feature channels per level.
        attention_levels: self-attention per level (the middle block always has it).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head (must divide the last level's channels).
        norm_num_groups: group-norm groups (must divide every entry of ``channels``).
        resblock_updown: residual blocks for down-sampling.

    Returns:
        a ``Classifier`` called as ``net(x_t, timesteps) -> logits``.
    """
    from monai.networks.nets import DiffusionModelUNet

    levels = _levels(spatial_dims, channels, attention_levels, num_res_blocks, num_head_channels, norm_num_groups,
                     resblock_updown)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    config = {
        "arch": "classifier",
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        **levels,
    }
    unet = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels,
                              num_res_blocks=num_res_blocks, channels=tuple(channels),
                              attention_levels=tuple(attention_levels), norm_num_groups=norm_num_groups,
                              num_head_channels=num_head_channels, resblock_updown=resblock_updown)
    last = int(channels[-1])
    head = nn.Sequential(nn.GroupNorm(norm_num_groups, last), nn.SiLU(),
                         AttentionPool(last, num_classes, num_head_channels))
    return Classifier(unet, head, config)


class VQVAE(ConfiguredNet):
    """MONAI's ``VQVAE`` with its build config attached: codes of images, and images of latents.

    Args:
        net: the MONAI ``VQVAE``.
        config: the keyword arguments of ``build_vqvae`` that made it (with ``arch: vqvae``).
    """

    @property
    def embedding_dim(self) -> int:
        """Channels of a code (of the latents)."""
        return int(self.config["embedding_dim"])

    @property
    def factor(self) -> int:
        """How many times coarser the latent grid is than the image's, per axis."""
        return 2 ** len(self.config["channels"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, quantisation loss)``: the straight-through reconstruction and MONAI's commitment loss
        ``commitment_cost * ||sg(e) - z_e||^2`` (the codebook itself follows an EMA of the encodings in training)."""
        return self.net(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of images ``(B, C, *spatial)``: ``(B, embedding_dim, *spatial / factor)``, exact codebook
        vectors (no straight-through rounding; the codebook is not updated, even in training mode)."""
        return self.snap(self.net.encode(x))

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent vector replaced by its nearest code (codes are left as they are); the codebook is not
        updated."""
        quantizer = self.net.quantizer.quantizer  # MONAI's EMAQuantizer: its quantize and embed update nothing
        return quantizer.embed(quantizer.quantize(z)[2]).to(z.dtype)

    def decode(self, z: torch.Tensor, snap: bool = True) -> torch.Tensor:
        """Images of latents ``(B, embedding_dim, *grid)``, snapped to their nearest codes first (``snap``)."""
        return self.net.decode(self.snap(z) if snap else z)


class LatentCodec(nn.Module):
    """A frozen VQ-VAE as the map between images and the latents a latent denoiser models: ``scale * codes``.

    Args:
        vqvae: the autoencoder (put in eval mode, its weights frozen).
        scale: the factor the codes are multiplied by (``AutoencoderInfo.scale``).
    """

    def __init__(self, vqvae: VQVAE, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"the latent scale must be positive, got {scale}")
        self.vqvae, self.scale = vqvae.requires_grad_(False), float(scale)
        self.train(False)

    def train(self, mode: bool = True) -> LatentCodec:  # always frozen: its codebook never moves
        return super().train(False)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latents of images: ``scale * codes``."""
        return self.scale * self.vqvae.encode(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The images of latents: ``z / scale`` snapped to the nearest codes, decoded."""
        return self.vqvae.decode(z / self.scale)


def build_vqvae(
    spatial_dims: int = 2,
    in_channels: int = 1,
    channels: Sequence[int] = (32, 64),
    num_res_layers: int = 1,
    num_res_channels: Sequence[int] | None = None,
    num_embeddings: int = 256,
    embedding_dim: int = 3,
    commitment_cost: float = 0.25,
    decay: float = 0.99,
) -> VQVAE:
    """Build MONAI's VQ-VAE; each of the ``len(channels)`` levels halves the grid.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (also the output channels).
        channels: feature channels per level; image sizes must be divisible by ``2 ** len(channels)``.
        num_res_layers: residual layers per level.
        num_res_channels: channels of the residual layers per level (default: ``channels``).
        num_embeddings: codebook size.
        embedding_dim: channels of a code: the latent channels the latent denoiser models.
        commitment_cost: weight of the commitment loss.
        decay: EMA decay of the codebook.

    Returns:
        a ``VQVAE``.
    """
    from monai.networks.nets import VQVAE as MonaiVQVAE

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if not channels:
        raise ValueError("a VQ-VAE needs at least one level (channels)")
    res = list(channels) if num_res_channels is None else [int(c) for c in num_res_channels]
    if len(res) != len(channels):
        raise ValueError(f"num_res_channels has {len(res)} entries for {len(channels)} levels")
    config = {"arch": "vqvae", "spatial_dims": int(spatial_dims), "in_channels": int(in_channels),
              "channels": [int(c) for c in channels], "num_res_layers": int(num_res_layers),
              "num_res_channels": [int(c) for c in res], "num_embeddings": int(num_embeddings),
              "embedding_dim": int(embedding_dim), "commitment_cost": float(commitment_cost), "decay": float(decay)}
    levels = len(channels)
    net = MonaiVQVAE(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=in_channels,
                     channels=tuple(int(c) for c in channels), num_res_layers=num_res_layers,
                     num_res_channels=tuple(res), downsample_parameters=((2, 4, 1, 1),) * levels,
                     upsample_parameters=((2, 4, 1, 1, 0),) * levels, num_embeddings=num_embeddings,
                     embedding_dim=embedding_dim, commitment_cost=commitment_cost, decay=decay)
    return VQVAE(net, config)


#: Network builders by ``config["arch"]`` (a config without ``arch`` is a diffusion U-Net).
ARCHITECTURES = {"diffusion_unet": build_unet, "unet": build_segmentation_unet, "classifier": build_classifier,
                 "vqvae": build_vqvae}


def build_network(**config) -> nn.Module:
    """Rebuild a network from its saved ``config`` (``arch`` picks the builder; default ``diffusion_unet``)."""
    arch = config.pop("arch", "diffusion_unet")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown network arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
