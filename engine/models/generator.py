"""LGESynthNet: reward-guided, ControlNet-steered latent-diffusion inpainting of myocardial scar.

The method (DOMAIN.md section 4; "LGESynthNet: Controlled Scar Synthesis for Improved Scar
Segmentation in Cardiac LGE-MRI Imaging"): a positive LGE slice with its scar
region masked out is inpainted by a latent diffusion model conditioned on the scar's edge map (through
a ControlNet) and an anatomy-aware caption (through cross-attention). Training adds to the diffusion
loss a reward loss at low-noise timesteps: a frozen scar segmentation network (the reward model)
segments the predicted clean image, and a soft Dice loss pulls its prediction towards the intended
scar mask. At inference a negative slice receives a parametric scar mask, its edge map and caption.

Components (one file each): the frozen one-channel VAE (``engine.models.vae``), the 9-channel
inpainting UNet (``engine.models.inpaint_unet``), the ControlNet (``engine.models.controlnet``), the
frozen caption encoder (``engine.models.text_encoder``). The ControlNet always trains; the UNet trains
only with ``train_base=True`` (e.g. a first stage that learns plain inpainting); the VAE, the text
encoder and the reward model never do.
What is not particular to inpainting (the frozen parts, the UNet + ControlNet pair, the noise
schedule, the sampler and its loop with classifier-free guidance) is :class:`LatentDiffusion`, which
the paper's ControlNet baselines (``engine.models.controlnet_baseline``) share.

Batch contract (all torch, B samples, H x W pixels, H and W multiples of :attr:`LGESynthNet.size_multiple`):

=============  ===================  ================================================================
key            value                meaning
=============  ===================  ================================================================
"image"        float [B,1,H,W]      the real slice, intensities in [-1, 1]
"mask"         float [B,1,H,W]      region to inpaint, {0, 1} (the scar mask dilated by
                                    ``mask_dilation`` pixels, :func:`inpaint_mask`)
"scar"         float [B,1,H,W]      the intended scar mask, {0, 1}: the reward's target
"condition"    float [B,1,H,W]      optional: the ControlNet's image, {0, 1} (edge map or filled
                                    mask); built from "scar" as configured when absent
"caption"      list[str] of B       captions (``engine.anatomy.captions``)
=============  ===================  ================================================================

:meth:`LGESynthNet.make_batch` builds the contract from images, scar masks and captions, applying
the config's ablation switches (edge map or filled mask; descriptive or constant caption). Captions are
made constant inside the model as well, so ``caption_mode="constant"`` holds whatever the batch says.

Example:
    .. code-block:: python

        model = LGESynthNet(GeneratorConfig())
        batch = model.make_batch(images, scar_masks, captions)
        out = model.training_loss(batch, reward_model=reward_model, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()                       # reaches model.trainable_parameters() only
        synthetic = model.generate(batch, generator=torch.Generator().manual_seed(0))   # [B, 1, H, W]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine import config as config_io
from engine.anatomy.captions import CONSTANT_CAPTION
from engine.models.controlnet import ControlNetConfig, build_controlnet, conditioning_image, copy_unet_weights
from engine.models.inpaint_unet import InpaintUNetConfig, build_unet
from engine.models.text_encoder import TextEncoder, TextEncoderConfig
from engine.models.vae import VAEConfig, build_vae, decode_latents, encode_latents

__all__ = ["GeneratorConfig", "LatentDiffusion", "LGESynthNet", "inpaint_mask", "soft_dice_loss", "COMPONENTS"]

COMPONENTS = ("unet", "controlnet", "vae")  # what a generator checkpoint holds; the text encoder is a path


@dataclass
class GeneratorConfig:
    """The whole LGESynthNet generator: its components, noise schedule, sampler and losses.

    Args:
        text_encoder: caption encoder (frozen; a path, never saved).
        unet: inpainting UNet layout; ``unet.cross_attention_dim`` must equal the text encoder's
            hidden size and ``unet.latent_channels`` the VAE's.
        controlnet: ControlNet condition and conditioning embedding.
        vae: the one-channel autoencoder (frozen here; trained by its own stage).
        scheduler: sampler of :meth:`LGESynthNet.generate`: "ddim" (deterministic DDIM, eta 0) or
            "dpm-solver" (DPM-Solver++ 2M); both on the training noise schedule.
        num_train_timesteps: diffusion steps of the training noise schedule.
        beta_schedule, beta_start, beta_end: the noise schedule (diffusers names; the LDM default).
        num_inference_steps: sampler steps of ``generate`` (20; 2-4 in tests).
        guidance_scale: classifier-free guidance weight; 1.0 switches guidance off, above 1 the
            unconditional branch uses the empty caption (train with ``caption_dropout`` > 0 for it).
        caption_dropout: probability that a training caption is replaced by the empty caption.
        reward_weight: weight of the reward (soft Dice) loss added to the diffusion loss.
        reward_t_max_fraction: the reward loss is computed only for samples with
            ``t <= reward_t_max_fraction * num_train_timesteps``: low noise, where the one-step
            prediction of the clean image is meaningful (the paper's "early diffusion steps").
        caption_mode: "descriptive" (anatomy-aware captions) or "constant" (the paper's ablation:
            every caption becomes ``engine.anatomy.captions.CONSTANT_CAPTION``).
        mask_dilation: pixels by which the inpainted region extends beyond the scar mask
            (:meth:`LGESynthNet.make_batch`), so the model also redraws the scar's border zone.
        train_base: also train the inpainting UNet (else it is frozen and only the ControlNet trains).

    Example:
        >>> cfg = GeneratorConfig(scheduler="dpm-solver", reward_weight=0.0)
        >>> cfg.reward_t_max
        200
    """

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: InpaintUNetConfig = field(default_factory=InpaintUNetConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    scheduler: Literal["ddim", "dpm-solver"] = "ddim"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    caption_dropout: float = 0.0
    reward_weight: float = 0.1
    reward_t_max_fraction: float = 0.2
    caption_mode: Literal["descriptive", "constant"] = "descriptive"
    mask_dilation: int = 2
    train_base: bool = False

    def __post_init__(self) -> None:
        if self.scheduler not in ("ddim", "dpm-solver"):
            raise ValueError(f"scheduler must be 'ddim' or 'dpm-solver', got {self.scheduler!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in 1..{self.num_train_timesteps}, got {self.num_inference_steps}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1.0 (1.0 = no guidance), got {self.guidance_scale}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be a probability in [0, 1), got {self.caption_dropout}")
        if self.reward_weight < 0:
            raise ValueError(f"reward_weight must be >= 0, got {self.reward_weight}")
        if not 0.0 <= self.reward_t_max_fraction <= 1.0:
            raise ValueError(f"reward_t_max_fraction must be in [0, 1], got {self.reward_t_max_fraction}")
        if self.caption_mode not in ("descriptive", "constant"):
            raise ValueError(f"caption_mode must be 'descriptive' or 'constant', got {self.caption_mode!r}")
        if self.mask_dilation < 0:
            raise ValueError(f"mask_dilation must be >= 0 pixels, got {self.mask_dilation}")

    @property
    def reward_t_max(self) -> int:
        """Largest timestep that receives the reward loss."""
        return int(self.reward_t_max_fraction * self.num_train_timesteps)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serializable fields; :meth:`from_dict` rebuilds an equal config."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """The config from :meth:`to_dict` output (or YAML data); a bad value raises ``ValueError`` naming it."""
        return config_io.from_dict(cls, data)


def inpaint_mask(scar: torch.Tensor, dilation: int) -> torch.Tensor:
    """The region to inpaint: scar masks ``[B, 1, H, W]`` dilated by a disc of ``dilation`` pixels, {0, 1}."""
    mask = (scar > 0.5).float()
    if dilation == 0:
        return mask
    r = torch.arange(-dilation, dilation + 1, device=scar.device, dtype=torch.float32)
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) <= dilation**2).float()[None, None]
    return (F.conv2d(mask, disc, padding=dilation) > 0.5).float()


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Per-sample soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` over each sample's pixels.

    The same formula as MONAI ``DiceLoss(smooth_nr=s, smooth_dr=s, batch=False)``, returned per sample.

    Args:
        probabilities: ``[B, 1, H, W]`` in [0, 1] (sigmoid of the reward model's scar logit).
        target: ``[B, 1, H, W]`` in {0, 1} (the intended scar mask).

    Returns:
        ``[B]`` losses in [0, 1].
    """
    dims = tuple(range(1, probabilities.ndim))
    intersection = (probabilities * target).sum(dims)
    total = probabilities.sum(dims) + target.sum(dims)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def _randn(shape, generator: torch.Generator | list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """Normal noise drawn on the generator's device (so a seeded CPU generator gives the same noise
    whatever the model's device), float32 on ``device``. A list of ``shape[0]`` generators draws
    each sample's noise from its own generator (as diffusers' ``randn_tensor``), so a sample's
    noise does not depend on the batch it shares."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([_randn((1, *shape[1:]), g, device) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


class LatentDiffusion(nn.Module):
    """What LGESynthNet and the paper's ControlNet baselines (:mod:`engine.models.controlnet_baseline`)
    share: the frozen VAE and caption encoder, a diffusers UNet steered by a ControlNet on the VAE's
    latents, the training noise schedule, the sampler and its loop (classifier-free guidance
    included). Both read a :class:`GeneratorConfig`; a subclass decides what its UNet sees besides the
    noisy latent (``unet_in_channels``) and what happens between sampler steps.

    Args:
        cfg: the model's config.
        vae: an already built (e.g. trained) VAE; default: ``build_vae(cfg.vae)``, to be filled by
            :meth:`load_state_dicts`.
        unet_in_channels: the UNet's input channels; default ``cfg.unet.in_channels``, the inpainting
            layout (noisy latent, mask, masked-image latent).

    Raises:
        ValueError: when the components do not fit together (caption width, latent channels, the
            ControlNet's conditioning embedding versus the VAE's downsampling).
    """

    def __init__(self, cfg: GeneratorConfig, vae: nn.Module | None = None, unet_in_channels: int | None = None):
        super().__init__()
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.text_encoder = TextEncoder(cfg.text_encoder)
        self.vae = _freeze(vae if vae is not None else build_vae(cfg.vae))
        if self.text_encoder.hidden_size != cfg.unet.cross_attention_dim:
            raise ValueError(
                f"unet.cross_attention_dim {cfg.unet.cross_attention_dim} must equal the text encoder's hidden "
                f"size {self.text_encoder.hidden_size} (text_encoder kind={cfg.text_encoder.kind!r}, "
                f"path={cfg.text_encoder.path!r})")
        if self.vae.config.latent_channels != cfg.unet.latent_channels:
            raise ValueError(
                f"unet.latent_channels {cfg.unet.latent_channels} must equal the VAE's latent_channels "
                f"{self.vae.config.latent_channels}")
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if cfg.controlnet.downsampling_factor != self.vae_factor:
            raise ValueError(
                f"controlnet.conditioning_embedding_out_channels {cfg.controlnet.conditioning_embedding_out_channels} "
                f"downsample by {cfg.controlnet.downsampling_factor}, the VAE by {self.vae_factor}: use "
                f"{int(math.log2(self.vae_factor)) + 1} entries")
        self.unet = build_unet(cfg.unet, cfg.unet.in_channels if unet_in_channels is None else unet_in_channels)
        self.controlnet = build_controlnet(cfg.controlnet, cfg.unet, unet=self.unet)
        self.noise_scheduler = DDPMScheduler(**self._schedule_kwargs())
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.float().clone(), persistent=False)

    # ----------------------------------------------------------------------------------- structure
    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (VAE times UNet downsampling)."""
        return self.vae_factor * self.cfg.unet.downsampling_factor

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to training behaviour
        self.text_encoder.eval()
        return self

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Weights by component name (``COMPONENTS``), ready for ``safetensors.torch.save_file`` each."""
        return {name: {k: v.detach().contiguous() for k, v in getattr(self, name).state_dict().items()}
                for name in COMPONENTS}

    def load_state_dicts(self, state_dicts: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Load the components present in ``state_dicts`` (strictly: every key of a component must match).

        Raises:
            KeyError: for a name that is not a saved component (the text encoder is a path, not weights).
        """
        unknown = set(state_dicts) - set(COMPONENTS)
        if unknown:
            raise KeyError(f"unknown generator components {sorted(unknown)}; expected some of {list(COMPONENTS)}")
        for name, state in state_dicts.items():
            getattr(self, name).load_state_dict(dict(state), strict=True)

    def _schedule_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return dict(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                    beta_start=c.beta_start, beta_end=c.beta_end, prediction_type="epsilon")

    def make_sampler(self):
        """A fresh sampling scheduler of the configured kind (schedulers keep per-run state)."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        if self.cfg.scheduler == "ddim":
            # trailing spacing starts at the last training step; alpha_0 = 1 ends fully denoised
            return DDIMScheduler(**self._schedule_kwargs(), clip_sample=False, set_alpha_to_one=True,
                                 timestep_spacing="trailing")
        return DPMSolverMultistepScheduler(**self._schedule_kwargs(), algorithm_type="dpmsolver++", solver_order=2,
                                           timestep_spacing="trailing")

    # --------------------------------------------------------------------------------- conditioning
    def captions(self, captions: list[str]) -> list[str]:
        """The captions the model is conditioned on: as given, or constant with ``caption_mode="constant"``."""
        if self.cfg.caption_mode == "constant":
            return [CONSTANT_CAPTION] * len(captions)
        return list(captions)

    def condition(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The ControlNet's image: ``batch["condition"]``, or built from ``batch["scar"]`` as configured."""
        if batch.get("condition") is not None:
            return batch["condition"].float()
        if batch.get("scar") is None:
            raise KeyError("the batch needs 'condition' or 'scar' (to build the condition from)")
        return conditioning_image(batch["scar"].float(), self.cfg.controlnet.conditioning, self.cfg.controlnet.edge_width)

    def text_states(self, captions: list[str], generator: torch.Generator | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
        """Caption states ``[B, T, D]`` on the model's device; with ``dropout`` some become the empty caption."""
        captions = self.captions(captions)
        if dropout > 0:
            drop = torch.rand(len(captions), generator=generator,
                              device=generator.device if generator is not None else "cpu") < dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return self.text_encoder.encode(captions).to(self.device)

    def _check_batch(self, batch: Mapping[str, Any], keys=("image", "mask", "caption")) -> None:
        for key in keys:
            if key not in batch or batch[key] is None:
                raise KeyError(f"the batch has no {key!r} (needs {', '.join(keys)})")
        image = batch["image"]
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"batch 'image' must be [B, 1, H, W], got {tuple(image.shape)}")
        b, _, h, w = image.shape
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"image height and width must be multiples of {self.size_multiple} "
                             f"(VAE x UNet downsampling), got {h}x{w}")
        for key in ("mask", "scar", "condition"):
            value = batch.get(key)
            if value is not None and tuple(value.shape) != tuple(image.shape):
                raise ValueError(f"batch {key!r} must have the image's shape {tuple(image.shape)}, got {tuple(value.shape)}")
        if batch.get("mask") is not None and not ((batch["mask"] == 0) | (batch["mask"] == 1)).all():
            raise ValueError("batch 'mask' must hold only 0 and 1")
        captions = batch["caption"]
        if isinstance(captions, str) or len(captions) != b:
            raise ValueError(f"batch 'caption' must be a list of {b} strings")
        if image.numel() and (image.min() < -1.0 - 1e-3 or image.max() > 1.0 + 1e-3):
            raise ValueError(f"batch 'image' must lie in [-1, 1], got [{image.min():.3f}, {image.max():.3f}]")

    # ------------------------------------------------------------------------------------ network
    def _noise_level(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)`` shaped ``[B, 1, 1, 1]``, float32."""
        a = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return a.sqrt(), (1.0 - a).sqrt()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` (DDPM forward process), float32."""
        s, n = self._noise_level(t)
        return s * latents.float() + n * noise.float()

    def _noised(self, latents: torch.Tensor, generator: torch.Generator | None,
                timesteps: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training draw: timesteps ``t`` [B] (uniform, or ``timesteps`` checked), the noise, and
        the noisy latents ``x_t``; drawn from ``generator`` in that order."""
        device, b = self.device, latents.shape[0]
        if timesteps is None:
            gen_device = generator.device if generator is not None else device
            t = torch.randint(0, self.cfg.num_train_timesteps, (b,), generator=generator, device=gen_device).to(device)
        else:
            t = torch.as_tensor(timesteps, device=device).long().reshape(-1)
            if t.shape[0] != b or t.min() < 0 or t.max() >= self.cfg.num_train_timesteps:
                raise ValueError(f"timesteps must be {b} integers in [0, {self.cfg.num_train_timesteps})")
        noise = _randn(latents.shape, generator, device)
        return t, noise, self.add_noise(latents, noise, t)

    def _steered_noise(self, noisy: torch.Tensor, unet_in: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                       condition: torch.Tensor, conditioning_scale: float | None = None) -> torch.Tensor:
        """The UNet's epsilon prediction on ``unet_in`` with the residuals of the ControlNet, which
        sees the noisy latent ``noisy`` and the condition image."""
        scale = self.cfg.controlnet.conditioning_scale if conditioning_scale is None else conditioning_scale
        down, mid = self.controlnet(noisy, t, encoder_hidden_states=text, controlnet_cond=condition,
                                    conditioning_scale=scale, return_dict=False)
        return self.unet(unet_in, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return encode_latents(self.vae, images).float()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents).float()

    # ----------------------------------------------------------------------------------- sampling
    def _sampler(self, num_inference_steps: int | None):
        """A fresh sampler with its timesteps set (``num_inference_steps``, default the config's)."""
        steps = self.cfg.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        if not 1 <= steps <= self.cfg.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in 1..{self.cfg.num_train_timesteps}, got {steps}")
        scheduler = self.make_sampler()
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    @property
    def _guided(self) -> bool:
        return self.cfg.guidance_scale > 1.0

    def _sampling_text(self, captions: list[str]) -> torch.Tensor:
        """Caption states for sampling; under guidance the empty caption's states come first
        (unconditional half, then conditional half of one batched call)."""
        text = self.text_states(captions)
        if self._guided:
            text = torch.cat([self.text_encoder.encode([""] * len(captions)).to(self.device), text])
        return text

    def _both_halves(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-sample inputs repeated for the unconditional and conditional halves under guidance."""
        return tuple(torch.cat([x, x]) for x in tensors) if self._guided else tensors

    def _denoise(self, latents: torch.Tensor, scheduler, timesteps: torch.Tensor, predict,
                 after_step=None) -> torch.Tensor:
        """The sampler loop: at every timestep ``eps = predict(model_in, t [B'])`` (both halves under
        guidance, combined with ``guidance_scale``), one scheduler step in float32, then
        ``latents = after_step(i, latents)`` when given."""
        for i, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(latents, t)
            model_in = torch.cat([model_in, model_in]) if self._guided else model_in
            eps = predict(model_in, t.expand(model_in.shape[0])).float()
            if self._guided:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + self.cfg.guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents.float(), return_dict=False)[0].float()
            if after_step is not None:
                latents = after_step(i, latents)
        return latents


class LGESynthNet(LatentDiffusion):
    """The generator: frozen VAE and text encoder, inpainting UNet, ControlNet, noise schedule.

    Args:
        cfg: the generator's config.
        vae: an already built (e.g. trained) VAE; default: ``build_vae(cfg.vae)``, to be filled by
            :meth:`load_state_dicts`.

    Raises:
        ValueError: when the components do not fit together (caption width, latent channels, the
            ControlNet's conditioning embedding versus the VAE's downsampling).
    """

    def __init__(self, cfg: GeneratorConfig, vae: nn.Module | None = None):
        super().__init__(cfg, vae)
        self.unet.requires_grad_(cfg.train_base)

    # ----------------------------------------------------------------------------------- structure
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should own: the ControlNet's, plus the UNet's with ``train_base``."""
        params = list(self.controlnet.parameters())
        if self.cfg.train_base:
            params += list(self.unet.parameters())
        return params

    def train(self, mode: bool = True) -> LGESynthNet:
        super().train(mode)
        if not self.cfg.train_base:
            self.unet.eval()
        return self

    def init_controlnet_from_unet(self) -> None:
        """Restart the ControlNet's encoder from the current UNet's weights (e.g. after loading a
        trained inpainting UNet); its zero convolutions are reset to zero, so it starts as a no-op."""
        copy_unet_weights(self.controlnet, self.unet)
        with torch.no_grad():
            for module in [self.controlnet.controlnet_cond_embedding.conv_out, *self.controlnet.controlnet_down_blocks,
                           self.controlnet.controlnet_mid_block]:
                for p in module.parameters():
                    p.zero_()

    # --------------------------------------------------------------------------------- conditioning
    def make_batch(self, image: torch.Tensor, scar: torch.Tensor, caption: list[str]) -> dict[str, Any]:
        """The batch contract from images ``[B,1,H,W]`` in [-1, 1], intended scar masks ``[B,1,H,W]``
        and captions: the inpainting mask is the scar dilated by ``mask_dilation`` pixels, the condition
        the scar's edge map or filled mask (``controlnet.conditioning``), the captions as configured."""
        scar = (scar > 0.5).float()
        batch = {
            "image": image,
            "scar": scar,
            "mask": inpaint_mask(scar, self.cfg.mask_dilation),
            "condition": conditioning_image(scar, self.cfg.controlnet.conditioning, self.cfg.controlnet.edge_width),
            "caption": self.captions(list(caption)),
        }
        self._check_batch(batch)
        return batch

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The inpainting mask at latent resolution: a latent pixel is inpainted when any of its
        ``f x f`` image pixels is (max pooling; nearest-neighbour resizing could drop a thin scar)."""
        return F.max_pool2d(mask.float(), kernel_size=self.vae_factor)

    # ------------------------------------------------------------------------------------ network
    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, latent_mask: torch.Tensor,
                      masked_latents: torch.Tensor, condition: torch.Tensor,
                      conditioning_scale: float | None = None) -> torch.Tensor:
        """Epsilon prediction of the UNet steered by the ControlNet.

        Args:
            noisy: ``[B, c, h, w]`` noisy latents; ``t``: ``[B]`` timesteps; ``text``: ``[B, T, D]``;
            latent_mask: ``[B, 1, h, w]``; masked_latents: ``[B, c, h, w]`` latents of the masked image;
            condition: ``[B, 1, H, W]`` the ControlNet's image.

        Returns:
            ``[B, c, h, w]`` predicted noise (model dtype; float32 outside autocast).
        """
        unet_in = torch.cat([noisy, latent_mask.to(noisy.dtype), masked_latents.to(noisy.dtype)], dim=1)
        return self._steered_noise(noisy, unet_in, t, text, condition, conditioning_scale)

    # ----------------------------------------------------------------------------------- training
    def training_loss(self, batch: Mapping[str, Any], reward_model: nn.Module | None = None,
                      generator: torch.Generator | None = None,
                      timesteps: torch.Tensor | None = None) -> dict[str, Any]:
        """Diffusion loss plus the reward loss at low-noise timesteps.

        ``diffusion = MSE(eps_pred, noise)`` (epsilon prediction, LDM). For the samples with
        ``t <= cfg.reward_t_max`` the clean latent is predicted in one step,
        ``x0 = (x_t - sqrt(1 - a_t) eps_pred) / sqrt(a_t)``, decoded by the frozen VAE (with gradient),
        the known region restored (``mask * decoded + (1 - mask) * image``), segmented by the frozen
        reward model, and ``reward`` = mean :func:`soft_dice_loss` of its scar probability (sigmoid of
        channel 0) against ``batch["scar"]``. ``loss = diffusion + reward_weight * reward``.

        Args:
            batch: the batch contract; "scar" is needed when ``reward_model`` is given.
            reward_model: the frozen scar segmentation network (``engine.models.reward``), or None
                for the diffusion loss alone. It is frozen in place (``requires_grad=False``, eval mode).
            generator: seeds the timesteps, the noise and caption dropout.
            timesteps: ``[B]`` timesteps to use instead of sampling them (tests, curricula).

        Returns:
            ``loss`` (scalar with gradient), ``diffusion`` and ``reward`` (scalar tensors; reward is 0
            without graph when no sample qualifies), ``n_reward`` (int: samples with a reward term).
        """
        self._check_batch(batch, keys=("image", "mask", "caption") + (("scar",) if reward_model is not None else ()))
        device = self.device
        image = batch["image"].to(device).float()
        mask = batch["mask"].to(device).float()

        latents = self._encode(image)
        masked_latents = self._encode(image * (1.0 - mask))
        latent_mask = self.latent_mask(mask)
        t, noise, noisy = self._noised(latents, generator, timesteps)
        text = self.text_states(batch["caption"], generator, dropout=self.cfg.caption_dropout)
        condition = self.condition(batch).to(device)

        eps = self.predict_noise(noisy, t, text, latent_mask, masked_latents, condition).float()
        diffusion = F.mse_loss(eps, noise)

        reward = torch.zeros((), device=device)
        selected = t <= self.cfg.reward_t_max
        n_reward = int(selected.sum()) if reward_model is not None and self.cfg.reward_weight > 0 else 0
        if n_reward:
            _freeze(reward_model)
            idx = selected.nonzero().squeeze(1)
            sqrt_a, sqrt_1ma = self._noise_level(t[idx])
            x0 = (noisy[idx] - sqrt_1ma * eps[idx]) / sqrt_a
            decoded = self._decode(x0)
            m = mask[idx]
            x0_image = m * decoded + (1.0 - m) * image[idx]
            scar_probability = torch.sigmoid(reward_model(x0_image)[:, :1].float())
            reward = soft_dice_loss(scar_probability, batch["scar"].to(device)[idx].float()).mean()
        loss = diffusion + self.cfg.reward_weight * reward if n_reward else diffusion
        return {"loss": loss, "diffusion": diffusion, "reward": reward, "n_reward": n_reward}

    def forward(self, batch: Mapping[str, Any], reward_model: nn.Module | None = None,
                generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None) -> dict[str, Any]:
        """:meth:`training_loss`, so ``DistributedDataParallel(model)(batch, reward_model)`` syncs gradients."""
        return self.training_loss(batch, reward_model, generator, timesteps)

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(self, batch: Mapping[str, Any], num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Inpaint the masked region of every image: the one sampling entry (previews, synthesis, evaluation).

        A custom loop with the configured diffusers scheduler. After every step the latent outside the
        latent mask is replaced by the known latent noised to the step's timestep (RePaint / LDM
        inpainting), and the decoded image is blended with the input outside the mask, so pixels
        outside ``batch["mask"]`` equal the input exactly. Scheduler math runs in float32; the
        networks may run under ``torch.autocast`` (bf16 on GPU).

        Args:
            batch: the batch contract ("image", "mask", "caption", and "condition" or "scar").
            num_inference_steps: sampler steps (default ``cfg.num_inference_steps``).
            generator: seeds the initial noise: the same seed gives the same images; a list of
                one generator per sample makes every sample independent of its batch.

        Returns:
            float32 ``[B, 1, H, W]`` in [-1, 1] on the model's device.
        """
        self._check_batch(batch)
        scheduler = self._sampler(num_inference_steps)
        device = self.device
        image = batch["image"].to(device).float()
        mask = batch["mask"].to(device).float()
        b = image.shape[0]

        # One VAE call: each distinct source image once (the K candidates of a slice share it) and
        # every masked copy. An encode is ~20% of a CPU sample at 10 steps.
        sources, source_of = torch.unique(image.flatten(1), dim=0, return_inverse=True)
        encoded = self._encode(torch.cat([sources.view(-1, *image.shape[1:]), image * (1.0 - mask)]))
        known, masked_latents = encoded[:len(sources)][source_of], encoded[len(sources):]
        latent_mask = self.latent_mask(mask)
        condition = self.condition(batch).to(device)
        text = self._sampling_text(batch["caption"])
        masked_in, mask_in, condition_in = self._both_halves(masked_latents, latent_mask, condition)

        timesteps = scheduler.timesteps
        noise = _randn(known.shape, generator, device)
        keep = 1.0 - latent_mask
        latents = noise * scheduler.init_noise_sigma
        latents = latent_mask * latents + keep * self.add_noise(known, noise, timesteps[:1].expand(b))

        def repaint(i: int, latents: torch.Tensor) -> torch.Tensor:
            known_t = self.add_noise(known, noise, timesteps[i + 1].expand(b)) if i + 1 < len(timesteps) else known
            return latent_mask * latents + keep * known_t

        latents = self._denoise(latents, scheduler, timesteps,
                                lambda x, t: self.predict_noise(x, t, text, mask_in, masked_in, condition_in), repaint)
        decoded = self._decode(latents).clamp(-1.0, 1.0)
        return mask * decoded + (1.0 - mask) * image
