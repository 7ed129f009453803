"""The SPADE baselines of the paper (Table 1, DOMAIN.md section 6): SPADE-FC and SPADE-LC.

A SPADE generator (Park et al. 2019, "Semantic Image Synthesis with Spatially-Adaptive
Normalization", CVPR) used for scar inpainting: MONAI's ``SPADEDecoder`` without its VAE encoder
(``is_vae=False``), so the image is a deterministic function of the semantic map it is conditioned
on. The map (:func:`semantic_map`) has :data:`SEMANTIC_CHANNELS`, each float [S, S]:

- ``blood_pool``: the LV cavity (label 1) of the target slice, 0/1;
- ``myocardium``: the myocardium including scar (labels 2-4, or'ed with the scar to synthesize), 0/1;
- ``scar``: the scar mask to synthesize, 0/1;
- ``context_image``: the visible context of the input image in [-1, 1], 0 where hidden;
- ``context_visible``: 1 where the context is visible.

Two variants differ only in the visible context (:func:`context_visibility`):

- full context (``spade-fc``): the whole input image except the region to synthesize (the scar
  dilated by ``data.mask_dilation``, the generator's inpainting mask);
- limited context (``spade-lc``): only a band around the LV (myocardium + cavity dilated by
  ``limited_margin_px``), the region to synthesize excepted; everything else is blank.

The network always outputs the whole image and nothing of the input is blended back into it. That
is what separates the variants, as in the paper: FC learns to copy the visible image (very high
SSIM, weak control of the scar it paints), LC has to invent the background beyond the band (an
incoherent background, realism suffers).

Example:
    .. code-block:: python

        config = SpadeConfig(channels=(32, 16), hidden_channels=16)
        model = build_spade(config, crop_size=64)
        seg = semantic_map(image, label, scar, mask, "full")         # [B, 5, 64, 64]
        generated = model(torch.as_tensor(seg))                      # [B, 1, 64, 64] in (-1, 1)
        loss, parts = inpainting_l1(generated, target, mask_tensor, mask_weight=5.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from engine import config as config_io
from engine.anatomy.labels import CAVITY, myocardium_region

__all__ = ["CONTEXTS", "SEMANTIC_CHANNELS", "SpadeConfig", "SpadeInpainter", "build_spade", "context_visibility",
           "inpainting_l1", "semantic_map"]

# synthesis method -> its context
CONTEXTS = {"spade-fc": "full", "spade-lc": "limited"}
SEMANTIC_CHANNELS = ("blood_pool", "myocardium", "scar", "context_image", "context_visible")


@dataclass
class SpadeConfig:
    """Architecture of the SPADE generator; saved next to its weights as the model's config.

    Args:
        channels: widths of the SPADE residual blocks, coarsest first (MONAI ``SPADEDecoder(channels=...)``).
            The map is first resampled to ``S / 2 ** len(channels)`` pixels and each block doubles the
            resolution, so the crop size must be a multiple of ``2 ** len(channels)``.
        hidden_channels: channels of the convolutions that turn the semantic map into each SPADE
            layer's scale and shift (``spade_intermediate_channels``; Park et al.: 128).
        kernel_size: convolution kernel size (odd).
        upsampling: ``"nearest"`` or ``"bilinear"`` upsampling between blocks.

    Example:
        >>> SpadeConfig(channels=(32, 16)).downsampling_factor
        4
    """

    channels: tuple[int, ...] = (64, 32, 16)
    hidden_channels: int = 64
    kernel_size: int = 3
    upsampling: Literal["nearest", "bilinear"] = "nearest"

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"channels: expected at least one positive int, got {self.channels!r}")
        if isinstance(self.hidden_channels, bool) or not isinstance(self.hidden_channels, int) or self.hidden_channels < 1:
            raise ValueError(f"hidden_channels: expected a positive int, got {self.hidden_channels!r}")
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1 \
                or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected a positive odd int, got {self.kernel_size!r}")
        if self.upsampling not in ("nearest", "bilinear"):
            raise ValueError(f"upsampling: expected 'nearest' or 'bilinear', got {self.upsampling!r}")

    @property
    def downsampling_factor(self) -> int:
        """The crop size must be a multiple of this: ``2 ** len(channels)``."""
        return 2 ** len(self.channels)

    def check_crop_size(self, crop_size: int) -> None:
        """Raise ValueError unless ``crop_size`` is a multiple of :attr:`downsampling_factor`."""
        if crop_size % self.downsampling_factor:
            raise ValueError(f"spade.model.channels has {len(self.channels)} blocks, so the crop size must be a multiple "
                             f"of {self.downsampling_factor}; data.crop_size is {crop_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serializable fields; :meth:`from_dict` rebuilds an equal config."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpadeConfig:
        """The config from :meth:`to_dict` output (or YAML data); a bad value raises ``ValueError`` naming it."""
        return config_io.from_dict(cls, data)


class SpadeInpainter(nn.Module):
    """A SPADE generator: semantic map float [B, 5, S, S] -> image float [B, 1, S, S] in (-1, 1).

    MONAI's ``SPADEDecoder`` (``is_vae=False``: the first block starts from a convolution of the
    downsampled map, not from a noise vector) with no activation on its last convolution, bounded by
    ``tanh`` as in Park et al.
    """

    def __init__(self, config: SpadeConfig, crop_size: int):
        from monai.networks.nets.spade_network import SPADEDecoder

        super().__init__()
        config.check_crop_size(crop_size)
        self.config, self.crop_size = config, int(crop_size)
        self.decoder = SPADEDecoder(
            spatial_dims=2, out_channels=1, label_nc=len(SEMANTIC_CHANNELS), input_shape=(crop_size, crop_size),
            channels=list(config.channels),  # SPADEDecoder appends out_channels to the list it is given
            is_vae=False, spade_intermediate_channels=config.hidden_channels, kernel_size=config.kernel_size,
            upsampling_mode=config.upsampling, last_act=None,
        )

    def forward(self, seg: torch.Tensor) -> torch.Tensor:
        expected = (len(SEMANTIC_CHANNELS), self.crop_size, self.crop_size)
        if seg.ndim != 4 or tuple(seg.shape[1:]) != expected:
            raise ValueError(f"SpadeInpainter: expected a semantic map [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got shape {tuple(seg.shape)}")
        return torch.tanh(self.decoder(seg))


def build_spade(config: SpadeConfig, crop_size: int) -> SpadeInpainter:
    """A freshly initialised :class:`SpadeInpainter` for ``crop_size`` px crops (seeded by torch's RNG)."""
    return SpadeInpainter(config, crop_size)


def _masks(x: np.ndarray, n: int, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim != 3 or len(x) != n:
        raise ValueError(f"semantic_map: {name} must be [n, 1, S, S] or [n, S, S] with n = {n}, got {x.shape}")
    return x > 0


def context_visibility(label: np.ndarray, mask: np.ndarray, context: str, limited_margin_px: int = 0) -> np.ndarray:
    """Where the input image is shown to the network, bool [n, S, S].

    Args:
        label: DOMAIN labels of the target slices [n, S, S].
        mask: the region to synthesize [n, S, S] (or [n, 1, S, S]): the dilated scar; never visible.
        context: ``"full"`` (everything outside ``mask``) or ``"limited"`` (only the LV, myocardium and
            cavity, dilated by ``limited_margin_px`` pixels, 8-connected, outside ``mask``).
        limited_margin_px: width of the band beyond the LV (``"limited"`` only).
    """
    from engine.training.data import dilate_masks

    label = np.asarray(label)
    hidden = _masks(mask, len(label), "mask")
    if context == "full":
        return ~hidden
    if context != "limited":
        raise ValueError(f"context must be 'full' or 'limited', got {context!r}")
    if limited_margin_px < 0:
        raise ValueError(f"limited_margin_px must be >= 0, got {limited_margin_px}")
    heart = (label == CAVITY) | myocardium_region(label)
    return dilate_masks(heart, limited_margin_px) & ~hidden


def semantic_map(image: np.ndarray, label: np.ndarray, scar: np.ndarray, mask: np.ndarray, context: str,
                 limited_margin_px: int = 0) -> np.ndarray:
    """The SPADE conditioning map of :data:`SEMANTIC_CHANNELS`, float32 [n, 5, S, S].

    Args:
        image: the input slices [n, 1, S, S] in [-1, 1] (a real positive slice in training, the
            negative source slice in synthesis); only its visible part enters the map.
        label: their DOMAIN labels [n, S, S] (a negative source slice's labels hold no scar: the scar
            to synthesize is or'ed into the myocardium channel, so training and synthesis maps agree).
        scar: the scar mask to synthesize [n, 1, S, S] (or [n, S, S]).
        mask: the region to synthesize, the scar dilated by ``data.mask_dilation`` [n, 1, S, S].
        context, limited_margin_px: see :func:`context_visibility`.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"semantic_map: image must be [n, 1, S, S], got {image.shape}")
    n = len(image)
    label = np.asarray(label)
    if label.shape != (n, *image.shape[2:]):
        raise ValueError(f"semantic_map: label must be [n, S, S] = {(n, *image.shape[2:])}, got {label.shape}")
    scar = _masks(scar, n, "scar")
    visible = context_visibility(label, mask, context, limited_margin_px)
    out = np.empty((n, len(SEMANTIC_CHANNELS), *image.shape[2:]), np.float32)
    out[:, 0] = label == CAVITY
    out[:, 1] = myocardium_region(label) | scar
    out[:, 2] = scar
    out[:, 3] = np.where(visible, image[:, 0], np.float32(0.0))
    out[:, 4] = visible
    return out


def inpainting_l1(generated: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                  mask_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L1(whole image) + mask_weight * L1(inside the region to synthesize)``.

    Args:
        generated, image: float [B, 1, S, S] in [-1, 1].
        mask: float [B, 1, S, S], 1 in the region to synthesize (its L1 is the mean over those pixels;
            0 for a batch without any).
        mask_weight: weight of the masked term, >= 0.

    Returns:
        ``(loss, parts)``: a scalar tensor with gradients, and detached ``"l1"`` and ``"l1_mask"``.
    """
    if mask_weight < 0:
        raise ValueError(f"mask_weight must be >= 0, got {mask_weight}")
    error = (generated.float() - image.float()).abs()
    whole = error.mean()
    inside = (error * mask).sum() / mask.sum().clamp_min(1.0)
    loss = whole + mask_weight * inside
    return loss, {"l1": whole.detach(), "l1_mask": inside.detach()}
