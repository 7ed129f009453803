"""Build small, clean EMIDEC-layout NIfTI cases for tests (real files, written with nibabel).

Volumes are NIfTI data ``[i, j, k]``; in the engine orientation a slice is ``vol[:, :, k].T``, so
``i`` is the column and ``j`` the row. The default case is 96 x 96 x 6: a ring of myocardium around
a cavity shrinking from base (k = 0) to apex, inside a zero-padded "thorax", 1.46 mm in-plane and
10 mm slices. Pathological cases (``Case_P...``) carry a subendocardial inferolateral scar wedge in
slices 1-3 with an MVO core in slice 2.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (96, 96, 6)
ZOOMS = (1.46, 1.46, 10.0)
ORIGIN = (-70.0, -65.0, 12.0)
CENTRE = (48, 46)  # (i, j) = (col, row) of the LV centre
SCAR_SLICES = (1, 2, 3)
MVO_SLICE = 2


def affine_for(zooms=ZOOMS, origin=ORIGIN) -> np.ndarray:
    affine = np.diag([*map(float, zooms[:3]), 1.0])
    affine[:3, 3] = origin
    return affine


def heart_labels(shape=SHAPE, centre=CENTRE, scar_slices=SCAR_SLICES, mvo_slice: int | None = MVO_SLICE,
                 wall: float = 4.0, cavity_radius: float = 10.0) -> np.ndarray:
    """uint8 labels [i, j, k]: cavity (1) disc, myocardium (2) ring, scar (3) wedge, MVO (4) core."""
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    di, dj = ii - centre[0], jj - centre[1]
    radius = np.hypot(di, dj)
    angle = np.degrees(np.arctan2(-dj, di)) % 360.0  # engine frame: row = j, up = -j
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(shape[2]):
        r_in = max(cavity_radius - 1.2 * k, 3.0)
        sl = label[:, :, k]
        sl[radius < r_in] = 1
        ring = (radius >= r_in) & (radius < r_in + wall)
        sl[ring] = 2
        if k in scar_slices:
            wedge = ring & (angle >= 300.0) & (radius < r_in + wall / 2 + 0.5)
            sl[wedge] = 3
            if k == mvo_slice:
                sl[wedge & (angle >= 320.0) & (angle < 335.0) & (radius < r_in + 1.0)] = 4
    return label


def raw_image(label: np.ndarray, seed: int = 0, border: int = 6) -> np.ndarray:
    """float32 raw-like intensities (0-4095) for a label volume, zero-padded borders."""
    rng = np.random.default_rng(seed)
    shape = label.shape
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((ii - shape[0] / 2) / (shape[0] / 2 - border)) ** 2 + ((jj - shape[1] / 2) / (shape[1] / 2 - border)) ** 2 < 1
    image = np.where(body[..., None], 300.0, 0.0) * np.ones(shape)
    for value, level in ((1, 1000.0), (2, 120.0), (3, 2000.0), (4, 150.0)):
        image[label == value] = level
    image = image + rng.normal(0.0, 25.0, shape) * body[..., None]
    image[:border], image[-border:], image[:, :border], image[:, -border:] = 0, 0, 0, 0
    return np.clip(np.round(image), 0, 4095).astype(np.float32)


def write_nifti(path, data, zooms=ZOOMS, origin=ORIGIN, affine: np.ndarray | None = None,
                affine_scale: tuple[float, float, float] | None = None) -> Path:
    """Write ``data`` with header zooms ``zooms``. ``affine`` overrides the affine entirely;
    ``affine_scale`` stores an sform whose scale disagrees with pixdim (a real EMIDEC quirk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = affine_for(zooms, origin) if affine is None else np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(data), base)
    ndim = np.asarray(data).ndim
    img.header.set_zooms((tuple(float(z) for z in zooms[:3]) + (1.0,) * max(ndim - 3, 0))[:ndim])
    if affine_scale is not None:
        odd = affine_for(affine_scale, origin)
        img.set_qform(base, code=1)  # pixdim follows the qform: the true zooms
        img.set_sform(odd, code=1)  # img.affine follows the sform: another scale
    nib.save(img, str(path))
    return path


def case_paths(root, case_id: str, suffix: str = ".nii.gz") -> tuple[Path, Path]:
    case_dir = Path(root) / case_id
    return case_dir / "Images" / f"{case_id}{suffix}", case_dir / "Contours" / f"{case_id}{suffix}"


def write_case(root, case_id: str = "Case_P001", *, label: np.ndarray | None = None, image: np.ndarray | None = None,
               zooms=ZOOMS, label_dtype=np.uint8, affine_scale=None, suffix: str = ".nii.gz",
               seed: int = 0) -> tuple[Path, Path]:
    """Write one clean case (or the given arrays) and return ``(image_path, label_path)``."""
    if label is None:
        positive = case_id.split("_")[-1].upper().startswith("P")
        label = heart_labels(scar_slices=SCAR_SLICES if positive else (), mvo_slice=MVO_SLICE if positive else None)
    if image is None:
        image = raw_image(label, seed=seed)
    image_path, label_path = case_paths(root, case_id, suffix)
    write_nifti(image_path, image.astype(np.float32), zooms=zooms, affine_scale=affine_scale)
    write_nifti(label_path, label.astype(label_dtype), zooms=zooms, affine_scale=affine_scale)
    return image_path, label_path


def write_cohort(root, case_ids=("Case_N001", "Case_P001"), **kwargs) -> Path:
    """A small clean cohort: one case per id (``**kwargs`` go to :func:`write_case`)."""
    for n, case_id in enumerate(case_ids):
        write_case(root, case_id, seed=n, **kwargs)
    return Path(root)


def read(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def patch_pixdim(path, zooms) -> None:
    """Overwrite pixdim[1:4] bytes in a written NIfTI-1 file (nibabel refuses to write zero or
    negative zooms and sanitizes them on read, so tests patch the header directly)."""
    path = Path(path)
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    raw[80:92] = struct.pack("<3f", *map(float, zooms))  # pixdim starts at byte 76; [1:4] at 80
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
