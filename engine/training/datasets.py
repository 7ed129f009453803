"""Torch datasets with MONAI dictionary transforms over the arrays of :mod:`engine.training.data`:
:class:`SegmentationDataset` (reward and downstream models), :class:`InpaintingDataset` (the
generator), the :class:`EdgeMap` / :class:`EdgeMapd` transforms that keep the edge-map condition
consistent with an augmented scar mask, and :func:`collate`. Kept apart from the arrays because
importing MONAI costs ~7 s of CPU, which every process that only plans or prepares candidates
(synthesis tasks, the settings, the CLI) should not pay.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Transform,
)
from monai.utils import convert_to_dst_type

from engine.anatomy.masks import edge_map
from engine.training.data import (
    SliceArrays,
    SliceDataConfig,
    conditions,
    derive_seed,
    image_label,
    inpainting_arrays,
    masked_image,
)
from engine.training.spade import ARRAY_KEYS as SPADE_ARRAY_KEYS
from engine.training.spade import method_of

__all__ = ["EdgeMap", "EdgeMapd", "InpaintingDataset", "SegmentationDataset", "SpadeDataset", "collate"]


class EdgeMap(Transform):
    """Edge map of a channel-first binary mask [C, H, W] (or [H, W]), channel by channel
    (:func:`engine.anatomy.edge_map`); same type (numpy or torch) and float dtype as a float input."""

    backend = [torch.Tensor, np.ndarray]  # noqa: RUF012 (MONAI's convention)

    def __init__(self, width: int = 1):
        if width < 1:
            raise ValueError(f"edge width must be >= 1 pixel, got {width}")
        self.width = int(width)

    def __call__(self, mask):
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        m = m > 0.5
        if m.ndim == 2:
            edges = edge_map(m, self.width)
        elif m.ndim == 3:
            edges = np.stack([edge_map(c, self.width) for c in m])
        else:
            raise ValueError(f"EdgeMap expects a mask [H, W] or [C, H, W], got shape {tuple(m.shape)}")
        dtype = mask.dtype if (isinstance(mask, torch.Tensor) and mask.is_floating_point()) or (
            isinstance(mask, np.ndarray) and np.issubdtype(mask.dtype, np.floating)) else None
        return convert_to_dst_type(edges.astype(np.float32), dst=mask, dtype=dtype)[0]


class EdgeMapd(MapTransform):
    """Dictionary twin of :class:`EdgeMap`: the edge map of ``keys`` written to ``output_keys``
    (default: in place). Used after a geometric transform so the condition follows the moved scar.

    Args:
        keys: the scar mask entries.
        width: edge width in pixels.
        output_keys: where each edge map goes, one per key; None overwrites the keys.
    """

    backend = EdgeMap.backend

    def __init__(self, keys: KeysCollection, width: int = 1, output_keys: KeysCollection | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.edge = EdgeMap(width)
        outs = self.keys if output_keys is None else ((output_keys,) if isinstance(output_keys, str) else tuple(output_keys))
        if len(outs) != len(self.keys):
            raise ValueError(f"EdgeMapd: {len(self.keys)} keys but {len(outs)} output keys")
        self.output_keys = outs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out in self.key_iterator(d, self.output_keys):
            d[out] = self.edge(d[key])
        return d


def _augmentations(cfg: SliceDataConfig, nearest_keys: Sequence[str]) -> list:
    """Geometric transforms of ``image`` (bilinear) and ``nearest_keys``, then intensity transforms of
    the image only. Every parameter is drawn each time (probability 1): the ranges include zero."""
    keys = ["image", *nearest_keys]
    out: list = [RandAffined(
        keys=keys, prob=1.0, rotate_range=(math.radians(cfg.rotate_degrees),),
        scale_range=(cfg.scale_range, cfg.scale_range), mode=["bilinear"] + ["nearest"] * len(nearest_keys),
        padding_mode="zeros",
    )]
    if cfg.intensity_jitter > 0:
        out += [RandScaleIntensityd(keys="image", factors=cfg.intensity_jitter, prob=1.0),
                RandShiftIntensityd(keys="image", offsets=cfg.intensity_jitter, prob=1.0)]
    if cfg.noise_std > 0:
        out.append(RandGaussianNoised(keys="image", std=cfg.noise_std, prob=1.0))
    return out


class _AugmentedDataset(torch.utils.data.Dataset):
    """Shared mechanics: a MONAI pipeline re-seeded per item from ``(seed, epoch, index)``."""

    transform: Compose

    def __init__(self, n: int, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"dataset seed must be a non-negative integer, got {seed!r}")
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        """Draw other augmentations in the next epoch (call before each epoch, like a DistributedSampler)."""
        self.epoch = int(epoch)

    def _transform(self, index: int, item: dict) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        self.transform.set_random_state(seed=derive_seed(self.seed, self.epoch, index) % 2**32)
        return self.transform(item)


class SegmentationDataset(_AugmentedDataset):
    """Image/label pairs for the segmentation models (reward and downstream).

    Args:
        data: :class:`SliceArrays`, :class:`DownstreamData` or a mapping with ``image`` [N, 1, S, S] in
            [0, 1] and ``label`` [N, S, S].
        cfg: augmentation settings (used when ``train`` and ``cfg.augment``).
        train: training split (augmented) or not (returned as is).
        seed: augmentation seed; item ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.

    Items: ``{"image": float32 [1, S, S], "label": int64 [S, S]}``. Augmentation: affine with nearest
    interpolation for the label, intensity scale/shift and Gaussian noise on the image (left unclipped,
    as scanner intensities are).
    """

    def __init__(self, data: Any, cfg: SliceDataConfig | None = None, train: bool = False, seed: int = 0):
        self.image, self.label = image_label(data)
        super().__init__(len(self.image), seed)
        self.cfg = cfg or SliceDataConfig()
        augment = train and self.cfg.augment
        self.transform = Compose([
            *(_augmentations(self.cfg, ["label"]) if augment else []),
            EnsureTyped(keys=["image", "label"], data_type="tensor", dtype=torch.float32, track_meta=False),
        ])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": self.image[index].astype(np.float32),
                "label": self.label[index][None].astype(np.float32)}
        out = self._transform(index, item)
        return {"image": out["image"], "label": out["label"][0].round().long()}


class InpaintingDataset(_AugmentedDataset):
    """Generator training items from positive slices (DOMAIN.md section 4).

    Args:
        data: :class:`SliceArrays` (its positive slices are used, via :func:`inpainting_arrays`) or
            the dictionary :func:`inpainting_arrays` returns.
        cfg: condition kind, edge width and augmentation settings.
        train: training split (augmented) or not.
        seed: augmentation seed; item ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.

    Items: ``image`` [1, S, S] in [-1, 1]; ``mask``, ``condition``, ``scar`` [1, S, S] (0/1);
    ``masked_image`` [1, S, S]; all float32; ``caption`` and ``source`` strings.

    Augmentation (when ``train`` and ``cfg.augment``) runs on the image in [0, 1] (so intensity jitter
    means the same as for segmentation), then clips it to [0, 1] and maps it to [-1, 1], the range
    the generator produces. Image bilinear, scar and inpainting mask nearest (both sample the same
    points, so the mask still contains the scar); the condition is then recomputed from the moved
    scar (:class:`EdgeMapd`, or the moved filled mask itself), so it always equals
    ``edge_map(scar)``. The caption is the unaugmented slice's: the rotation is small enough
    (``SliceDataConfig.rotate_degrees``) to keep the segments it names.
    """

    def __init__(self, data: Any, cfg: SliceDataConfig | None = None, train: bool = False, seed: int = 0):
        self.cfg = cfg or SliceDataConfig()
        self.arrays = inpainting_arrays(data, self.cfg) if isinstance(data, SliceArrays) else dict(data)
        missing = {"image", "scar", "mask", "caption"} - set(self.arrays)
        if missing:
            raise ValueError(f"InpaintingDataset: inpainting arrays lack {sorted(missing)}")
        n = len(self.arrays["image"])
        super().__init__(n, seed)
        self.sources = list(self.arrays.get("source", [f"item#{i}" for i in range(n)]))
        augment = train and self.cfg.augment
        transforms: list = []
        if augment:
            transforms += _augmentations(self.cfg, ["scar", "mask", "condition"] if self.cfg.condition == "mask" else ["scar", "mask"])
            if self.cfg.condition == "edges":
                transforms.append(EdgeMapd(keys="scar", width=self.cfg.edge_width, output_keys="condition"))
        transforms.append(EnsureTyped(keys=["image", "scar", "mask", "condition"], data_type="tensor",
                                      dtype=torch.float32, track_meta=False))
        self.transform = Compose(transforms)

    def __getitem__(self, index: int) -> dict[str, Any]:
        a = self.arrays
        scar = np.asarray(a["scar"][index], np.float32)
        condition = a["condition"][index] if "condition" in a else conditions(scar > 0.5, self.cfg)
        item = {
            "image": (np.asarray(a["image"][index], np.float32) + 1.0) / 2.0,
            "scar": scar,
            "mask": np.asarray(a["mask"][index], np.float32),
            "condition": np.asarray(condition, np.float32),
        }
        out = self._transform(index, item)
        image = out["image"].clamp(0.0, 1.0) * 2.0 - 1.0
        return {
            "image": image,
            "mask": out["mask"],
            "condition": out["condition"],
            "scar": out["scar"],
            "masked_image": masked_image(image, out["mask"]),
            "caption": a["caption"][index],
            "source": self.sources[index],
        }


class SpadeDataset(_AugmentedDataset):
    """Training items of one variant: ``{"image": [1, S, S] in [-1, 1], "seg": [5, S, S] (the semantic
    map, :func:`engine.models.spade.semantic_map`), "mask": [1, S, S] (0/1)}``, float32 tensors.

    Augmentation (when ``train`` and ``cfg.augment``) as the generator's: on the image in [0, 1],
    label, scar and mask nearest (they sample the same points, so the mask still holds the scar);
    the semantic map is built after it, from the moved label, scar and mask.

    Args:
        arrays: :func:`engine.training.spade.spade_arrays`.
        cfg: augmentation settings.
        context, limited_margin_px: the variant (:func:`engine.models.spade.context_visibility`).
        train: augment or not.
        seed: item ``i`` of epoch ``e`` depends only on ``(seed, e, i)``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], cfg, context: str, limited_margin_px: int,
                 train: bool = False, seed: int = 0):
        method_of(context)
        missing = set(SPADE_ARRAY_KEYS) - set(arrays)
        if missing:
            raise ValueError(f"SpadeDataset: arrays lack {sorted(missing)}")
        self.arrays, self.context, self.margin = arrays, context, int(limited_margin_px)
        super().__init__(len(arrays["image"]), seed)
        augment = train and cfg.augment
        self.transform = Compose([
            *(_augmentations(cfg, ["label", "scar", "mask"]) if augment else []),
            EnsureTyped(keys=list(SPADE_ARRAY_KEYS), data_type="tensor", dtype=torch.float32, track_meta=False),
        ])

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        from engine.models.spade import semantic_map

        a = self.arrays
        item = {"image": (np.asarray(a["image"][index], np.float32) + 1.0) / 2.0,
                "label": np.asarray(a["label"][index], np.float32)[None],
                "scar": np.asarray(a["scar"][index], np.float32), "mask": np.asarray(a["mask"][index], np.float32)}
        out = self._transform(index, item)
        image = out["image"].clamp(0.0, 1.0) * 2.0 - 1.0
        label = out["label"][0].round().numpy().astype(np.uint8)
        scar, mask = out["scar"].numpy() > 0.5, out["mask"].numpy() > 0.5
        seg = semantic_map(image.numpy()[None], label[None], scar[None], mask[None], self.context, self.margin)[0]
        return {"image": image, "seg": torch.from_numpy(seg), "mask": torch.from_numpy(mask.astype(np.float32))}


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: tensors stacked along a new first axis, strings (captions, sources) kept as
    lists, numbers as a tensor. All items must have the same keys."""
    if not batch:
        raise ValueError("collate: empty batch")
    keys = list(batch[0])
    out: dict[str, Any] = {}
    for item in batch:
        if list(item) != keys:
            raise ValueError(f"collate: items disagree on keys: {keys} vs {list(item)}")
    for key in keys:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], str):
            out[key] = list(values)
        elif isinstance(values[0], (int, float, np.number)):
            out[key] = torch.as_tensor(values)
        else:
            out[key] = list(values)
    return out
