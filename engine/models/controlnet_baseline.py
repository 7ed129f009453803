"""The paper's ControlNet baselines (Table 1, DOMAIN.md section 6): "ControlNet" and "ControlNet with
template guidance", two synthesis methods served by one trained model.

A standard text-to-image latent diffusion model steered by a ControlNet (Zhang et al. 2023, "Adding
Conditional Control to Text-to-Image Diffusion Models"): a diffusers ``UNet2DConditionModel`` whose
only input is the noisy VAE latent (``in_channels = latent_channels``), with cross-attention on the
caption's token states, and a ``ControlNetModel`` on the scar's edge map, the condition LGESynthNet
gets, built the same way (:func:`engine.models.controlnet.conditioning_image`). Epsilon prediction on
the latents of the whole image (the run's frozen VAE); the loss is the diffusion MSE alone, UNet and
ControlNet trained together from scratch. What it lacks next to LGESynthNet is the paper's point:
no inpainting base (the UNet never sees the input image or a mask) and no reward loss.

Two methods sample it (:meth:`ControlNetBaseline.generate`):

- ``controlnet``: the whole image from pure noise, given the edge map and the caption. The whole
  output is the candidate, nothing of the input is blended back (as for SPADE): the anatomy around
  the scar is the model's invention, which is why the paper reports poor realism for it.
- ``controlnet-template``, the engine's reading of "template guidance" (the paper gives no details):
  SDEdit-style image-to-image sampling (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing
  with Stochastic Differential Equations"). Sampling starts from the template's latents, the
  negative source slice, noised to the first timestep of the configured schedule below
  ``template_strength * T`` (``T`` = ``num_train_timesteps``), and runs the schedule's remaining
  steps, about ``template_strength * num_inference_steps`` of them (as diffusers' img2img
  pipelines). The output keeps the template's anatomy at the scale the noise level leaves intact,
  while the edge map and caption steer the rest. ``template_strength = 1`` starts from pure noise and
  is the ``controlnet`` method; below ``1 / (2 * num_inference_steps)`` no step is left and the
  output is the template's VAE reconstruction. The template is the source slice with the region to
  synthesize (the batch's ``mask``) blanked to mid grey, as every method's inputs hide it: in
  synthesis the source is negative and this only blanks the healthy myocardium the scar will cover;
  in the realism gate the source is a real positive slice, whose real scar must not reach the output
  through the template.

What the baselines share with LGESynthNet (:class:`engine.models.generator.LatentDiffusion`): the
text encoder, noise schedule, sampler, sampler steps, guidance and caption settings are the run's
``generator.model`` (one source of truth: the baselines differ from LGESynthNet in architecture and
training, not in caption encoder or sampler), the VAE is the run's. Their own settings are the UNet's
layout and the ControlNet's conditioning embedding (:class:`ControlNetBaselineConfig`), resolved with
those into one :class:`~engine.models.generator.GeneratorConfig` (:meth:`ControlNetBaselineConfig.resolve`)
that is saved next to the weights.

Batch contract (torch, B samples, H x W pixels multiples of ``size_multiple``): ``"image"`` float
[B,1,H,W] in [-1, 1] (training: the real positive slice; sampling: the template, read only by
``controlnet-template``), ``"condition"`` float [B,1,H,W] {0, 1} (or ``"scar"`` to build it from),
``"caption"`` list of B strings, optional ``"mask"`` float [B,1,H,W] {0, 1} (sampling: the region
hidden from the template).

Example:
    .. code-block:: python

        cfg = ControlNetBaselineConfig(unet=InpaintUNetConfig(block_out_channels=(32, 64)))
        model = ControlNetBaseline(cfg.resolve(generator_model, vae_cfg), vae=vae)
        out = model.training_loss(batch, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        noise = [torch.Generator().manual_seed(s) for s in seeds]
        whole = model.generate(batch, generator=noise)                              # controlnet
        guided = model.generate(batch, generator=noise, template_strength=0.6)      # controlnet-template
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import config as config_io
from engine.models.controlnet import ControlNetConfig
from engine.models.generator import GeneratorConfig, LatentDiffusion, _randn
from engine.models.inpaint_unet import InpaintUNetConfig
from engine.models.vae import VAEConfig

__all__ = ["ControlNetBaseline", "ControlNetBaselineConfig", "check_strength"]


def check_strength(template_strength: float, where: str = "template_strength") -> float:
    """``template_strength`` as a float in (0, 1]; anything else raises ValueError naming ``where``."""
    if isinstance(template_strength, bool) or not isinstance(template_strength, (int, float)) \
            or not 0.0 < template_strength <= 1.0:
        raise ValueError(f"{where} must be a number in (0, 1] (1: start from pure noise), got {template_strength!r}")
    return float(template_strength)


@dataclass
class ControlNetBaselineConfig:
    """What the ControlNet baselines set themselves; the rest is the run's ``generator.model``.

    Args:
        unet: the UNet's layout (block widths, layers, attention; the inpainting UNet's fields). Its
            input is the noisy latent alone (``latent_channels`` channels, not the inpainting
            ``in_channels``); ``cross_attention_dim`` must equal the hidden size of
            ``generator.model.text_encoder`` and ``latent_channels`` the VAE's. The ControlNet copies
            this layout.
        conditioning_embedding_out_channels: channels of the ControlNet's condition conv stack; it
            downsamples by ``2 ** (len - 1)``, which must equal the VAE's factor (as for LGESynthNet).

    Example:
        >>> ControlNetBaselineConfig(conditioning_embedding_out_channels=(16, 32)).conditioning_embedding_out_channels
        (16, 32)
    """

    unet: InpaintUNetConfig = field(default_factory=InpaintUNetConfig)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96)

    def __post_init__(self) -> None:
        # the ControlNet's own checks, with this section's value
        self.conditioning_embedding_out_channels = ControlNetConfig(
            conditioning_embedding_out_channels=self.conditioning_embedding_out_channels).conditioning_embedding_out_channels

    def resolve(self, generator_model: GeneratorConfig, vae: VAEConfig) -> GeneratorConfig:
        """The whole model's config: ``generator_model`` (text encoder, schedule, sampler, guidance,
        captions, the ControlNet's condition kind and edge width) with this UNet layout and
        conditioning embedding, the VAE ``vae``, no reward (``reward_weight=0``) and the UNet
        trained (``train_base=True``)."""
        controlnet = dataclasses.replace(generator_model.controlnet,
                                         conditioning_embedding_out_channels=self.conditioning_embedding_out_channels)
        return dataclasses.replace(generator_model, unet=self.unet, controlnet=controlnet, vae=vae, reward_weight=0.0,
                                   train_base=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serializable fields; :meth:`from_dict` rebuilds an equal config."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControlNetBaselineConfig:
        """The config from :meth:`to_dict` output (or YAML data); a bad value raises ``ValueError`` naming it."""
        return config_io.from_dict(cls, data)


class ControlNetBaseline(LatentDiffusion):
    """The ControlNet baseline: text-to-image UNet + ControlNet on the frozen VAE's latents.

    Args:
        cfg: the resolved config (:meth:`ControlNetBaselineConfig.resolve`).
        vae: an already built (e.g. the run's trained) VAE; default ``build_vae(cfg.vae)``.

    Raises:
        ValueError: when the components do not fit together (see :class:`LatentDiffusion`).
    """

    def __init__(self, cfg: GeneratorConfig, vae: nn.Module | None = None):
        super().__init__(cfg, vae, unet_in_channels=cfg.unet.latent_channels)

    def trained_parts(self) -> nn.ModuleDict:
        """What trains and is exported, one module (``unet.*`` and ``controlnet.*`` weights, one
        sha256); the VAE and text encoder are the run's and never copied."""
        return nn.ModuleDict({"unet": self.unet, "controlnet": self.controlnet})

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, condition: torch.Tensor,
                      conditioning_scale: float | None = None) -> torch.Tensor:
        """Epsilon ``[B, c, h, w]`` of noisy latents ``[B, c, h, w]`` at timesteps ``[B]``, caption
        states ``[B, T, D]`` and condition images ``[B, 1, H, W]``: UNet and ControlNet both see the
        noisy latent alone."""
        return self._steered_noise(noisy, noisy, t, text, condition, conditioning_scale)

    def training_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                      timesteps: torch.Tensor | None = None,
                      caption_dropout: float | None = None) -> dict[str, torch.Tensor]:
        """``diffusion = MSE(eps_pred, noise)`` on the latents of the whole image (LDM), the only loss.

        Args:
            batch: "image", "caption", and "condition" or "scar".
            generator: seeds the timesteps, the noise and the caption dropout.
            timesteps: ``[B]`` timesteps to use instead of sampling them.
            caption_dropout: instead of ``cfg.caption_dropout`` (validation: 0).

        Returns:
            ``loss`` (scalar with gradient) and ``diffusion`` (the same value).
        """
        self._check_batch(batch, keys=("image", "caption"))
        latents = self._encode(batch["image"].to(self.device).float())
        t, noise, noisy = self._noised(latents, generator, timesteps)
        dropout = self.cfg.caption_dropout if caption_dropout is None else caption_dropout
        text = self.text_states(batch["caption"], generator, dropout=dropout)
        eps = self.predict_noise(noisy, t, text, self.condition(batch).to(self.device)).float()
        diffusion = F.mse_loss(eps, noise)
        return {"loss": diffusion, "diffusion": diffusion}

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                timesteps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`training_loss`, so ``DistributedDataParallel(model)(batch, generator)`` syncs gradients."""
        return self.training_loss(batch, generator, timesteps)

    @staticmethod
    def template(batch: Mapping[str, Any]) -> torch.Tensor:
        """The template ``[B, 1, H, W]``: the batch's image with its ``mask`` region (when given)
        blanked to 0, mid grey (the inpainting convention, ``engine.training.data.masked_image``)."""
        image = batch["image"].float()
        mask = batch.get("mask")
        return image if mask is None else image * (1.0 - mask.to(image.device).float())

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 template_strength: float = 1.0) -> torch.Tensor:
        """Whole images from the edge map and caption: from pure noise (``template_strength=1``, the
        ``controlnet`` method) or from the template noised to ``template_strength * T`` (below 1,
        ``controlnet-template``; see the module docstring). Scheduler math in float32; the networks
        may run under ``torch.autocast`` (bf16 on GPU).

        Args:
            batch: the batch contract.
            num_inference_steps: steps of the full schedule (default ``cfg.num_inference_steps``);
                a template start runs its last ones.
            generator: seeds the noise; a list of one generator per sample makes every sample
                independent of its batch.
            template_strength: in (0, 1].

        Returns:
            float32 ``[B, 1, H, W]`` in [-1, 1] on the model's device; nothing of the input is
            blended back.
        """
        self._check_batch(batch, keys=("image", "caption"))
        strength = check_strength(template_strength)
        scheduler = self._sampler(num_inference_steps)
        device = self.device
        b, _, h, w = batch["image"].shape
        (condition,) = self._both_halves(self.condition(batch).to(device))
        text = self._sampling_text(batch["caption"])
        timesteps = scheduler.timesteps
        f = self.vae_factor
        noise = _randn((b, self.cfg.unet.latent_channels, h // f, w // f), generator, device)
        if strength >= 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:  # SDEdit: the schedule's steps below strength * T, from the template noised to the first
            remaining = timesteps[timesteps < round(strength * self.cfg.num_train_timesteps)]
            if hasattr(scheduler, "set_begin_index"):  # multistep solvers index their history from here
                scheduler.set_begin_index(len(timesteps) - len(remaining))
            timesteps = remaining
            latents = self._encode(self.template(batch).to(device))
            if len(timesteps):
                latents = self.add_noise(latents, noise, timesteps[:1].expand(b))
        latents = self._denoise(latents, scheduler, timesteps, lambda x, t: self.predict_noise(x, t, text, condition))
        return self._decode(latents).clamp(-1.0, 1.0)
