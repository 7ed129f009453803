"""Configuration of the embedded phantom LGE cohort."""

from __future__ import annotations

from dataclasses import dataclass, field

# The in-plane spacings of ``pixel_spacing_range`` hold at this image side; other sides keep the
# same physical field of view (a full thorax, ~370 mm), so the pixels grow or shrink instead.
REFERENCE_IMAGE_SIZE = 256

PATTERNS = ("ischemic-LAD", "ischemic-RCA", "ischemic-LCx", "midwall", "subepicardial")


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    a, b = float(value[0]), float(value[1])
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= min <= max <= {hi}, got {value!r}")


@dataclass
class PhantomConfig:
    """What the phantom cohort looks like, and how hard it is.

    Args:
        image_size: side of the square slices in pixels (>= 64).
        pixel_spacing_range: (min, max) in-plane spacing in mm drawn per patient, as it holds at a
            256-pixel side (EMIDEC: about 1.46 mm; allowed 1-2 mm). At other sides the spacing is
            scaled by ``256 / image_size`` so the field of view stays a full thorax (~370 mm).
        slice_thickness: slice spacing in mm of most patients (EMIDEC: 10 mm).
        max_slice_thickness: the thickest slice spacing, drawn for ``thick_slice_fraction`` of patients.
        thick_slice_fraction: share of patients with slices thicker than ``slice_thickness``.
        min_slices, max_slices: slices per patient, base to apex (EMIDEC: 5-10).
        negative_fraction: share of patients without scar (EMIDEC: 33 of 100).
        pattern_weights: relative weights of the scar patterns of positive patients
            (keys from ``PATTERNS``).
        tiny_scar_fraction: share of positive patients whose scar is tiny (a few pixels in one or
            two slices).
        mvo_probability: chance that a large, nearly transmural ischemic scar holds an MVO core.
        supersampling: sub-samples per pixel side around the heart; the image is their block
            average (partial volume) and the label their majority.
        thorax_supersampling: sub-samples per pixel side away from the heart.
        scar_blood_ratio: (min, max) of the patient's scar-to-blood intensity ratio. Values near 1
            make subendocardial scar indistinguishable from the blood pool by intensity alone.
        nulling_range: (min, max) healthy-myocardium-to-blood ratio; drawn log-uniformly, so most
            patients are well nulled (dark myocardium) and some are grey (poor inversion time).
        noise_range: (min, max) Rician noise sigma relative to the blood intensity, log-uniform.
        bias_strength: largest relative amplitude of the smooth multiplicative coil bias field.
        scar_heterogeneity: (min, max) relative amplitude of the scar's internal texture.
        grey_zone_mm: (min, max) width in mm of the ramp from healthy to scar intensity at the
            scar's border with healthy myocardium (peri-infarct grey zone).
        blur_sigma: (min, max) point-spread blur in pixels applied before the noise.
        blood_intensity: (min, max) raw value of the blood pool (the per-patient global scale);
            images are clipped to 0-4095 and rounded like scanner magnitudes.

    Example:
        >>> cfg = PhantomConfig(image_size=128, scar_blood_ratio=(1.0, 1.2))
    """

    image_size: int = 256
    pixel_spacing_range: tuple[float, float] = (1.41, 1.46)
    slice_thickness: float = 10.0
    max_slice_thickness: float = 13.0
    thick_slice_fraction: float = 0.2
    min_slices: int = 6
    max_slices: int = 10
    negative_fraction: float = 1.0 / 3.0
    pattern_weights: dict[str, float] = field(
        default_factory=lambda: {
            "ischemic-LAD": 0.28, "ischemic-RCA": 0.2, "ischemic-LCx": 0.2, "midwall": 0.16, "subepicardial": 0.16,
        }
    )
    tiny_scar_fraction: float = 0.2
    mvo_probability: float = 0.5
    supersampling: int = 4
    thorax_supersampling: int = 2
    scar_blood_ratio: tuple[float, float] = (0.85, 1.8)
    nulling_range: tuple[float, float] = (0.03, 0.5)
    noise_range: tuple[float, float] = (0.025, 0.11)
    bias_strength: float = 0.35
    scar_heterogeneity: tuple[float, float] = (0.08, 0.3)
    grey_zone_mm: tuple[float, float] = (0.6, 2.0)
    blur_sigma: tuple[float, float] = (0.3, 0.8)
    blood_intensity: tuple[float, float] = (250.0, 1300.0)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 64:
            raise ValueError(f"image_size must be an int >= 64, got {self.image_size!r}")
        _check_range("pixel_spacing_range", self.pixel_spacing_range, 1.0, 2.0)
        if not 1.0 <= self.slice_thickness <= self.max_slice_thickness <= 30.0:
            raise ValueError(
                f"need 1 <= slice_thickness <= max_slice_thickness <= 30 mm, got "
                f"{self.slice_thickness} and {self.max_slice_thickness}"
            )
        if not 0.0 <= self.thick_slice_fraction <= 1.0:
            raise ValueError(f"thick_slice_fraction must be in [0, 1], got {self.thick_slice_fraction}")
        if not 4 <= self.min_slices <= self.max_slices <= 20:
            raise ValueError(f"need 4 <= min_slices <= max_slices <= 20, got {self.min_slices}, {self.max_slices}")
        if not 0.0 <= self.negative_fraction <= 1.0:
            raise ValueError(f"negative_fraction must be in [0, 1], got {self.negative_fraction}")
        unknown = set(self.pattern_weights) - set(PATTERNS)
        if unknown:
            raise ValueError(f"pattern_weights: unknown patterns {sorted(unknown)}; expected some of {list(PATTERNS)}")
        if any(w < 0 for w in self.pattern_weights.values()) or sum(self.pattern_weights.values()) <= 0:
            raise ValueError(f"pattern_weights must be >= 0 with a positive sum, got {self.pattern_weights}")
        for name in ("tiny_scar_fraction", "mvo_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("supersampling", "thorax_supersampling"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value <= 8:
                raise ValueError(f"{name} must be an int in 1-8, got {value!r}")
        _check_range("scar_blood_ratio", self.scar_blood_ratio, 0.3, 5.0)
        _check_range("nulling_range", self.nulling_range, 0.0, 1.0)
        _check_range("noise_range", self.noise_range, 1e-4, 0.5)
        if self.nulling_range[0] <= 0 or self.noise_range[0] <= 0:
            raise ValueError("nulling_range and noise_range are drawn log-uniformly: their minimum must be > 0")
        if not 0.0 <= self.bias_strength < 1.0:
            raise ValueError(f"bias_strength must be in [0, 1), got {self.bias_strength}")
        _check_range("scar_heterogeneity", self.scar_heterogeneity, 0.0, 1.0)
        _check_range("grey_zone_mm", self.grey_zone_mm, 0.0, 10.0)
        _check_range("blur_sigma", self.blur_sigma, 0.0, 3.0)
        _check_range("blood_intensity", self.blood_intensity, 1.0, 2000.0)

    def spacing_scale(self) -> float:
        """Factor applied to ``pixel_spacing_range`` at this image side (1 at 256 pixels)."""
        return REFERENCE_IMAGE_SIZE / self.image_size
