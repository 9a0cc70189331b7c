"""Network builders: MONAI's ``DiffusionModelUNet`` and ``UNet`` in 2D or 3D, configured by keyword arguments.

``build_unet`` returns a ``UNet`` module called as ``net(x, timesteps)`` whose ``config`` dictionary
(JSON-serialisable) rebuilds it with ``build_network(**config)``; that config is saved beside the weights.
Conditioning channels (``cond_channels``) are extra input channels: the denoiser concatenates them to
the noisy image. The time input is any float (``Process.net_time`` maps continuous ``t`` and VE
sigmas to the 0-1000 range the sinusoidal embedding is made for).

``build_segmentation_unet`` wraps MONAI's deterministic ``UNet`` (Ronneberger et al. 2015; Kerfoot et al.
2018's residual units) in the same call signature (config ``arch: unet``): it ignores the noisy state
and the time, segments the conditioning image and returns class probabilities ``p`` as ``2 p - 1``, so it
is an ``x0``-denoiser whose estimate does not depend on ``x_t`` and runs through every sampler unchanged
(one step gives its segmentation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UNet", "SegmentationUNet", "build_unet", "build_segmentation_unet", "build_network", "count_parameters"]


class UNet(nn.Module):
    """A MONAI ``DiffusionModelUNet`` with its build config attached.

    Args:
        net: the MONAI network.
        config: the keyword arguments of ``build_unet`` that made it.
    """

    def __init__(self, net: nn.Module, config: dict):
        super().__init__()
        self.net, self.config = net, dict(config)

    @property
    def spatial_dims(self) -> int:
        return int(self.config["spatial_dims"])

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.net(x, timesteps=timesteps)


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

    Returns:
        a ``UNet`` called as ``net(x, timesteps)``.
    """
    from monai.networks.nets import DiffusionModelUNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if len(attention_levels) != len(channels):
        raise ValueError(f"attention_levels has {len(attention_levels)} entries for {len(channels)} levels")
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every channel count, not {bad}")
    out_channels = in_channels if out_channels is None else out_channels
    config = {
        "spatial_dims": int(spatial_dims),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "cond_channels": int(cond_channels),
        "channels": [int(c) for c in channels],
        "attention_levels": [bool(a) for a in attention_levels],
        "num_res_blocks": num_res_blocks if isinstance(num_res_blocks, int) else [int(n) for n in num_res_blocks],
        "num_head_channels": int(num_head_channels),
        "norm_num_groups": int(norm_num_groups),
        "resblock_updown": bool(resblock_updown),
        "dropout_cattn": float(dropout_cattn),
    }
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
    )
    return UNet(net, config)


class SegmentationUNet(nn.Module):
    """MONAI's ``UNet`` segmenting the conditioning channels; the noisy state and the time are ignored.

    Args:
        net: the MONAI ``UNet`` (input: the conditioning channels; output: one logit per model channel).
        config: the keyword arguments of ``build_segmentation_unet`` that made it (with ``arch: unet``).
    """

    def __init__(self, net: nn.Module, config: dict):
        super().__init__()
        self.net, self.config = net, dict(config)

    @property
    def spatial_dims(self) -> int:
        return int(self.config["spatial_dims"])

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


#: Network builders by ``config["arch"]`` (a config without ``arch`` is a diffusion U-Net).
ARCHITECTURES = {"diffusion_unet": build_unet, "unet": build_segmentation_unet}


def build_network(**config) -> nn.Module:
    """Rebuild a network from its saved ``config`` (``arch`` picks the builder; default ``diffusion_unet``)."""
    arch = config.pop("arch", "diffusion_unet")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown network arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
