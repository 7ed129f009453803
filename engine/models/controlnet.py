"""The ControlNet of LGESynthNet: steers the inpainting UNet with the scar's edge map (or filled mask).

A diffusers ``ControlNetModel`` with the inpainting UNet's block layout (:func:`unet_block_kwargs`) and
cross-attention width. Its input is the noisy latent only (``in_channels = latent_channels``, not the
UNet's 9 channels: the stock SD inpaint pipeline also feeds its ControlNet 4 channels) plus the
full-resolution condition image (``conditioning_channels = 1``), which a small strided conv stack (the
conditioning embedding) brings down to latent resolution: it halves the resolution
``len(conditioning_embedding_out_channels) - 1`` times, so that count must match the VAE's
downsampling (checked when the generator is assembled): (16, 32, 96) for the default factor-4 VAE
(``engine.models.vae``), (16, 32, 96, 256) for a factor-8 one, (16, 32) for a factor-2 one.

The condition is the paper's choice, the scar's edge map (its inner boundary band); the paper's
ablation, the filled scar mask, is ``conditioning="mask"`` (:func:`conditioning_image`).

Initialisation (ControlNet paper, Zhang et al. 2023): the encoder copy may start from the UNet's
weights (:func:`copy_unet_weights`: time embedding, down blocks, middle block, and the noisy-latent
slice of ``conv_in``), and every output ("zero") convolution starts at zero, so an untrained ControlNet
adds nothing to the UNet: the generator starts as the plain inpainting model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from engine.models.inpaint_unet import InpaintUNetConfig, unet_block_kwargs

__all__ = ["ControlNetConfig", "build_controlnet", "copy_unet_weights", "conditioning_image"]

Conditioning = Literal["edges", "mask"]


@dataclass
class ControlNetConfig:
    """What the ControlNet sees and how its conditioning embedding is shaped.

    The ControlNet's block layout and cross-attention width are not settings here: they are the
    inpainting UNet's (:class:`InpaintUNetConfig`), so the two cannot disagree.

    Args:
        conditioning: "edges" (the scar's edge map, the paper's choice) or "mask" (the filled scar
            mask, the paper's ablation).
        edge_width: width in pixels of the edge band for "edges" (as ``engine.anatomy.masks.edge_map``).
        conditioning_embedding_out_channels: channels of the condition image's conv stack; it
            downsamples by ``2 ** (len - 1)``, which must equal the VAE's downsampling factor.
        conditioning_scale: multiplies every ControlNet residual (1.0 as trained).
        init_from_unet: start the ControlNet's encoder from the UNet's weights (else random init).

    Example:
        >>> ControlNetConfig(conditioning="mask", conditioning_embedding_out_channels=(16, 32)).downsampling_factor
        2
    """

    conditioning: Conditioning = "edges"
    edge_width: int = 1
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96)
    conditioning_scale: float = 1.0
    init_from_unet: bool = True

    def __post_init__(self) -> None:
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)
        if self.conditioning not in ("edges", "mask"):
            raise ValueError(f"conditioning must be 'edges' or 'mask', got {self.conditioning!r}")
        if self.edge_width < 1:
            raise ValueError(f"edge_width must be >= 1 pixel, got {self.edge_width}")
        if not self.conditioning_embedding_out_channels or any(c < 1 for c in self.conditioning_embedding_out_channels):
            raise ValueError(
                f"conditioning_embedding_out_channels must be positive channel counts, "
                f"got {self.conditioning_embedding_out_channels}")
        if self.conditioning_scale < 0:
            raise ValueError(f"conditioning_scale must be >= 0, got {self.conditioning_scale}")

    @property
    def downsampling_factor(self) -> int:
        """Full-resolution condition image side / latent side."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


def build_controlnet(cfg: ControlNetConfig, unet_cfg: InpaintUNetConfig, unet=None):
    """A ``diffusers.ControlNetModel`` matching the inpainting UNet built from ``unet_cfg``.

    Inputs: noisy latent ``[B, latent_channels, h, w]``, timestep ``[B]``, caption states
    ``[B, T, cross_attention_dim]``, ``controlnet_cond [B, 1, h * f, w * f]`` with ``f`` the
    conditioning embedding's downsampling. Outputs ``down_block_res_samples`` (one per UNet skip
    connection, same shapes) and ``mid_block_res_sample``.

    Args:
        cfg: the ControlNet's own settings.
        unet_cfg: the UNet's layout, copied.
        unet: when given and ``cfg.init_from_unet``, its weights initialise the encoder copy.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel(
        in_channels=unet_cfg.latent_channels,
        conditioning_channels=1,
        conditioning_embedding_out_channels=cfg.conditioning_embedding_out_channels,
        **unet_block_kwargs(unet_cfg),
    )
    if unet is not None and cfg.init_from_unet:
        copy_unet_weights(controlnet, unet)
    return controlnet


@torch.no_grad()
def copy_unet_weights(controlnet, unet) -> None:
    """Copy the UNet's encoder weights into the ControlNet (as ``ControlNetModel.from_unet`` does).

    ``conv_in`` differs in input channels (the ControlNet sees only the noisy latent): it takes the
    UNet's weights for the noisy-latent channels, which come first in the UNet's input. The zero
    convolutions are left untouched (zero at construction). Call again after loading a trained
    inpainting UNet to start a ControlNet from it.
    """
    latent_channels = controlnet.conv_in.in_channels
    if unet.conv_in.weight.shape[1] < latent_channels or unet.conv_in.out_channels != controlnet.conv_in.out_channels:
        raise ValueError(
            f"UNet conv_in {tuple(unet.conv_in.weight.shape)} cannot initialise ControlNet conv_in "
            f"{tuple(controlnet.conv_in.weight.shape)}")
    controlnet.conv_in.weight.copy_(unet.conv_in.weight[:, :latent_channels])
    controlnet.conv_in.bias.copy_(unet.conv_in.bias)
    controlnet.time_proj.load_state_dict(unet.time_proj.state_dict())
    controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict())
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())


def conditioning_image(scar: torch.Tensor, kind: Conditioning, edge_width: int = 1) -> torch.Tensor:
    """The ControlNet's condition image from intended scar masks, batched on any device.

    Args:
        scar: ``[B, 1, H, W]`` scar masks in {0, 1}.
        kind: "edges": the inner boundary band, ``edge_width`` pixels wide, 8-connected, pixels outside
            the image counting as background (identical to ``engine.anatomy.masks.edge_map``);
            "mask": the filled mask itself.
        edge_width: band width in pixels for "edges".

    Returns:
        float ``[B, 1, H, W]`` in {0, 1}.
    """
    if scar.ndim != 4 or scar.shape[1] != 1:
        raise ValueError(f"scar masks must be [B, 1, H, W], got {tuple(scar.shape)}")
    mask = (scar > 0.5).float()
    if kind == "mask":
        return mask
    if kind != "edges":
        raise ValueError(f"conditioning must be 'edges' or 'mask', got {kind!r}")
    eroded = mask
    for _ in range(edge_width):
        # erosion = 1 - dilation of the background; padding 1 = background beyond the border
        eroded = 1.0 - F.max_pool2d(F.pad(1.0 - eroded, (1, 1, 1, 1), value=1.0), kernel_size=3, stride=1)
    return mask * (1.0 - eroded)
