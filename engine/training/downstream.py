"""Stage: train the downstream DenseNet121-based scar + myocardium segmenter (DOMAIN.md section 5).

Real train patients alone, or with ``n_synthetic`` filtered samples from a synthetic store;
class-balanced draws (positive and negative slices equally often) guard against the collapse to
"no scar" seen with small real-only sets. Validated on the val patients: scar Dice on positive
slices and patient-level detection (a patient is positive when its predicted scar area, summed
over its slices, exceeds ``detection_min_pixels``). Exported to ``<run_dir>/<name>/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.models.downstream import DownstreamModelConfig
from engine.training.distributed import RayTrainConfig
from engine.training.loop import TrainLoopConfig, require_epochs

logger = logging.getLogger(__name__)

STAGE = "downstream"
INPUT_RANGE = "0,1"


@dataclass
class DownstreamStageConfig:
    """Args:
        model: the DenseNet121 U-Net.
        loop: epochs, batch size, optimizer (``balanced`` on by default).
        ray: workers and resources.
        synthetic: path or URL of a synthetic store (empty: the run's own, ``synthesis.store``),
            opened with ``synthesis.storage_options`` as every store of the run.
        n_synthetic: filtered synthetic samples added to the real training slices (0: real only).
        synthetic_min_dice: draw the synthetic samples from those with Dice > this instead of those
            that passed the store's filter (None); below the store's own threshold only from a store
            written with ``keep_rejected`` (the threshold sweeps of ``lgesynth sweep``).
        detection_min_pixels: predicted scar pixels (summed over a patient's slices) above which a
            patient counts as positive.
        name: the run name (``<run_dir>/<name>/``), so real-only and mixed models can live side by side.
        augment: augment the training slices as the ``data`` section says (false: never; random
            affine resampling costs about as much CPU as the model's own step at 64 px, so short CPU
            runs such as the demo's learn more per second without it).
    """

    model: DownstreamModelConfig = field(default_factory=DownstreamModelConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20, batch_size=16, lr=1e-3, balanced=True))
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    synthetic: str = ""
    n_synthetic: int = 0
    synthetic_min_dice: float | None = None
    detection_min_pixels: float = 10.0
    name: str = STAGE
    augment: bool = True

    def __post_init__(self) -> None:
        require_epochs(self.loop, "loop")
        if self.n_synthetic < 0:
            raise ValueError(f"n_synthetic must be >= 0, got {self.n_synthetic}")
        if self.synthetic_min_dice is not None and not -1.0 <= self.synthetic_min_dice < 1.0:
            raise ValueError(f"synthetic_min_dice must be None or in [-1, 1) (Dice > it), got {self.synthetic_min_dice}")
        if self.detection_min_pixels < 0:
            raise ValueError(f"detection_min_pixels must be >= 0, got {self.detection_min_pixels}")


def load_downstream(folder) -> tuple[Any, dict[str, Any]]:
    """The exported downstream model of ``<folder>/downstream.*`` in eval mode, and its record
    (config, sha256, ``detection_min_pixels``, ...)."""
    from engine.models.downstream import DownstreamModelConfig, build_downstream_model
    from engine.training.checkpoint import load_model_weights, read_model_config

    record = read_model_config(folder, STAGE)
    model = build_downstream_model(DownstreamModelConfig.from_dict(record["model"]))
    load_model_weights(folder, STAGE, model)
    return model.eval(), record


def patient_scar_areas(model, arrays, device, batch_size: int = 32) -> dict[str, float]:
    """Predicted scar pixels of every patient of ``arrays``, summed over its slices."""
    import torch

    areas: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(arrays), batch_size):
            x = torch.tensor(arrays.image[start:start + batch_size], device=device)  # a copy: may be a read-only view
            scar = (torch.sigmoid(model(x)[:, 0].float()) > 0.5).sum(dim=(1, 2)).cpu().numpy()
            for pid, pixels in zip(arrays.patient_id[start:start + batch_size], scar, strict=True):
                areas[pid] = areas.get(pid, 0.0) + float(pixels)
    return areas


def patient_detection_metrics(model, arrays, device, min_pixels: float, batch_size: int = 32) -> dict[str, float]:
    """Patient-level detection on real slices: predicted scar pixels summed per patient > ``min_pixels``."""
    from engine.evaluation.metrics import confusion_metrics, patient_confusion, patient_detection
    from engine.training.data import patients_in

    areas = patient_scar_areas(model, arrays, device, batch_size)
    truth = patients_in(arrays)
    tn, fp, fn, tp = patient_confusion(truth, patient_detection(areas, min_pixels))
    metrics = confusion_metrics(tn, fp, fn, tp)
    return {"val_patient_accuracy": metrics["accuracy"], "val_patient_balanced_accuracy": metrics["balanced_accuracy"],
            "val_tn": tn, "val_fp": fp, "val_fn": fn, "val_tp": tp}


def downstream_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of the downstream stage."""
    from engine.models.downstream import build_downstream_model, downstream_loss_fn
    from engine.training.runner import worker_setup
    from engine.training.segmentation import scar_validation, train_segmentation_model

    setup = worker_setup(config, DownstreamStageConfig)
    stage, val = setup.stage, setup.arrays["val"]
    if not stage.augment:
        setup.data = dataclasses.replace(setup.data, augment=False)
    net = build_downstream_model(stage.model)

    def validate() -> dict[str, float]:
        metrics = scar_validation(net, val.image, val.label, INPUT_RANGE, setup.device)
        metrics.update(patient_detection_metrics(net, val, setup.device, stage.detection_min_pixels))
        return metrics

    train_segmentation_model(
        config, setup, name=STAGE, net=net, loss_fn=downstream_loss_fn(stage.model), outputs="scar+myocardium",
        input_range=INPUT_RANGE, validate=validate, export_dir=Path(setup.ctx.run_dir) / stage.name,
        export_record={"n_synthetic": stage.n_synthetic, "synthetic": config["synthetic"],
                       "synthetic_min_dice": stage.synthetic_min_dice,
                       "detection_min_pixels": stage.detection_min_pixels,
                       "synthetic_sources": config["synthetic_sources"]},
    )


def held_out_patients(run_dir: str | Path, parts: dict[str, Any]) -> set[str]:
    """The run's validation and test patients: those of ``parts`` other than ``train``, and those
    of the run's split file (``<run_dir>/splits.json``) when it exists (callers may pass ``parts``
    with the test patients already dropped)."""
    from engine.training.prepare import SPLITS_FILE

    held = {str(p) for name, arrays in parts.items() if name != "train" for p in arrays.patient_id}
    path = Path(run_dir) / SPLITS_FILE
    if path.is_file():
        held |= {str(p) for name, patients in json.loads(path.read_text())["splits"].items() if name != "train"
                 for p in patients}
    return held


def refuse_held_out_sources(sources, held_out: set[str], url: str) -> None:
    """Refuse synthetic samples made from a held-out patient's slice (source ``"patient/slice"``):
    a downstream model trained on the anatomy of the patients it is validated or tested on would
    score a leak, not the method (DOMAIN.md: splits are always by patient).

    A store of the user's own without a ``source`` array (any store with image, label and passed
    trains) cannot be checked: that is logged as a warning, not refused.

    Raises:
        ValueError: naming the store, how many samples and which patients.
    """
    if sources is None:
        logger.warning("%s: the synthetic samples do not record their source slice (no 'source' array), so the "
                       "engine cannot check that none was made from a validation or test patient", url)
        return
    patients = [str(s).rpartition("/")[0] for s in sources]
    leaked = sorted({p for p in patients if p in held_out})
    if leaked:
        count = sum(p in held_out for p in patients)
        raise ValueError(
            f"{url}: {count} of the {len(patients)} synthetic samples drawn for training were made from the "
            f"slices of {len(leaked)} validation or test patient(s) of this run ({', '.join(leaked[:5])}"
            f"{', ...' if len(leaked) > 5 else ''}); a downstream model must not train on held-out patients' "
            "anatomy. Make the store from this run's training patients (synthesis.split=train, the default, "
            "with this run's run_dir)")


def train_downstream(cfg, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Driver: real train slices (+ synthetic), Ray Train, final metrics.

    Args:
        parts: the run's ``train`` and ``val`` slice arrays when the caller has them already
            (:func:`engine.training.prepare.prepare_arrays`; default: prepared here).
    """
    from engine.synthesis.store import read_synthetic_arrays, synthetic_rows
    from engine.training.data import draw_synthetic, mix_real_and_synthetic
    from engine.training.prepare import prepare_arrays
    from engine.training.runner import launch

    if parts is None:
        parts, _ = prepare_arrays(cfg)
    stage: DownstreamStageConfig = cfg.downstream
    url = stage.synthetic or cfg.synthesis.store_url(cfg.run_dir)
    options = cfg.synthesis.storage_options  # for every store of the run (a local path takes none)
    synthetic = None
    if stage.n_synthetic:
        # the draw first (from the row arrays), then only the drawn samples' images are read: a
        # store of millions of candidates is never loaded whole; mix_real_and_synthetic draws the
        # same samples from what it is given (draw_synthetic), so here it takes all n of them
        available = synthetic_rows(url, storage_options=options, min_dice=stage.synthetic_min_dice)
        what = (f"synthetic samples with Dice > {stage.synthetic_min_dice}" if stage.synthetic_min_dice is not None
                else "synthetic samples that passed the filter") + f" in {url}"
        drawn = available[draw_synthetic(len(available), stage.n_synthetic, stage.loop.seed, what)]
        synthetic = read_synthetic_arrays(url, storage_options=options, min_dice=stage.synthetic_min_dice, rows=drawn)
        refuse_held_out_sources(synthetic.get("source"), held_out_patients(cfg.run_dir, parts), url)
    train = mix_real_and_synthetic(parts["train"], synthetic, stage.n_synthetic, seed=stage.loop.seed)
    sources = [s for s, syn in zip(train.source, np.asarray(train.synthetic), strict=True) if syn]
    return launch(cfg, stage, downstream_worker, name=stage.name, arrays={"train": train, "val": parts["val"]},
                  extra={"synthetic_sources": sources, "synthetic": url if stage.n_synthetic else ""},
                  export=Path(cfg.run_dir) / stage.name / f"{STAGE}.json")
