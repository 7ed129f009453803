"""The first-stage autoencoder of the latent diffusion generator: a one-channel diffusers ``AutoencoderKL``.

Images are grayscale LGE slices scaled to [-1, 1], float [B, 1, H, W]. The encoder halves the
resolution once per block after the first, so the latent is ``H / f x W / f`` with
``f = 2 ** (len(block_out_channels) - 1)``: with the default ``(32, 64, 128)``, ``f = 4`` and a
96 px crop becomes a 24 px latent with ``latent_channels`` channels.

Training follows the first stage of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", the KL-regularised autoencoder) minus its LPIPS perceptual
and patch-GAN adversarial terms: those need a pretrained VGG (a download) and a discriminator, and are
the expensive part on two CPU cores. :func:`vae_loss` keeps the reconstruction and KL terms; the
other two can be added to the training loop later without changing the model.

Latents handed to the diffusion model are ``posterior * scaling_factor``. After training, the VAE
stage sets ``scaling_factor`` to ``1 / std`` of the training latents (:func:`measure_scaling_factor`)
so the diffusion model sees roughly unit variance (the LDM recipe; Stable Diffusion's 0.18215 was
found this way); the default 1.0 means "not yet measured". A wrong factor is not harmless: the
noise schedule assumes unit-variance latents, and latents of std 4 (what an unscaled phantom VAE
gives) leave every timestep 20 times less noisy than the schedule says, so the sampler, which starts
from unit noise, does not end on the data's latents.

Example:
    .. code-block:: python

        config = VAEConfig(block_out_channels=(16, 32), norm_num_groups=8)
        vae = build_vae(config)
        loss, parts = vae_loss(vae, images, kl_weight=1e-6)
        latents = encode_latents(vae, images, config.scaling_factor)      # [B, 4, H/2, W/2]
        images_again = decode_latents(vae, latents, config.scaling_factor)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine import config as config_io
from engine.models.reward import check_image_batch

__all__ = ["VAEConfig", "build_vae", "vae_loss", "encode_latents", "decode_latents", "measure_scaling_factor"]


@dataclass
class VAEConfig:
    """Architecture of the one-channel KL autoencoder; saved next to its weights as the model's config.

    Args:
        block_out_channels: Channels of each encoder block (the decoder mirrors them). The latent
            downsampling factor is ``2 ** (len(block_out_channels) - 1)``.
        latent_channels: Channels of the latent (4, as in Stable Diffusion).
        layers_per_block: ResNet layers per encoder block (the decoder has one more per block).
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        scaling_factor: Multiplies the posterior to give diffusion latents; ``1 / std`` of the
            training latents once measured, 1.0 before that.
        mid_block_attention: Self-attention in the mid block (as in the LDM/SD autoencoder).

    Example:
        >>> VAEConfig(block_out_channels=(16, 32), norm_num_groups=8).downsampling_factor
        2
    """

    block_out_channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 16
    scaling_factor: float = 1.0
    mid_block_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if not self.block_out_channels or any(not isinstance(c, int) or c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels: expected at least one positive int, got {self.block_out_channels!r}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels: expected >= 1, got {self.latent_channels!r}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block: expected >= 1, got {self.layers_per_block!r}")
        if self.norm_num_groups < 1 or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups: expected a positive divisor of every block_out_channels "
                             f"entry {self.block_out_channels!r}, got {self.norm_num_groups!r}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor: expected > 0, got {self.scaling_factor!r}")

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel along each axis: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serializable fields; :meth:`from_dict` rebuilds an equal config."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        """The config from :meth:`to_dict` output (or YAML data); a bad value raises ``ValueError`` naming it."""
        return config_io.from_dict(cls, data)


def build_vae(config: VAEConfig):
    """A freshly initialised diffusers ``AutoencoderKL`` for one-channel images (nothing is downloaded).

    Returns:
        ``diffusers.AutoencoderKL`` with ``in_channels = out_channels = 1``; its own ``vae.config``
        records the architecture, and ``vae.config.scaling_factor`` equals ``config.scaling_factor``.
    """
    from diffusers import AutoencoderKL

    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        scaling_factor=config.scaling_factor,
        force_upcast=False,  # a small one-channel VAE is fine in bf16; no silent fp32 round trip
        mid_block_add_attention=config.mid_block_attention,
    )


def vae_loss(vae, images: torch.Tensor, kl_weight: float = 1e-6, mse_weight: float = 0.0, *,
             sample_posterior: bool = True, generator: torch.Generator | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """First-stage LDM loss without the perceptual and adversarial terms.

    ``loss = mean |x - x'| + mse_weight * mean (x - x')**2 + kl_weight * KL / (H * W)``, where
    ``KL`` is the KL divergence of the diagonal-Gaussian posterior from N(0, I), summed over the
    latent of each image and averaged over the batch. This is the LDM objective (per-image sums of
    reconstruction error and KL, ``kl_weight`` about 1e-6) divided by the pixel count, so
    ``kl_weight`` keeps its LDM meaning while the loss reads as a per-pixel error.

    Args:
        vae: A diffusers ``AutoencoderKL`` from :func:`build_vae`.
        images: float [B, 1, H, W] in [-1, 1]; H, W multiples of the downsampling factor.
        kl_weight: Weight of the KL term (LDM: 1e-6), >= 0.
        mse_weight: Weight of an extra squared-error term, >= 0 (0 gives the pure L1 recipe).
        sample_posterior: Decode a posterior sample (training) rather than its mean.
        generator: Seeds the posterior sample.

    Returns:
        ``(loss, parts)``: a scalar tensor with gradients, and detached scalars ``"l1"``, ``"mse"``,
        ``"kl"`` (per image, summed over the latent) and ``"loss"``.
    """
    if kl_weight < 0 or mse_weight < 0:
        raise ValueError(f"kl_weight and mse_weight must be >= 0, got {kl_weight!r} and {mse_weight!r}")
    _check_images(vae, images)
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    reconstruction = vae.decode(z).sample
    l1 = F.l1_loss(reconstruction.float(), images.float())
    mse = F.mse_loss(reconstruction.float(), images.float())
    kl = posterior.kl().float().mean()
    pixels = images.shape[-2] * images.shape[-1]
    loss = l1 + mse_weight * mse + kl_weight * kl / pixels
    parts = {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach(), "loss": loss.detach()}
    return loss, parts


def encode_latents(vae, images: torch.Tensor, scaling_factor: float | None = None, *, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion latents of images; differentiable (wrap in ``torch.no_grad()`` for a frozen VAE).

    Args:
        vae: A diffusers ``AutoencoderKL`` from :func:`build_vae`.
        images: float [B, 1, H, W] in [-1, 1]; H, W multiples of the downsampling factor ``f``.
        scaling_factor: Multiplies the posterior; ``None`` uses ``vae.config.scaling_factor``.
        sample: Use a posterior sample instead of the posterior mean (the default, deterministic).
        generator: Seeds the sample.

    Returns:
        float [B, latent_channels, H / f, W / f], roughly unit variance once ``scaling_factor`` is set.
    """
    _check_images(vae, images)
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator) if sample else posterior.mode()
    return z * scale


def decode_latents(vae, latents: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    """Images from diffusion latents; differentiable, so a reward on the image reaches the latents.

    Args:
        vae: A diffusers ``AutoencoderKL`` from :func:`build_vae`.
        latents: float [B, latent_channels, h, w], as :func:`encode_latents` returns them.
        scaling_factor: The factor the latents were scaled with; ``None`` uses ``vae.config.scaling_factor``.

    Returns:
        float [B, 1, h * f, w * f], nominally [-1, 1] but not clamped (clamping would zero the
        gradient outside the range); clamp before storing.
    """
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(f"decode_latents: expected latents [B, {vae.config.latent_channels}, h, w], "
                         f"got shape {tuple(latents.shape)}")
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    return vae.decode(latents / scale).sample


def _check_images(vae, images: torch.Tensor) -> None:
    check_image_batch(images, 2 ** (len(vae.config.block_out_channels) - 1), "VAE")


@torch.no_grad()
def measure_scaling_factor(vae, images: torch.Tensor, batch_size: int = 32) -> float:
    """``1 / std`` of the posterior means of ``images`` (float [N, 1, H, W] in [-1, 1]): the
    ``scaling_factor`` that gives the diffusion model unit-variance latents.

    Raises:
        ValueError: for no images, or latents with no spread (a constant image set).
    """
    if images.shape[0] == 0:
        raise ValueError("measure_scaling_factor needs at least one image")
    latents = torch.cat([encode_latents(vae, images[i:i + batch_size], 1.0).float()
                         for i in range(0, images.shape[0], batch_size)])
    std = float(latents.std())
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"the latents of {images.shape[0]} images have std {std}: cannot scale them to unit variance")
    return 1.0 / std
