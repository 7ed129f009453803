"""The scar-segmentation reward model: a MONAI ``UNet`` that segments scar (and the myocardium region).

LGESynthNet (DOMAIN.md section 4) trains this network on real slices and then freezes it. It serves
twice: as the generator's reward (its scar prediction on the predicted clean image is compared with
the intended scar mask at low-noise timesteps) and as the quality filter (a synthetic sample is kept
only when Dice(predicted scar, conditioning mask) exceeds a threshold; the prediction becomes the
label).

Outputs are multi-label logits, one sigmoid per channel, not a softmax over classes: channel 0 is
scar (labels 3 and 4, i.e. scar and MVO), channel 1 (with ``outputs="scar+myocardium"``) is the
myocardium region (labels 2, 3 and 4), which contains the scar. The myocardium channel is an
auxiliary target: it gives the network the anatomical context that scar lies in the myocardium.

Example:
    .. code-block:: python

        config = RewardModelConfig(channels=(8, 16, 32), strides=(2, 2))
        reward_model = build_reward_model(config)
        loss_fn = reward_loss_fn(config)
        loss = loss_fn(reward_model(images), targets_from_label(labels, config.outputs))
        scar_prob, scar_mask = predict_scar(reward_model.eval(), images)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from engine import config as config_io
from engine.anatomy.labels import MVO, MYOCARDIUM, SCAR

__all__ = [
    "RewardModelConfig",
    "ScarRewardModel",
    "build_reward_model",
    "targets_from_label",
    "segmentation_loss",
    "reward_loss_fn",
    "predict_scar",
]

OUTPUT_CHANNELS = {"scar": 1, "scar+myocardium": 2}


@dataclass
class RewardModelConfig:
    """Architecture and loss of the reward model; saved next to its weights as the model's config.

    Args:
        channels: Feature channels of each U-Net level, coarsest last (MONAI ``UNet(channels=...)``).
        strides: Downsampling stride between consecutive levels; one fewer than ``channels``. Input
            height and width must be multiples of their product (8 for the default).
        num_res_units: Residual units per convolution block (MONAI ``UNet(num_res_units=...)``).
        dropout: Dropout probability in every block, in [0, 1).
        norm: ``"instance"`` (default; per-image statistics, so a frozen model is insensitive to the
            global intensity shifts of generated images) or ``"batch"``.
        outputs: ``"scar"`` (one channel) or ``"scar+myocardium"`` (two channels: scar, myocardium region).
        loss: ``"dice_focal"`` (default) or ``"dice_ce"``; see :func:`segmentation_loss`.

    Example:
        >>> RewardModelConfig(channels=(8, 16, 32), strides=(2, 2)).num_outputs
        2
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    dropout: float = 0.0
    norm: Literal["instance", "batch"] = "instance"
    outputs: Literal["scar", "scar+myocardium"] = "scar+myocardium"
    loss: Literal["dice_focal", "dice_ce"] = "dice_focal"

    def __post_init__(self):
        self.channels, self.strides = tuple(self.channels), tuple(self.strides)
        if len(self.channels) < 2 or any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"channels: expected at least two positive ints, got {self.channels!r}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides: expected {len(self.channels) - 1} values (one fewer than channels), "
                             f"got {self.strides!r}")
        if any(not isinstance(s, int) or s < 1 for s in self.strides):
            raise ValueError(f"strides: expected positive ints, got {self.strides!r}")
        if self.num_res_units < 0:
            raise ValueError(f"num_res_units: expected >= 0, got {self.num_res_units!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.norm not in ("instance", "batch"):
            raise ValueError(f"norm: expected 'instance' or 'batch', got {self.norm!r}")
        if self.outputs not in OUTPUT_CHANNELS:
            raise ValueError(f"outputs: expected one of {sorted(OUTPUT_CHANNELS)}, got {self.outputs!r}")
        if self.loss not in ("dice_focal", "dice_ce"):
            raise ValueError(f"loss: expected 'dice_focal' or 'dice_ce', got {self.loss!r}")

    @property
    def num_outputs(self) -> int:
        """Output channels: 1 for ``"scar"``, 2 for ``"scar+myocardium"``."""
        return OUTPUT_CHANNELS[self.outputs]

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (the product of ``strides``)."""
        return math.prod(self.strides)

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serializable fields; :meth:`from_dict` rebuilds an equal config."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewardModelConfig:
        """The config from :meth:`to_dict` output (or YAML data); a bad value raises ``ValueError`` naming it."""
        return config_io.from_dict(cls, data)


class ScarRewardModel(nn.Module):
    """MONAI ``UNet`` (2D, one input channel, ``channels[0]`` output features) and a 1x1 convolution
    to the logits, with a loud input check; ``self.config`` is its saved config.

    Args:
        config: The architecture.

    Input ``images``: float [B, 1, H, W], the engine's intensity convention (LGE scaled to [-1, 1], as
    the VAE decodes it); H and W multiples of ``config.size_multiple``.
    Output: logits float [B, C, H, W], unbounded; ``C = config.num_outputs``; channel 0 scar,
    channel 1 myocardium region. Apply ``sigmoid`` per channel for probabilities.
    """

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        from monai.networks.nets import UNet

        self.config = config
        # The UNet returns channels[0] features and a 1x1 convolution maps them to the logits. Asked for
        # the logits directly, MONAI's UNet (with residual units) would pass its last transposed
        # convolution through norm + activation with only num_outputs channels, then one 3x3 conv:
        # a 2-channel bottleneck at full resolution whose batch/instance norm rescales the logits
        # themselves. On the phantom that head barely learned the 2-3 pixel wide myocardium and scar
        # (benchmarks/RESULTS.md, reward model section).
        self.unet = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=config.channels[0],
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.num_res_units,
            norm=config.norm,
            dropout=config.dropout,
        )
        self.head = nn.Conv2d(config.channels[0], config.num_outputs, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, self.config.size_multiple, "reward model")
        return self.head(self.unet(images))


def build_reward_model(config: RewardModelConfig) -> ScarRewardModel:
    """A freshly initialised reward model for ``config`` (nothing is downloaded)."""
    return ScarRewardModel(config)


def targets_from_label(label: torch.Tensor, outputs: str = "scar+myocardium") -> torch.Tensor:
    """Multi-label training targets from per-pixel DOMAIN labels.

    Args:
        label: integer tensor [B, H, W] with values in {0, 1, 2, 3, 4} (background, cavity, healthy
            myocardium, scar, MVO).
        outputs: ``"scar"`` or ``"scar+myocardium"``, as in :class:`RewardModelConfig`.

    Returns:
        float32 [B, C, H, W] of 0/1: channel 0 = scar (labels 3 or 4); channel 1, for
        ``"scar+myocardium"``, = myocardium region (labels 2, 3 or 4).
    """
    if outputs not in OUTPUT_CHANNELS:
        raise ValueError(f"outputs: expected one of {sorted(OUTPUT_CHANNELS)}, got {outputs!r}")
    if label.ndim != 3 or label.dtype.is_floating_point or label.dtype == torch.bool:
        raise ValueError(f"label: expected an integer tensor [B, H, W], got {label.dtype} {tuple(label.shape)}")
    if label.numel() and (int(label.min()) < 0 or int(label.max()) > MVO):
        raise ValueError(f"label: values must lie in 0..{MVO}, got {int(label.min())}..{int(label.max())}")
    channels = [label >= SCAR]
    if outputs == "scar+myocardium":
        channels.append(label >= MYOCARDIUM)
    return torch.stack(channels, dim=1).float()


def segmentation_loss(kind: str = "dice_focal") -> nn.Module:
    """Multi-label (sigmoid) segmentation loss for tiny foregrounds; ``loss(logits, targets)`` -> scalar.

    Scar covers well under 1% of a slice and many training slices hold none, so:

    * Dice is computed over the whole batch (``batch=True``): one Dice per channel pooled over all
      slices, so a scar-free slice does not contribute a 0/1 Dice of its own, which makes per-slice
      Dice noisy and unstable for tiny structures.
    * ``"dice_focal"`` (default) adds a sigmoid focal term (gamma 2, Lin et al. 2017), which
      down-weights the millions of easy background pixels that dominate plain cross-entropy.
      ``"dice_ce"`` adds binary cross-entropy instead (the nnU-Net-style choice).

    Args:
        kind: ``"dice_focal"`` or ``"dice_ce"``.

    Returns:
        A MONAI ``DiceFocalLoss`` or ``DiceCELoss`` taking logits and targets [B, C, H, W].
    """
    from monai.losses import DiceCELoss, DiceFocalLoss

    if kind == "dice_focal":
        return DiceFocalLoss(sigmoid=True, batch=True, gamma=2.0)
    if kind == "dice_ce":
        return DiceCELoss(sigmoid=True, batch=True)
    raise ValueError(f"loss: expected 'dice_focal' or 'dice_ce', got {kind!r}")


def reward_loss_fn(config: RewardModelConfig) -> nn.Module:
    """The training loss of the reward model: :func:`segmentation_loss` of ``config.loss``."""
    return segmentation_loss(config.loss)


@torch.no_grad()
def predict_scar(model: nn.Module, images: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Scar probability and mask from a reward model (no gradients; put the model in ``eval()`` first).

    For the differentiable reward during generator training call ``model(images)`` directly.

    Args:
        model: A :class:`ScarRewardModel` (or any module returning logits [B, C, H, W], scar in channel 0).
        images: float [B, 1, H, W], intensities as in training ([-1, 1]).
        threshold: Probability above which a pixel is scar, in (0, 1).

    Returns:
        ``(prob, mask)``: float [B, 1, H, W] in [0, 1] and bool [B, 1, H, W].
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold!r}")
    prob = torch.sigmoid(model(images)[:, :1].float())
    return prob, prob > threshold


def check_image_batch(images: torch.Tensor, multiple: int, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` and the shape unless ``images`` is [B, 1, H, W] with H, W multiples
    of ``multiple`` (shared by the engine's one-channel image models)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{what}: expected images [B, 1, H, W], got shape {tuple(images.shape)}")
    if images.shape[2] % multiple or images.shape[3] % multiple:
        raise ValueError(f"{what}: image height and width must be multiples of {multiple}, "
                         f"got shape {tuple(images.shape)}")
