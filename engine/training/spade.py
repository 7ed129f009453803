"""Stage: train the paper's SPADE baselines, SPADE-FC and SPADE-LC (DOMAIN.md section 6).

One config section (``spade``), two trained variants: ``lgesynth train spade-fc`` (full context) and
``lgesynth train spade-lc`` (limited context), each its own Ray Train run (``spade-fc``,
``spade-lc``, so each resumes on its own), exported to ``<run_dir>/spade-fc/spade.safetensors`` +
``spade.json`` and ``<run_dir>/spade-lc/...``. The model and its semantic map:
:mod:`engine.models.spade`.

Training data are the train patients' positive slices, as for the generator (DOMAIN.md section 4):
the real scar becomes the scar to synthesize, the scar dilated by ``data.mask_dilation`` the region
hidden from the context, and the real image the target. Loss: L1 over the whole image plus
``mask_weight`` times the L1 inside the hidden region. Validation on the val patients' positive
slices: L1 (whole and inside the region) and SSIM (:func:`engine.evaluation.metrics.ssim`).

The original SPADE also trains a multi-scale patch discriminator (hinge GAN loss) and a feature
matching loss. Those need a second model and optimizer stepped in alternation, which the engine's
shared single-optimizer loop (:func:`engine.training.loop.train_epochs`) does not do; this stage
trains the generator with the reconstruction terms only and does not pretend otherwise. Expect
smoother scar texture than an adversarially trained SPADE; what separates FC from LC (how much of the
input it sees, and that nothing is blended back) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.models.spade import CONTEXTS, SpadeConfig
from engine.training.distributed import RayTrainConfig
from engine.training.loop import TrainLoopConfig, require_epochs

STAGE = "spade"  # the exported model's name inside <run_dir>/spade-fc/ and <run_dir>/spade-lc/
ARRAY_KEYS = ("image", "label", "scar", "mask")


def method_of(context: str) -> str:
    """The method (and run, and export folder) name of a context: "full" -> "spade-fc"."""
    for method, value in CONTEXTS.items():
        if value == context:
            return method
    raise ValueError(f"context must be one of {', '.join(CONTEXTS.values())}, got {context!r}")


@dataclass
class SpadeStageConfig:
    """Args:
        model: the SPADE generator (crop size a multiple of ``2 ** len(model.channels)``).
        loop: epochs, batch size, optimizer (each variant trains with the same loop).
        ray: workers and resources.
        mask_weight: weight of the L1 inside the region to synthesize, added to the whole-image L1.
        limited_margin_px: SPADE-LC's context: pixels beyond the myocardium and cavity that stay
            visible (8-connected dilation); SPADE-FC ignores it.

    Example:
        >>> SpadeStageConfig(mask_weight=10.0, limited_margin_px=4).limited_margin_px
        4
    """

    model: SpadeConfig = field(default_factory=SpadeConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=30, batch_size=8, lr=1e-3))
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    mask_weight: float = 5.0
    limited_margin_px: int = 6

    def __post_init__(self) -> None:
        require_epochs(self.loop, "loop")
        if not (isinstance(self.mask_weight, (int, float)) and np.isfinite(self.mask_weight) and self.mask_weight >= 0):
            raise ValueError(f"mask_weight must be a finite number >= 0, got {self.mask_weight!r}")
        if isinstance(self.limited_margin_px, bool) or not isinstance(self.limited_margin_px, int) \
                or self.limited_margin_px < 0:
            raise ValueError(f"limited_margin_px must be an integer >= 0, got {self.limited_margin_px!r}")

    def folder(self, run_dir: str, context: str) -> Path:
        """Where the variant of ``context`` is exported, absolute: ``<run_dir>/spade-fc`` or ``spade-lc``."""
        return (Path(run_dir) / method_of(context)).absolute()


def spade_arrays(arrays, data_cfg) -> dict[str, np.ndarray]:
    """The stage's inputs from the positive slices of ``arrays``: ``image`` float32 [P, 1, S, S] in
    [-1, 1], ``label`` uint8 [P, S, S], ``scar`` and ``mask`` (scar dilated by ``mask_dilation``)
    uint8 [P, 1, S, S] (:func:`engine.training.data.inpainting_arrays`)."""
    from engine.training.data import inpainting_arrays

    items = inpainting_arrays(arrays, data_cfg)
    return {k: np.asarray(items[k]) for k in ARRAY_KEYS}


def spade_validation(net, arrays: dict[str, np.ndarray], context: str, limited_margin_px: int, device,
                     max_slices: int = 64) -> dict[str, float]:
    """L1 (whole image and inside the region to synthesize) and mean SSIM in [0, 1] units of the
    model's images against the real ones, on the first ``max_slices`` of ``arrays``."""
    import torch

    from engine.evaluation.metrics import ssim
    from engine.models.spade import semantic_map

    a = {k: v[:max_slices] for k, v in arrays.items()}
    seg = semantic_map(a["image"], a["label"], a["scar"], a["mask"], context, limited_margin_px)
    with torch.no_grad():
        generated = net(torch.as_tensor(seg, device=device)).float().cpu().numpy()
    fake, real = (generated[:, 0] + 1.0) / 2.0, (np.asarray(a["image"], np.float32)[:, 0] + 1.0) / 2.0
    mask = np.asarray(a["mask"])[:, 0] > 0
    error = np.abs(fake - real)
    return {"val_l1": float(error.mean()), "val_l1_mask": float(error[mask].mean()) if mask.any() else 0.0,
            "val_ssim": float(np.mean([ssim(f, r, data_range=1.0) for f, r in zip(fake, real, strict=True)]))}


def spade_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of one SPADE variant (``config["context"]``)."""
    import torch

    from engine.models.spade import build_spade, inpainting_l1
    from engine.training.checkpoint import export_model
    from engine.training.datasets import SpadeDataset, collate
    from engine.training.distributed import prepare
    from engine.training.loop import train_epochs
    from engine.training.runner import worker_setup

    context = config["context"]
    setup = worker_setup(config, SpadeStageConfig)
    ctx, stage, data_cfg, rank, device = setup.ctx, setup.stage, setup.data, setup.rank, setup.device
    train, val = setup.arrays["train"], setup.arrays["val"]
    net = build_spade(stage.model, data_cfg.crop_size)
    model = prepare(net)

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        seg, image, mask = (batch[k].to(device) for k in ("seg", "image", "mask"))
        loss, parts = inpainting_l1(model(seg), image, mask, stage.mask_weight)
        return {"loss": loss, **parts}

    def validate() -> dict[str, float]:
        if val is None:
            return {}
        net.eval()
        return spade_validation(net, val, context, stage.limited_margin_px, device)

    train_epochs(
        ctx=ctx, loop=stage.loop, models={STAGE: model}, parameters=list(model.parameters()),
        dataset=SpadeDataset(train, data_cfg, context, stage.limited_margin_px, train=True, seed=stage.loop.seed),
        step_fn=step, validate_fn=validate, collate_fn=collate,
        config={"stage": config["stage"], "data": config["data"], "context": context},
    )
    if rank == 0:
        export_model(stage.folder(ctx.run_dir, context), STAGE, net, {
            "model": stage.model.to_dict(), "method": method_of(context), "context": context,
            "limited_margin_px": stage.limited_margin_px, "mask_dilation": data_cfg.mask_dilation,
            "input_range": "-1,1", "crop_size": data_cfg.crop_size})


def train_spade(cfg, context: str) -> dict[str, Any]:
    """Driver of one SPADE variant: ``context`` "full" (SPADE-FC) or "limited" (SPADE-LC)."""
    from engine.training.prepare import prepare_arrays
    from engine.training.runner import launch

    method = method_of(context)
    stage: SpadeStageConfig = cfg.spade
    stage.model.check_crop_size(cfg.data.crop_size)
    parts, _ = prepare_arrays(cfg)
    if not parts["train"].positive.any():
        raise ValueError(f"{cfg.cohort.root}: the train patients have no positive slice to train {method} on")
    val = spade_arrays(parts["val"], cfg.data) if parts["val"].positive.any() else None
    return launch(cfg, stage, spade_worker, name=method, arrays={"train": spade_arrays(parts["train"], cfg.data), "val": val},
                  extra={"context": context}, export=stage.folder(cfg.run_dir, context) / f"{STAGE}.json")
