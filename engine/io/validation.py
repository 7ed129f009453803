"""The EMIDEC on-disk contract: find the cases of a cohort, read them once, check them.

Layout (DOMAIN.md section 1)::

    ROOT/Case_N001/Images/Case_N001.nii.gz      image, 3D stack of short-axis slices [i, j, k]
    ROOT/Case_N001/Contours/Case_N001.nii.gz    labels 0-4 on the same grid (``.nii`` also accepted)

A *case folder* is a directory directly under ``ROOT`` whose name starts with ``Case_`` (any
letter case) or that holds an ``Images`` or ``Contours`` folder. Anything else in the root
(``manifest.json``, ``README``, hidden entries, other folders) is ignored, not an error.

Validation follows nnU-Net's ``verify_dataset_integrity``: every problem is found and reported
(one :class:`Problem` per issue, one line each, naming the file and the values involved), nothing
stops at the first error and nothing is fixed silently. The checks are small functions listed in
two tables, :data:`COHORT_CHECKS` (the cohort as a whole) and :data:`CASE_CHECKS` (one read case).

Legitimate quirks of real files that are *not* problems: labels stored as float64 holding
integers; an affine whose scale disagrees with the header pixdim (spacing is taken from the header
zooms); spacing that varies between cases; a small heart in a full-thorax field of view with
zero-padded borders; raw scanner intensities.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
from scipy import ndimage

from engine.anatomy.labels import CAVITY, MVO, MYOCARDIUM, SCAR, VALID_LABELS

if TYPE_CHECKING:
    from engine.io.cohort import CohortConfig

SCAR_LABELS = (SCAR, MVO)  # exact values: an out-of-range 7 is the range check's, not scar
IMAGE_DIR = "Images"
LABEL_DIR = "Contours"
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Relative tolerance on image vs label zooms.
SPACING_RTOL = 1e-3
# Image vs label affines: direction cosines (unit columns of the affine) may differ by this much
# per element (about 0.06 degrees), origins by this many millimetres. Both are far above float32
# header round-off and far below anything that would misplace a contour by a pixel.
DIRECTION_ATOL = 1e-3
ORIGIN_ATOL_MM = 1e-2


@dataclass
class Problem:
    """One thing wrong with a cohort: the file (or folder) concerned and why.

    Args:
        path: the file or folder the problem is about.
        reason: one line saying what is wrong, with the values involved.
        case_id: the case folder's name, or None for problems of the cohort as a whole.
    """

    path: str
    reason: str
    case_id: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "case_id": self.case_id}


@dataclass
class ValidationReport:
    """What validation (or loading) found.

    Attributes:
        root: the cohort root.
        checked: number of case folders checked.
        problems: every problem found, in discovery order.
        quarantined: case id -> reasons, for cases left out by ``load_cohort(on_invalid="quarantine")``.
        slices_without_lv: case id -> number of slices with no LV (no label 1-4), which loading
            keeps out of the records; filled by ``load_cohort``.
    """

    root: str
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    quarantined: dict[str, list[str]] = field(default_factory=dict)
    slices_without_lv: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per problem: ``"{path}: {reason}"``."""
        return [str(p) for p in self.problems]

    def __str__(self) -> str:
        head = f"{self.root}: {self.checked} case(s) checked, {len(self.problems)} problem(s)"
        return "\n".join([head, *self.lines()])

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "checked": self.checked,
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "quarantined": {k: list(v) for k, v in self.quarantined.items()},
            "slices_without_lv": dict(self.slices_without_lv),
        }

    def write_report(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (a local path)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Discovery and reading


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case folder.

    Args:
        case_id: the case folder's name, e.g. ``"Case_P012"``.
        image_path: the image NIfTI, or None when there is none.
        label_path: the label NIfTI, or None when there is none.
        case_dir: the case folder.
    """

    case_id: str
    image_path: str | None
    label_path: str | None
    case_dir: str = ""


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _niftis(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES))


def _pick(folder: Path, case_id: str) -> str | None:
    """The NIfTI named after the case if there is one, else the first (the stem check reports it)."""
    files = _niftis(folder)
    if not files:
        return None
    named = [p for p in files if nifti_stem(p) == case_id]
    return str((named or files)[0])


def _is_case_dir(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):
        return False
    return path.name.lower().startswith("case_") or (path / IMAGE_DIR).is_dir() or (path / LABEL_DIR).is_dir()


def discover_cases(root: str | os.PathLike) -> list[CaseFiles]:
    """Case folders under ``root`` (sorted by name) and their image and label files.

    Returns an empty list when the root is missing or holds no case folder (validation reports it).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    cases = []
    for case_dir in sorted(p for p in root.iterdir() if _is_case_dir(p)):
        cases.append(
            CaseFiles(
                case_id=case_dir.name,
                image_path=_pick(case_dir / IMAGE_DIR, case_dir.name),
                label_path=_pick(case_dir / LABEL_DIR, case_dir.name),
                case_dir=str(case_dir),
            )
        )
    return cases


@dataclass
class CaseData:
    """One case read from disk, shared by validation and loading (each file is read once).

    Arrays are the NIfTI data ``[i, j, k]`` as stored (a trailing singleton 4th axis dropped);
    None when the file is missing or unreadable. ``*_pixdim`` are the raw header pixdim values of
    the spatial axes (unsanitized, so zero/negative/NaN show); ``*_zooms`` are nibabel's
    ``header.get_zooms()`` (the spacing the engine uses).
    """

    files: CaseFiles
    image: np.ndarray | None = None
    label: np.ndarray | None = None
    image_zooms: tuple[float, ...] | None = None
    label_zooms: tuple[float, ...] | None = None
    image_pixdim: tuple[float, ...] | None = None
    label_pixdim: tuple[float, ...] | None = None
    image_affine: np.ndarray | None = None
    label_affine: np.ndarray | None = None
    read_errors: dict[str, str] = field(default_factory=dict)  # path -> error text

    @property
    def case_id(self) -> str:
        return self.files.case_id


def _read_nifti(path: str):
    import nibabel as nib  # heavy-ish; imported where used

    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    header = img.header
    # str() of the float32 gives the shortest decimal (1.46, not 1.4600000381469727)
    zooms = tuple(float(str(np.float32(z))) for z in header.get_zooms()[:3])
    pixdim = zooms
    if "pixdim" in header:
        # nib.load "fixes" zero/negative pixdim in the header it returns; re-read the 348-540 byte
        # header unchecked so validation sees what the file holds.
        with nib.openers.ImageOpener(path) as f:
            raw = type(header).from_fileobj(f, check=False)
        pixdim = tuple(float(z) for z in raw["pixdim"][1 : 1 + min(data.ndim, 3)])
    return data, zooms, pixdim, np.asarray(img.affine, dtype=np.float64)


def read_case(files: CaseFiles) -> CaseData:
    """Read a case's image and label once; read failures are recorded, never raised."""
    case = CaseData(files=files)
    for kind, path in (("image", files.image_path), ("label", files.label_path)):
        if path is None:
            continue
        try:
            data, zooms, pixdim, affine = _read_nifti(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a reported problem
            case.read_errors[path] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            continue
        setattr(case, kind, data)
        setattr(case, f"{kind}_zooms", zooms)
        setattr(case, f"{kind}_pixdim", pixdim)
        setattr(case, f"{kind}_affine", affine)
    return case


# ----------------------------------------------------------------------------------------------
# Cohort-level checks: (root, cases) -> problems


def check_root(root: Path, cases: list[CaseFiles]) -> Iterator[Problem]:
    """Empty cohort: the root is missing, not a directory, or holds no case folder."""
    if not root.exists():
        yield Problem(str(root), "empty cohort: root does not exist")
    elif not root.is_dir():
        yield Problem(str(root), "empty cohort: root is not a directory")
    elif not cases:
        yield Problem(
            str(root),
            f"empty cohort: no case folders (expected Case_*/{IMAGE_DIR}/Case_*.nii.gz and Case_*/{LABEL_DIR}/...)",
        )


def check_duplicate_ids(root: Path, cases: list[CaseFiles]) -> Iterator[Problem]:
    """Duplicate case ids: folder names equal ignoring letter case (one problem per folder)."""
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(case.case_id.lower(), []).append(case.case_id)
    for case in cases:
        same = groups[case.case_id.lower()]
        if len(same) > 1:
            others = ", ".join(repr(s) for s in same if s != case.case_id)
            yield Problem(
                case.case_dir or str(root / case.case_id),
                f"duplicate case id: {case.case_id!r} equals {others} ignoring case",
                case.case_id,
            )


CohortCheck = Callable[[Path, list[CaseFiles]], Iterable[Problem]]
COHORT_CHECKS: list[tuple[str, CohortCheck]] = [
    ("empty_cohort", check_root),
    ("duplicate_case_id", check_duplicate_ids),
]


# ----------------------------------------------------------------------------------------------
# Case-level checks: CaseData -> problems. Each check guards its own preconditions, so a case with
# an unreadable label still gets its image checked, and nothing cascades into follow-on noise.


def _expected(case: CaseData, folder: str) -> str:
    return str(Path(case.files.case_dir) / folder / f"{case.case_id}.nii.gz")


def check_missing_image(case: CaseData) -> Iterator[Problem]:
    if case.files.image_path is None:
        yield Problem(_expected(case, IMAGE_DIR), f"missing image file (no .nii.gz or .nii in {IMAGE_DIR}/)", case.case_id)


def check_missing_label(case: CaseData) -> Iterator[Problem]:
    if case.files.label_path is None:
        yield Problem(_expected(case, LABEL_DIR), f"missing label file (no .nii.gz or .nii in {LABEL_DIR}/)", case.case_id)


def check_file_names(case: CaseData) -> Iterator[Problem]:
    """Duplicate case id: a file whose stem names another case than its folder, or several files."""
    for folder, path in ((IMAGE_DIR, case.files.image_path), (LABEL_DIR, case.files.label_path)):
        if path is None:
            continue
        stem = nifti_stem(path)
        if stem.lower() != case.case_id.lower():
            yield Problem(path, f"duplicate case id: file names case {stem!r} but sits in folder {case.case_id!r}", case.case_id)
        n = len(_niftis(Path(path).parent))
        if n > 1:
            yield Problem(str(Path(path).parent), f"ambiguous case: {n} NIfTI files in {folder}/, expected one", case.case_id)


def check_readable(case: CaseData) -> Iterator[Problem]:
    for path, error in case.read_errors.items():
        yield Problem(path, f"unreadable or truncated NIfTI file ({error})", case.case_id)


def _arrays(case: CaseData):
    return (("image", case.files.image_path, case.image), ("label", case.files.label_path, case.label))


def check_dimensions(case: CaseData) -> Iterator[Problem]:
    """Each file must be a 3D stack [i, j, k]; a trailing singleton 4th axis is accepted."""
    for kind, path, data in _arrays(case):
        if data is not None and data.ndim != 3:
            yield Problem(path, f"{kind} is not a 3D stack: shape {tuple(data.shape)}", case.case_id)


def check_shapes(case: CaseData) -> Iterator[Problem]:
    if case.image is None or case.label is None:
        return
    if case.image.shape != case.label.shape:
        yield Problem(
            case.files.label_path,
            f"shape mismatch: label shape {tuple(case.label.shape)} != image shape {tuple(case.image.shape)}",
            case.case_id,
        )


def check_spacing_values(case: CaseData) -> Iterator[Problem]:
    """Zero, negative or non-finite spacing in the header pixdim (read raw: nibabel's zooms hide it)."""
    for kind, path, pixdim in (("image", case.files.image_path, case.image_pixdim), ("label", case.files.label_path, case.label_pixdim)):
        if pixdim is None:
            continue
        values = np.asarray(pixdim, dtype=np.float64)
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            yield Problem(path, f"invalid spacing in {kind} header zooms {tuple(round(v, 4) for v in pixdim)}: must be finite and > 0", case.case_id)


def check_spacing_match(case: CaseData) -> Iterator[Problem]:
    a, b = case.image_zooms, case.label_zooms
    if a is None or b is None or len(a) != len(b):
        return
    a, b = np.asarray(a), np.asarray(b)
    if np.all(np.isfinite(a)) and np.all(np.isfinite(b)) and not np.allclose(a, b, rtol=SPACING_RTOL, atol=0.0):
        yield Problem(
            case.files.label_path,
            f"spacing mismatch: label zooms {tuple(np.round(b, 4).tolist())} != image zooms {tuple(np.round(a, 4).tolist())}",
            case.case_id,
        )


def _direction(affine: np.ndarray) -> np.ndarray:
    """Unit columns of the affine's 3x3 part: the voxel axes' directions, free of their scale."""
    m = affine[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    return m / np.where(norms > 0, norms, 1.0)


def check_affine_match(case: CaseData) -> Iterator[Problem]:
    """Image and label must share direction cosines and origin (tolerances above). The scale of
    the affine is not compared: it may legitimately disagree with pixdim, and the spacing check
    covers the zooms."""
    a, b = case.image_affine, case.label_affine
    if a is None or b is None or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return
    da, db = _direction(a), _direction(b)
    if not np.allclose(da, db, rtol=0.0, atol=DIRECTION_ATOL):
        yield Problem(
            case.files.label_path,
            f"affine mismatch: label direction {np.round(db, 3).tolist()} != image direction {np.round(da, 3).tolist()}",
            case.case_id,
        )
    if not np.allclose(a[:3, 3], b[:3, 3], rtol=0.0, atol=ORIGIN_ATOL_MM):
        yield Problem(
            case.files.label_path,
            f"affine mismatch: label origin {np.round(b[:3, 3], 3).tolist()} mm != image origin {np.round(a[:3, 3], 3).tolist()} mm",
            case.case_id,
        )


def check_image_finite(case: CaseData) -> Iterator[Problem]:
    if case.image is None or not np.issubdtype(case.image.dtype, np.floating):
        return
    bad = ~np.isfinite(case.image)
    if bad.any():
        n_nan = int(np.isnan(case.image).sum())
        yield Problem(
            case.files.image_path,
            f"NaN/Inf image values: {n_nan} NaN and {int(bad.sum()) - n_nan} Inf voxel(s)",
            case.case_id,
        )


def check_label_integers(case: CaseData) -> Iterator[Problem]:
    """Labels must be integers; float storage holding integers (real EMIDEC float64) is fine."""
    lab = case.label
    if lab is None or not np.issubdtype(lab.dtype, np.floating):
        return
    bad = lab != np.round(lab)  # NaN counts as non-integer
    if bad.any():
        examples = np.unique(lab[bad])[:5].tolist()
        yield Problem(case.files.label_path, f"non-integer label values, e.g. {examples} ({int(bad.sum())} voxel(s))", case.case_id)


def check_label_range(case: CaseData) -> Iterator[Problem]:
    lab = case.label
    if lab is None:
        return
    valid = np.isin(lab, VALID_LABELS)
    if np.issubdtype(lab.dtype, np.floating):
        valid |= lab != np.round(lab)  # non-integers are the other check's
    if not valid.all():
        values = np.unique(lab[~valid])
        shown = [int(v) if float(v).is_integer() else float(v) for v in values[:8].tolist()]
        yield Problem(case.files.label_path, f"label values outside 0-4: {shown} ({int((~valid).sum())} voxel(s))", case.case_id)


def _label3d(case: CaseData) -> np.ndarray | None:
    lab = case.label
    if lab is None or lab.ndim != 3:
        return None
    return np.asarray(lab)


def check_has_lv(case: CaseData) -> Iterator[Problem]:
    lab = _label3d(case)
    if lab is None:
        return
    if not np.any((lab == CAVITY) | (lab == MYOCARDIUM)):
        yield Problem(case.files.label_path, "no LV: no cavity (1) or healthy myocardium (2) label anywhere in the volume", case.case_id)


_EIGHT = np.ones((3, 3), dtype=bool)


def check_scar_placement(case: CaseData) -> Iterator[Problem]:
    """Scar ({3, 4}) must sit in the myocardium. Per slice ``label[:, :, k]`` and per
    8-connected component C of {3, 4}, with ``border(C)`` the pixels 8-adjacent to C outside it:

    - *inside the LV cavity*: ``border(C)`` is non-empty and all cavity (1): an island in the blood pool;
    - *outside the myocardium*: otherwise, when the slice has healthy myocardium (2) somewhere but
      ``border(C)`` holds none of it: scar detached from the wall.

    A slice with scar but no label 2 is a fully scarred ring when it has a cavity (legitimate, left
    alone here); see :func:`check_scar_without_myocardium` for the case without a cavity.
    One problem per slice and kind, with the component count and sizes.
    """
    lab = _label3d(case)
    if lab is None:
        return
    for k in range(lab.shape[2]):
        sl = lab[:, :, k]
        scar = np.isin(sl, SCAR_LABELS)
        if not scar.any():
            continue
        has_myo = bool((sl == MYOCARDIUM).any())
        components, n = ndimage.label(scar, structure=_EIGHT)
        in_cavity, detached = [], []
        for c, obj in enumerate(ndimage.find_objects(components), start=1):
            # work in the component's box grown by one pixel
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in obj)
            comp = components[box] == c
            border = ndimage.binary_dilation(comp, structure=_EIGHT) & ~comp
            around = sl[box][border]
            size = int(comp.sum())
            if around.size and np.all(around == CAVITY):
                in_cavity.append(size)
            elif has_myo and not np.any(around == MYOCARDIUM):
                detached.append(size)
        if in_cavity:
            yield Problem(
                case.files.label_path,
                f"scar inside the LV cavity: slice k={k} has {len(in_cavity)} scar component(s) of {in_cavity} pixel(s) surrounded by cavity (1)",
                case.case_id,
            )
        if detached:
            yield Problem(
                case.files.label_path,
                f"scar outside the myocardium: slice k={k} has {len(detached)} scar component(s) of {detached} pixel(s) touching no healthy myocardium (2)",
                case.case_id,
            )


def check_scar_without_myocardium(case: CaseData) -> Iterator[Problem]:
    """Scar with no myocardium: a slice with scar ({3, 4}) but neither healthy myocardium (2) nor
    cavity (1). With a cavity, an all-scar slice is a fully infarcted ring and is accepted; without
    both, the scar has no wall to belong to, which in practice means a mislabelled slice (labels
    shifted, or scar painted where the myocardium was never drawn)."""
    lab = _label3d(case)
    if lab is None:
        return
    for k in range(lab.shape[2]):
        sl = lab[:, :, k]
        n_scar = int(np.isin(sl, SCAR_LABELS).sum())
        if n_scar and not (sl == MYOCARDIUM).any() and not (sl == CAVITY).any():
            yield Problem(
                case.files.label_path,
                f"scar with no myocardium: slice k={k} has {n_scar} scar pixel(s) but no healthy myocardium (2) and no cavity (1)",
                case.case_id,
            )


CaseCheck = Callable[[CaseData], Iterable[Problem]]
CASE_CHECKS: list[tuple[str, CaseCheck]] = [
    ("missing_image", check_missing_image),
    ("missing_label", check_missing_label),
    ("file_names", check_file_names),
    ("unreadable", check_readable),
    ("dimensions", check_dimensions),
    ("shape_match", check_shapes),
    ("spacing_values", check_spacing_values),
    ("spacing_match", check_spacing_match),
    ("affine_match", check_affine_match),
    ("image_finite", check_image_finite),
    ("label_integers", check_label_integers),
    ("label_range", check_label_range),
    ("has_lv", check_has_lv),
    ("scar_placement", check_scar_placement),
    ("scar_without_myocardium", check_scar_without_myocardium),
]


def validate_case(case: CaseData) -> list[Problem]:
    """Run every case check on an already read case."""
    return [p for _, check in CASE_CHECKS for p in check(case)]


def cohort_problems(root: str | os.PathLike, cases: list[CaseFiles]) -> list[Problem]:
    """Run every cohort-level check."""
    root = Path(root)
    return [p for _, check in COHORT_CHECKS for p in check(root, cases)]


def validate_cohort(root: str | os.PathLike | None, cfg: "CohortConfig | None" = None) -> ValidationReport:
    """Check a cohort on disk and report every problem (nothing raised for bad data).

    Args:
        root: the cohort root; None to use ``cfg.root``.
        cfg: the cohort config (optional; the checks do not depend on orientation settings).

    Returns:
        a :class:`ValidationReport`; ``report.ok`` when clean.
    """
    if root is None:
        if cfg is None:
            raise ValueError("validate_cohort needs a root or a cfg with a root")
        root = cfg.root
    cases = discover_cases(root)
    report = ValidationReport(root=str(root), checked=len(cases))
    report.problems.extend(cohort_problems(root, cases))
    for files in cases:
        report.problems.extend(validate_case(read_case(files)))
    return report
