"""The paper's downstream model: a DenseNet121-encoder U-Net that segments scar and myocardium jointly.

It measures the utility gate (DOMAIN.md section 5): trained on real slices only, or on real plus N
synthetic ones, and tested on real patients; patient-level scar detection follows from its scar
prediction (done by the evaluation stage).

Built from MONAI parts. MONAI 1.6.1's ``FlexibleUNet`` registers only EfficientNet and ResNet
encoders (``FLEXUNET_BACKBONE``), and its registry fixes one parameter set per backbone name, so a
DenseNet of configurable size cannot be plugged in there. Instead :class:`DenseNetUNet` runs the
``features`` of MONAI's ``DenseNet`` (2D, one input channel, never pretrained: nothing is downloaded)
and feeds its five feature maps to FlexibleUNet's own ``UNetDecoder`` and ``SegmentationHead``:

============  =======  ==================================================
feature       stride   channels (DenseNet121: init 64, growth 32)
============  =======  ==================================================
relu0         2        init_features (64)
denseblock1   4        64 + 6 * 32 = 256
denseblock2   8        128 + 12 * 32 = 512
denseblock3   16       256 + 24 * 32 = 1024
norm5 + ReLU  32       512 + 16 * 32 = 1024
============  =======  ==================================================

The decoder upsamples five times, concatenating the skip of each stride, back to full resolution, so
H and W must be multiples of 32. MONAI's decoder gives its last stage no skip, and DenseNet's stem
(a 7x7 stride-2 convolution, then a max-pool) reaches stride 4 before the first dense block: a
myocardium 2-4 px thick would reach the output only through stride-2 features. So a small
full-resolution branch (``full_resolution_channels``: two 3x3 convolutions on the input) is
concatenated with the decoder's output and fused by one more 3x3 convolution before the head, a
full-resolution skip at the cost of a few small convolutions. ``stem_stride: 1`` keeps thin
structures another way: a 3x3 stride-1 stem, so every dense block sees the image at
twice the resolution (benchmarks/RESULTS.md compares the two on the phantom).

Outputs are multi-label logits, one sigmoid per channel: channel 0 scar (labels 3, 4), channel 1
myocardium region (labels 2, 3, 4), the targets of :func:`engine.models.reward.targets_from_label`.

Example:
    .. code-block:: python

        config = DownstreamModelConfig()                                   # DenseNet121 encoder
        model = build_downstream_model(config)
        loss = downstream_loss_fn(config)(model(images), targets_from_label(labels))
        prediction = predict(model.eval(), images)                         # scar, myocardium masks
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine import config as config_io
from engine.models.reward import check_image_batch, segmentation_loss

__all__ = ["DownstreamModelConfig", "DenseNetUNet", "build_downstream_model", "downstream_loss_fn", "predict"]

SIZE_MULTIPLE = 32  # five stride-2 stages in the encoder (four with ``stem_stride`` 1: 16)
OUTPUT_NAMES = ("scar", "myocardium")


@dataclass
class DownstreamModelConfig:
    """Architecture and loss of the downstream segmenter; saved next to its weights as the model's config.

    The defaults are DenseNet121 (Huang et al. 2017: 64 initial features, growth rate 32, blocks
    6-12-24-16). Tests and CPU demos shrink ``init_features``, ``growth_rate`` and ``block_config``;
    the network is then a smaller DenseNet of the same shape.

    Args:
        backbone: The encoder family; only ``"densenet121"``.
        init_features: Channels of the stem convolution.
        growth_rate: Channels each dense layer adds.
        block_config: Dense layers in each of the four dense blocks.
        bn_size: Bottleneck width multiplier of a dense layer (``bn_size * growth_rate`` channels).
        decoder_channels: Output channels of the five decoder stages, coarse to fine.
        dropout: Dropout probability in the dense layers and the decoder, in [0, 1).
        norm: ``"batch"`` (DenseNet's own) or ``"instance"``, in encoder and decoder.
        loss: ``"dice_focal"`` or ``"dice_ce"``; see :func:`engine.models.reward.segmentation_loss`.
        full_resolution_channels: channels of the full-resolution skip (0: none, MONAI's decoder alone).
        stem_stride: 2, DenseNet's own stem (a 7x7 stride-2 convolution; H, W multiples of 32), or 1,
            a 3x3 stride-1 stem that keeps the resolution: every dense block runs at twice the
            resolution (strides 1, 2, 4, 8, 16; H, W multiples of 16), the decoder drops its coarsest
            stage, and the stem's full-resolution features are fused with the decoder's output as
            the full-resolution skip is (the two can be combined).

    Example:
        >>> DownstreamModelConfig(init_features=8, growth_rate=4, block_config=(2, 2, 2, 2)).block_config
        (2, 2, 2, 2)
    """

    backbone: Literal["densenet121"] = "densenet121"
    init_features: int = 64
    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    bn_size: int = 4
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = 0.0
    norm: Literal["batch", "instance"] = "batch"
    loss: Literal["dice_focal", "dice_ce"] = "dice_focal"
    full_resolution_channels: int = 16
    stem_stride: Literal[1, 2] = 2

    def __post_init__(self):
        self.block_config, self.decoder_channels = tuple(self.block_config), tuple(self.decoder_channels)
        if self.backbone != "densenet121":
            raise ValueError(f"backbone: expected 'densenet121', got {self.backbone!r}")
        for name in ("init_features", "growth_rate", "bn_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if len(self.block_config) != 4 or any(not isinstance(n, int) or n < 1 for n in self.block_config):
            raise ValueError(f"block_config: expected four positive ints (dense layers per block), "
                             f"got {self.block_config!r}")
        if len(self.decoder_channels) != 5 or any(not isinstance(c, int) or c < 1 for c in self.decoder_channels):
            raise ValueError(f"decoder_channels: expected five positive ints (one per decoder stage), "
                             f"got {self.decoder_channels!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"norm: expected 'batch' or 'instance', got {self.norm!r}")
        if self.full_resolution_channels < 0:
            raise ValueError(f"full_resolution_channels: expected >= 0 (0: no full-resolution skip), "
                             f"got {self.full_resolution_channels!r}")
        if self.loss not in ("dice_focal", "dice_ce"):
            raise ValueError(f"loss: expected 'dice_focal' or 'dice_ce', got {self.loss!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride: expected 2 (DenseNet's 7x7 stride-2 stem) or 1 (a 3x3 stem that keeps "
                             f"the resolution), got {self.stem_stride!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serializable fields; :meth:`from_dict` rebuilds an equal config."""
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DownstreamModelConfig:
        """The config from :meth:`to_dict` output (or YAML data); a bad value raises ``ValueError`` naming it."""
        return config_io.from_dict(cls, data)


class DenseNetUNet(nn.Module):
    """DenseNet encoder + MONAI ``UNetDecoder`` + ``SegmentationHead``; ``self.config`` is its saved config.

    Args:
        config: The architecture.

    Input ``images``: float [B, 1, H, W], intensity-normalised slices; H and W multiples of 32.
    Output: logits float [B, 2, H, W], unbounded; channel 0 scar, channel 1 myocardium region.
    """

    def __init__(self, config: DownstreamModelConfig):
        super().__init__()
        from monai.networks.nets import DenseNet
        from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder

        self.config = config
        densenet = DenseNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,  # the classifier head is dropped; only ``features`` is kept
            init_features=config.init_features,
            growth_rate=config.growth_rate,
            block_config=config.block_config,
            bn_size=config.bn_size,
            norm=config.norm,
            dropout_prob=config.dropout,
        )
        self.encoder = densenet.features
        f = self.encoder
        if config.stem_stride == 1:  # a 3x3 stride-1 stem: every dense block at twice the resolution
            f.conv0 = nn.Conv2d(1, config.init_features, kernel_size=3, stride=1, padding=1, bias=False)
        encoder_channels = (
            *((1,) if config.stem_stride == 2 else ()),  # the stride-1 stem's features take the input's place
            f.conv0.out_channels,
            f.transition1.conv.in_channels,
            f.transition2.conv.in_channels,
            f.transition3.conv.in_channels,
            f.norm5.num_features,
        )
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=encoder_channels,
            decoder_channels=config.decoder_channels[1:] if config.stem_stride == 1 else config.decoder_channels,
            act=("relu", {"inplace": True}),
            norm=config.norm,
            dropout=config.dropout,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=False,
        )
        k, out = config.full_resolution_channels, config.decoder_channels[-1]
        stem = config.init_features if config.stem_stride == 1 else 0  # fused at full resolution too
        if k or stem:
            from monai.networks.blocks import Convolution

            def block(cin: int, cout: int) -> nn.Module:
                return Convolution(2, cin, cout, kernel_size=3, act=("relu", {"inplace": True}), norm=config.norm,
                                   bias=False)

            if k:
                self.full_resolution = nn.Sequential(block(1, k), block(k, k))
            self.fuse = block(out + k + stem, out)
        self.segmentation_head = SegmentationHead(
            spatial_dims=2, in_channels=out, out_channels=len(OUTPUT_NAMES), kernel_size=3)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The input and the five encoder feature maps, strides 1, 2, 4, 8, 16, 32 (``stem_stride`` 1:
        1, 1, 2, 4, 8, 16)."""
        f = self.encoder
        x0 = f.relu0(f.norm0(f.conv0(images)))
        x1 = f.denseblock1(f.pool0(x0))
        x2 = f.denseblock2(f.transition1(x1))
        x3 = f.denseblock3(f.transition2(x2))
        x4 = F.relu(f.norm5(f.denseblock4(f.transition3(x3))))
        return [images, x0, x1, x2, x3, x4]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_image_batch(images, SIZE_MULTIPLE if self.config.stem_stride == 2 else SIZE_MULTIPLE // 2,
                          "downstream model")
        features = self.encode(images)
        full = []  # full-resolution maps fused with the decoder's output (whose last stage has no skip)
        if self.config.stem_stride == 1:
            features = features[1:]  # strides 1 (the stem), 2, 4, 8, 16
            full.append(features[0])
        decoded = self.decoder(features, skip_connect=len(features) - 2)
        if self.config.full_resolution_channels:
            full.append(self.full_resolution(images))
        if full:
            decoded = self.fuse(torch.cat([decoded, *full], dim=1))
        return self.segmentation_head(decoded)


def build_downstream_model(config: DownstreamModelConfig) -> DenseNetUNet:
    """A freshly initialised downstream model for ``config`` (no pretrained weights, nothing downloaded)."""
    return DenseNetUNet(config)


def downstream_loss_fn(config: DownstreamModelConfig) -> nn.Module:
    """The training loss: :func:`engine.models.reward.segmentation_loss` of ``config.loss`` on 2-channel targets."""
    return segmentation_loss(config.loss)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Scar and myocardium masks of a batch of slices (no gradients; put the model in ``eval()`` first).

    Args:
        model: A :class:`DenseNetUNet` (any module returning logits [B, 2, H, W] works).
        images: float [B, 1, H, W]; H, W multiples of 32.
        threshold: Probability above which a pixel is foreground, in (0, 1).

    Returns:
        ``{"scar": bool [B, H, W], "myocardium": bool [B, H, W], "scar_prob": float [B, H, W] in [0, 1],
        "myocardium_prob": float [B, H, W] in [0, 1]}``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold!r}")
    prob = torch.sigmoid(model(images).float())
    return {
        "scar": prob[:, 0] > threshold,
        "myocardium": prob[:, 1] > threshold,
        "scar_prob": prob[:, 0],
        "myocardium_prob": prob[:, 1],
    }
