"""LV-centred crops of 2D short-axis slices (the "cropped" views of DOMAIN.md section 5).

The heart is about a tenth of a full-thorax field of view, so models and the cropped realism
metrics work on a fixed-size window centred on the LV centre
(:func:`engine.anatomy.geometry.lv_centre`, taken from the labels). Where the window leaves the
image it is zero-padded (label 0 = background). The window is returned as a :class:`CropBox` in
image coordinates (it may reach past the borders) so results can be pasted back with
:meth:`CropBox.paste`.

Underneath: MONAI's ``BorderPad`` then ``SpatialCrop``. Shapes: an array ``[H, W]`` or channel-first
``[C, H, W]`` in, ``[size_r, size_c]`` or ``[C, size_r, size_c]`` out, same type (numpy or torch) and
dtype as the input.
"""

from __future__ import annotations

from typing import Hashable, Mapping, NamedTuple, Sequence

import numpy as np

from engine.anatomy.geometry import lv_centre


class CropBox(NamedTuple):
    """A half-open window ``rows [r0, r1) x cols [c0, c1)`` in image coordinates; it may extend past
    the image (negative starts, ends beyond H or W), the part outside being zero padding."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    def paste(self, crop: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write ``crop`` ``[..., h, w]`` (h, w = :attr:`shape`) into ``out`` ``[..., H, W]`` in place,
        dropping the padded part; returns ``out``."""
        if tuple(crop.shape[-2:]) != self.shape:
            raise ValueError(f"crop shape {tuple(crop.shape[-2:])} does not match the box {self.shape}")
        h, w = out.shape[-2:]
        r0, r1, c0, c1 = max(self.r0, 0), min(self.r1, h), max(self.c0, 0), min(self.c1, w)
        if r0 < r1 and c0 < c1:
            out[..., r0:r1, c0:c1] = crop[..., r0 - self.r0 : r1 - self.r0, c0 - self.c0 : c1 - self.c0]
        return out


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    sizes = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(sizes) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"crop size must be a positive integer or a pair of them, got {size!r}")
    return int(sizes[0]), int(sizes[1])


class LVCentredCrop:
    """Crop a 2D slice to a ``size`` window centred on the LV centre of its label.

    Args:
        size: window side in pixels, or ``(rows, cols)``.

    Call ``crop(img, label)`` -> ``(cropped, box)``; ``label`` [H, W] (or [1, H, W]) defaults to
    ``img`` itself. The window's centre pixel is the rounded LV centre: rows
    ``[round(row_c) - size_r // 2, ... + size_r)``, likewise for columns.

    Raises:
        ValueError: the label shows no LV (no label 1-4), or shapes disagree.
    """

    def __init__(self, size: int | Sequence[int]):
        self.size = _pair(size)

    def box(self, label: np.ndarray) -> CropBox:
        """The crop window for a label slice [H, W] (or [1, H, W])."""
        lab = np.asarray(label)
        if lab.ndim == 3 and lab.shape[0] == 1:
            lab = lab[0]
        if lab.ndim != 2:
            raise ValueError(f"LV-centred crop expects a 2D label slice [H, W], got shape {lab.shape}")
        centre = lv_centre(lab)
        if centre is None:
            raise ValueError("cannot centre a crop on the LV: the label slice has no LV (no label 1-4)")
        r0 = int(np.floor(centre[0] + 0.5)) - self.size[0] // 2
        c0 = int(np.floor(centre[1] + 0.5)) - self.size[1] // 2
        return CropBox(r0, r0 + self.size[0], c0, c0 + self.size[1])

    @staticmethod
    def apply_box(img, box: CropBox):
        """Cut ``box`` out of ``img`` [H, W] or [C, H, W], zero-padding outside the image."""
        from monai.transforms import BorderPad, SpatialCrop
        from monai.utils import convert_to_dst_type

        if img.ndim not in (2, 3):
            raise ValueError(f"LV-centred crop expects an image [H, W] or [C, H, W], got shape {tuple(img.shape)}")
        x = img[None] if img.ndim == 2 else img
        h, w = x.shape[-2:]
        before = (max(-box.r0, 0), max(-box.c0, 0))
        after = (max(box.r1 - h, 0), max(box.c1 - w, 0))
        if any(before) or any(after):
            x = BorderPad(spatial_border=[before[0], after[0], before[1], after[1]], mode="constant", value=0)(x)
        start = (box.r0 + before[0], box.c0 + before[1])
        out = SpatialCrop(roi_start=start, roi_end=(start[0] + box.shape[0], start[1] + box.shape[1]))(x)
        out = convert_to_dst_type(out, dst=img)[0]
        return out[0] if img.ndim == 2 else out

    def __call__(self, img, label=None):
        lab = img if label is None else label
        box = self.box(lab)
        spatial = tuple(np.asarray(lab).shape[-2:])
        if tuple(img.shape[-2:]) != spatial:
            raise ValueError(f"image {tuple(img.shape)} and label {tuple(np.asarray(lab).shape)} differ in [H, W]")
        return self.apply_box(img, box), box


class LVCentredCropd:
    """Dictionary twin of :class:`LVCentredCrop` (MONAI ``...d`` style).

    Args:
        keys: the entries to crop, all [H, W] or [C, H, W] on the same grid.
        size: window side in pixels, or ``(rows, cols)``.
        label_key: the entry whose LV centre places the window.
        box_key: where the :class:`CropBox` is stored in the output dictionary.
    """

    def __init__(self, keys: Sequence[Hashable] = ("image", "label"), size: int | Sequence[int] = 128,
                 label_key: Hashable = "label", box_key: Hashable = "crop_box"):
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)
        self.cropper = LVCentredCrop(size)
        self.label_key = label_key
        self.box_key = box_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        box = self.cropper.box(d[self.label_key])
        spatial = tuple(np.asarray(d[self.label_key]).shape[-2:])
        for key in self.keys:
            if tuple(d[key].shape[-2:]) != spatial:
                raise ValueError(f"{key!r} {tuple(d[key].shape)} and {self.label_key!r} differ in [H, W] {spatial}")
            d[key] = self.cropper.apply_box(d[key], box)
        d[self.box_key] = box
        return d
