"""Write the phantom cohort in the EMIDEC layout, with a manifest of what each case holds.

Layout (DOMAIN.md section 1)::

    OUT/Case_P001/Images/Case_P001.nii.gz     float32 raw intensities, 3D stack [i, j, k]
    OUT/Case_P001/Contours/Case_P001.nii.gz   uint8 labels 0-4 on the same grid
    OUT/manifest.json                         one dict per patient (see :func:`manifest_entry`)
    OUT/manifest.csv                          the same, one flat row per patient

Case numbers are patient index + 1, prefixed P when the written labels hold scar, N otherwise.
Stacks are written with :func:`engine.io.orientation.slices_to_volume`, so reading them back with
``volume_to_slices`` (defaults: not mirrored, base first) gives the engine slices unchanged.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np

from engine.anatomy.aha import aha_segments, slice_levels
from engine.anatomy.labels import MVO, scar_region
from engine.io.orientation import slices_to_volume
from engine.phantom.config import PhantomConfig
from engine.anatomy.transmurality import segment_transmurality, transmurality_class
from engine.phantom.patient import PhantomPatient, generate_patient

MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
CSV_COLUMNS = (
    "patient_id", "index", "positive", "pattern", "territory", "scar_segments", "transmurality", "mvo",
    "n_slices", "spacing_slice", "spacing_row", "spacing_col", "scar_pixels", "tiny", "seed", "image", "label",
)


def nifti_image(stack: np.ndarray, spacing: tuple[float, float, float]):
    """A ``Nifti1Image`` of an engine stack ``[k, row, col]`` with spacing ``(slice, row, col)`` mm.

    The affine is diagonal (zooms ``(col, row, slice)`` mm, origin at the volume's centre) and is
    both the qform and the sform (code 1, scanner); the header zooms equal the spacing.
    """
    import nibabel as nib  # imported where used

    volume = slices_to_volume(stack)
    zooms = np.array([spacing[2], spacing[1], spacing[0]], dtype=np.float64)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -0.5 * (np.array(volume.shape) - 1) * zooms
    image = nib.Nifti1Image(volume, affine)
    image.header.set_zooms(tuple(zooms))
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def case_paths(patient_id: str) -> tuple[str, str]:
    """Image and label paths of a case, relative to the cohort root."""
    return tuple(f"{patient_id}/{folder}/{patient_id}.nii.gz" for folder in ("Images", "Contours"))


def write_case(out_dir: str | os.PathLike, patient: PhantomPatient) -> tuple[str, str]:
    """Write a patient's image and label NIfTI files; returns their paths relative to ``out_dir``."""
    import nibabel as nib

    paths = case_paths(patient.patient_id)
    for rel, data in zip(paths, (patient.image.astype(np.float32), patient.label.astype(np.uint8))):
        (Path(out_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nifti_image(data, patient.spacing), str(Path(out_dir) / rel))
    return paths


def scar_segments(label: np.ndarray, reference_angle: float = 120.0) -> tuple[list[int], dict[int, float]]:
    """AHA segments holding scar in a label stack ``[k, H, W]`` (levels from :func:`slice_levels`)
    and each segment's largest transmural extent over the slices."""
    levels = slice_levels(label)
    segments: set[int] = set()
    extent: dict[int, float] = {}
    for k, level in enumerate(levels):
        if level is None or not scar_region(label[k]).any():
            continue
        seg = aha_segments(label[k], level, reference_angle)
        segments.update(int(s) for s in np.unique(seg[scar_region(label[k])]) if s > 0)
        for s, value in segment_transmurality(label[k], level, reference_angle).items():
            extent[int(s)] = max(extent.get(int(s), 0.0), float(value))
    return sorted(segments), extent


def manifest_entry(patient: PhantomPatient, image_path: str = "", label_path: str = "") -> dict:
    """What a written case holds, measured on its labels (scar segments, transmurality, MVO).

    Keys: patient_id, index, positive, pattern, territory, scar_segments (sorted AHA numbers),
    transmurality (``{"7": "51-75%", ...}``, the largest class over the slices), mvo,
    n_slices, spacing ``[slice, row, col]`` mm, scar_pixels, tiny, seed, image, label.
    """
    segments, extent = scar_segments(patient.label)
    classes = {str(s): transmurality_class(min(v, 1.0)) for s, v in sorted(extent.items())}
    return {
        "patient_id": patient.patient_id,
        "index": int(patient.meta["index"]),
        "positive": patient.positive,
        "pattern": patient.meta["pattern"],
        "territory": patient.meta["territory"],
        "scar_segments": segments,
        "transmurality": classes,
        "mvo": bool((patient.label == MVO).any()),
        "n_slices": int(patient.label.shape[0]),
        "spacing": [round(float(v), 4) for v in patient.spacing],
        "scar_pixels": int(scar_region(patient.label).sum()),
        "tiny": bool(patient.meta["tiny"]),
        "seed": int(patient.meta["seed"]),
        "image": image_path,
        "label": label_path,
    }


def _csv_row(entry: dict) -> dict:
    row = {k: entry[k] for k in CSV_COLUMNS if k in entry}
    row["territory"] = entry["territory"] or ""
    row["scar_segments"] = ";".join(str(s) for s in entry["scar_segments"])
    row["transmurality"] = ";".join(f"{s}:{c}" for s, c in entry["transmurality"].items())
    row["spacing_slice"], row["spacing_row"], row["spacing_col"] = entry["spacing"]
    return row


def _clear_previous(out: Path) -> None:
    """Make ``out`` ready for a cohort: create it, or remove the cases a previous phantom run listed
    in its manifest. Anything else already there that looks like a case is an error, not deleted."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_JSON
    owned: set[str] = set()
    if manifest.is_file():
        try:
            owned = {e["patient_id"] for e in json.loads(manifest.read_text())}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest}: not a phantom manifest ({exc}); write the cohort to an empty folder") from exc
    foreign = sorted(p.name for p in out.iterdir() if p.name.lower().startswith("case_") and p.name not in owned)
    if foreign:
        raise ValueError(
            f"{out} already holds case folders this writer did not make ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); write the phantom cohort to an empty folder"
        )
    for name in sorted(owned):
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def write_phantom_cohort(
    out_dir: str | os.PathLike, n_patients: int, seed: int = 0, cfg: PhantomConfig | None = None,
    first_case: int = 1,
) -> list[dict]:
    """Generate ``n_patients`` phantom patients and write them in the EMIDEC layout.

    Patient ``i`` depends only on ``(seed, i, cfg)``: a cohort of 10 is the first 10 of a cohort of
    100. Re-running into the same folder replaces the cases of the previous run.

    Args:
        out_dir: cohort root folder (created if missing).
        n_patients: number of patients (>= 1).
        seed: cohort seed.
        cfg: phantom configuration (defaults to ``PhantomConfig()``).
        first_case: the case number of patient 0 (patient ``i`` is ``Case_P<first_case + i>`` or
            ``Case_N...``): a test cohort numbered from, say, 1001 shares no id with a training
            cohort of fewer than 1000 patients.

    Returns:
        The manifest: one dict per patient (see :func:`manifest_entry`), also written to
        ``manifest.json`` and ``manifest.csv``.
    """
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise ValueError(f"n_patients must be an int >= 1, got {n_patients!r}")
    if not isinstance(first_case, (int, np.integer)) or first_case < 1:
        raise ValueError(f"first_case must be an int >= 1, got {first_case!r}")
    cfg = cfg or PhantomConfig()
    out = Path(out_dir)
    _clear_previous(out)
    manifest = []
    for i in range(int(n_patients)):
        patient = generate_patient(i, seed, cfg, case_number=int(first_case) + i)
        manifest.append(manifest_entry(patient, *case_paths(patient.patient_id)))
        # listed before its files exist, so a re-run after a crash knows every folder it made
        (out / MANIFEST_JSON).write_text(json.dumps(manifest, indent=1) + "\n")
        write_case(out, patient)
    with open(out / MANIFEST_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for entry in manifest:
            writer.writerow(_csv_row(entry))
    return manifest
