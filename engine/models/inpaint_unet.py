"""The latent inpainting UNet of LGESynthNet: a diffusers ``UNet2DConditionModel`` with 9 input channels.

Its input is the Stable-Diffusion-inpainting layout at latent resolution, concatenated on channels:
``[noisy latent (latent_channels), inpainting mask (1), latent of the masked image (latent_channels)]``,
so ``in_channels = 2 * latent_channels + 1``; it predicts the noise (epsilon) of the noisy latent,
``out_channels = latent_channels``. Captions enter through cross-attention (``cross_attention_dim``
must equal the text encoder's hidden size; checked when the generator is assembled), the edge map
through the ControlNet's residuals (``engine.models.controlnet``), which shares this block layout.

Example:
    >>> unet = build_inpaint_unet(InpaintUNetConfig(block_out_channels=(32, 64), layers_per_block=1,
    ...                                             cross_attention_dim=32, norm_num_groups=8))  # doctest: +SKIP
    >>> unet.config.in_channels  # doctest: +SKIP
    9
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["InpaintUNetConfig", "build_inpaint_unet", "build_unet", "unet_block_kwargs"]


@dataclass
class InpaintUNetConfig:
    """Layout of the inpainting UNet (and, through :func:`unet_block_kwargs`, of its ControlNet).

    Args:
        latent_channels: channels of the VAE latent (must equal the VAE's ``latent_channels``).
        block_out_channels: channels per resolution level; each level after the first halves the
            latent resolution, so latent sides must be divisible by ``2 ** (levels - 1)``.
            (64, 128, 256) for the paper-scale GPU model; (32, 64) is a CPU test model.
        layers_per_block: ResNet (+ attention) layers per level.
        attention_head_dim: channels per attention head; every attended level's channel count must be
            divisible by it (the number of heads is ``channels // attention_head_dim``).
        cross_attention_dim: width of the caption states; equals the text encoder's hidden size
            (384 for the packaged MiniLM, 768 for BiomedBERT).
        cross_attention_levels: per level, whether it has (self- and caption cross-) attention.
            Empty means every level except the first, full-resolution one (attention cost grows with
            the square of the token count, and captions describe where the scar is, which the lower
            resolutions resolve). The middle block always attends.
        norm_num_groups: GroupNorm groups; divides every level's channel count.

    Example:
        >>> InpaintUNetConfig(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        ...                   norm_num_groups=8).attention_levels
        (False, True)
    """

    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 2
    attention_head_dim: int = 32
    cross_attention_dim: int = 384
    cross_attention_levels: tuple[bool, ...] = ()
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.cross_attention_levels = tuple(self.cross_attention_levels)
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels must be positive channel counts, got {self.block_out_channels}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim must be >= 1, got {self.cross_attention_dim}")
        if self.cross_attention_levels and len(self.cross_attention_levels) != len(self.block_out_channels):
            raise ValueError(
                f"cross_attention_levels has {len(self.cross_attention_levels)} entries for "
                f"{len(self.block_out_channels)} levels of block_out_channels {self.block_out_channels}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide block channels {c}")
        attended = [c for c, a in zip(self.block_out_channels, self.attention_levels, strict=True) if a] + [self.block_out_channels[-1]]
        for c in attended:
            if self.attention_head_dim < 1 or c % self.attention_head_dim:
                raise ValueError(
                    f"attention_head_dim {self.attention_head_dim} does not divide attended level channels {c}")

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """``cross_attention_levels`` with the empty default resolved."""
        if self.cross_attention_levels:
            return self.cross_attention_levels
        return tuple(i > 0 for i in range(len(self.block_out_channels)))

    @property
    def in_channels(self) -> int:
        """Noisy latent + mask + masked-image latent."""
        return 2 * self.latent_channels + 1

    @property
    def downsampling_factor(self) -> int:
        """How much the UNet downsamples its latent input: latent sides must be divisible by it."""
        return 2 ** (len(self.block_out_channels) - 1)


def unet_block_kwargs(cfg: InpaintUNetConfig) -> dict[str, Any]:
    """The diffusers constructor arguments the UNet and its ControlNet share (blocks, widths, attention).

    diffusers' ``attention_head_dim`` is, for historical reasons, the number of heads
    (https://github.com/huggingface/diffusers/issues/2011), so it is given per level as
    ``channels // cfg.attention_head_dim``.
    """
    levels = cfg.attention_levels
    heads = tuple(max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels)
    return dict(
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=heads,
        norm_num_groups=cfg.norm_num_groups,
    )


def build_inpaint_unet(cfg: InpaintUNetConfig):
    """A randomly initialised ``diffusers.UNet2DConditionModel`` for latent inpainting.

    Input ``[B, 2 * latent_channels + 1, h, w]`` (see the module docstring), timestep ``[B]``,
    ``encoder_hidden_states [B, T, cross_attention_dim]``; output ``.sample [B, latent_channels, h, w]``,
    the predicted noise. Accepts the ControlNet's ``down_block_additional_residuals`` and
    ``mid_block_additional_residual``.
    """
    return build_unet(cfg, cfg.in_channels)


def build_unet(cfg: InpaintUNetConfig, in_channels: int):
    """A randomly initialised ``diffusers.UNet2DConditionModel`` with ``cfg``'s layout and ``in_channels``
    input channels: ``cfg.in_channels`` for inpainting (:func:`build_inpaint_unet`), ``cfg.latent_channels``
    for a plain text-to-image model on the noisy latent alone (the ControlNet baselines,
    ``engine.models.controlnet_baseline``). Output: the predicted noise, ``latent_channels`` channels."""
    from diffusers import UNet2DConditionModel

    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < cfg.latent_channels:
        raise ValueError(f"in_channels must be an int >= latent_channels {cfg.latent_channels}, got {in_channels!r}")
    shared = unet_block_kwargs(cfg)
    up_block_types = tuple(
        "CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(shared["down_block_types"]))
    return UNet2DConditionModel(
        in_channels=in_channels,
        out_channels=cfg.latent_channels,
        up_block_types=up_block_types,
        **shared,
    )
