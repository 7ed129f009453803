"""What fills a candidate's scar region: the registry of synthesis methods.

Every method runs in the same harness: the same plan (sources, scar masks, edge maps, captions,
noise seeds), the same filter actors (frozen reward model, same threshold), the same store schema,
so the alignment and utility gates compare methods and nothing else (DOMAIN.md section 5).

- ``lgesynthnet``: the trained generator (:class:`engine.synthesis.actors.DiffusionActor`).
- ``paste``: the control every report includes, no model at all: the conditioning scar mask is
  filled with a scar-like intensity (a multiple of the slice's own blood-pool level) plus smoothed
  noise of the blood pool's own spread; every pixel outside the mask is the input's. A trained
  generator that does not beat it on realism and utility has shown nothing.
- ``spade-fc`` and ``spade-lc``: the paper's SPADE baselines (full and limited context; Table 1),
  trained by ``lgesynth train spade-fc`` / ``spade-lc`` (:class:`engine.synthesis.spade.SpadeActor`,
  model and conditioning in :mod:`engine.models.spade`). They output the whole image, the input is
  not blended back.
- ``controlnet`` and ``controlnet-template``: the paper's ControlNet baselines ("ControlNet" and
  "ControlNet with template guidance", Table 1), one model trained by ``lgesynth train controlnet``
  (:class:`engine.synthesis.controlnet_baseline.ControlNetBaselineActor`, model in
  :mod:`engine.models.controlnet_baseline`): a text-to-image latent diffusion UNet with a ControlNet
  on the same scar edge map and caption, no inpainting base and no reward. ``controlnet`` generates
  the whole image from pure noise; ``controlnet-template`` starts from the negative source slice
  noised to ``controlnet_baseline.template_strength`` (SDEdit), so the output keeps the template's
  anatomy. Both output the whole image, nothing is blended back; the store's fingerprint holds the
  method, the exported model's sha256 and (``controlnet-template``) the strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.anatomy.labels import CAVITY

METHODS = ("lgesynthnet", "paste", "spade-fc", "spade-lc", "controlnet", "controlnet-template")
SPADE_METHODS = ("spade-fc", "spade-lc")
CONTROLNET_METHODS = ("controlnet", "controlnet-template")


@dataclass
class PasteConfig:
    """The paste control.

    Args:
        blood_ratio: scar intensity relative to the median of the slice's LV blood pool (LGE scar is
            about as bright as blood, often brighter; the phantom draws 0.9-1.4).
        noise: standard deviation of the pasted noise relative to the blood pool's own standard
            deviation (1: the blood pool's texture amplitude).
        smooth_px: Gaussian sigma (pixels) the noise is smoothed with before scaling (0: white noise).
    """

    blood_ratio: float = 1.15
    noise: float = 1.0
    smooth_px: float = 1.0

    def __post_init__(self) -> None:
        if self.blood_ratio <= 0:
            raise ValueError(f"blood_ratio must be > 0, got {self.blood_ratio}")
        if self.noise < 0 or self.smooth_px < 0:
            raise ValueError(f"noise and smooth_px must be >= 0, got {self.noise}, {self.smooth_px}")


def paste(image: np.ndarray, scar: np.ndarray, source_label: np.ndarray, noise_seed: int,
          cfg: PasteConfig) -> np.ndarray:
    """One image [S, S] in [-1, 1] with ``scar`` [S, S] filled (see :class:`PasteConfig`).

    The level is measured on the slice's blood pool (label CAVITY) in [0, 1] intensity units; a
    slice without a blood pool label is refused (a negative source slice always has one)."""
    from scipy.ndimage import gaussian_filter

    image = np.asarray(image, np.float32)
    scar = np.asarray(scar) > 0
    out = image.copy()
    if not scar.any():
        return out
    blood = (image[np.asarray(source_label) == CAVITY] + 1.0) / 2.0
    if blood.size == 0:
        raise ValueError("paste: the source slice has no blood pool (label 1) to measure the scar level on")
    level, spread = float(np.median(blood)) * cfg.blood_ratio, float(blood.std())
    noise = np.random.default_rng(int(noise_seed)).standard_normal(image.shape)
    if cfg.smooth_px > 0:
        noise = gaussian_filter(noise, cfg.smooth_px)
    noise = noise / max(float(noise.std()), 1e-8)
    filled = np.clip(level + cfg.noise * spread * noise, 0.0, 1.0) * 2.0 - 1.0
    out[scar] = filled[scar].astype(np.float32)
    return out


class PasteActor:
    """The paste control as a drop-in for the diffusion actor pool (same rows in, same rows out).

    Args:
        paste: :class:`PasteConfig` as a dict.
    """

    def __init__(self, paste: dict[str, Any] | None = None):
        self.cfg = PasteConfig(**(paste or {}))

    def generate(self, inputs: dict[str, Any], noise_seeds: list[int]) -> np.ndarray:
        """Images float32 [n, 1, S, S] in [-1, 1] for one shard's inputs (rows without a scar are the input)."""
        image = np.asarray(inputs["image"], np.float32)
        scar = np.asarray(inputs["scar"])
        labels = np.asarray(inputs["source_label"])
        return np.stack([paste(image[i, 0], scar[i, 0], labels[i], noise_seeds[i], self.cfg)[None]
                         for i in range(len(image))]) if len(image) else image.copy()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from engine.synthesis.actors import generated_rows

        return generated_rows(batch, self.generate)


def method_actor(method: str):
    """The actor class of ``method`` (the diffusion stage of the pipeline)."""
    if method == "lgesynthnet":
        from engine.synthesis.actors import DiffusionActor

        return DiffusionActor
    if method == "paste":
        return PasteActor
    if method in SPADE_METHODS:
        from engine.synthesis.spade import SpadeActor

        return SpadeActor
    if method in CONTROLNET_METHODS:
        from engine.synthesis.controlnet_baseline import ControlNetBaselineActor

        return ControlNetBaselineActor
    raise ValueError(f"unknown synthesis method {method!r}; known: {', '.join(METHODS)}")
