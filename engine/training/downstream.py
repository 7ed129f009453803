"""Stage: train the downstream DenseNet121-based scar + myocardium segmenter (DOMAIN.md section 5).

Real train patients alone, or with ``n_synthetic`` filtered samples from a synthetic store;
class-balanced draws of the real slices (positive and negative equally often) guard against the
collapse to "no scar" seen with small real-only sets, and every arm shares them: synthetic samples
are added to the batches (``synthetic_fraction``), so arms differ only in their synthetic data.
Validated on the val patients every epoch: scar Dice on positive slices, myocardium Dice and
patient-level detection (a patient is positive when its largest component of predicted scar inside
the predicted myocardium exceeds ``detection_min_mm2``; AUROC of that score). The best epoch by
``select_by`` is exported to ``<run_dir>/<name>/``.
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
        detection_min_mm2: the patient-level detection threshold where it is not calibrated (the
            evaluation calibrates it on the validation patients): a patient is positive when its
            largest component of predicted scar inside the predicted myocardium, over its slices,
            is larger than this (mm^2).
        synthetic_fraction: the synthetic samples' share among the positive draws, added to the
            batches of real draws (which every arm shares: :func:`engine.training.loop.paired_batches`);
            None (default): their share of all positive samples, real and synthetic.
        select_by: the validation metric whose best epoch is exported (the model is validated on
            the validation patients every epoch): ``val_scar_dice`` (default: scar Dice over the
            positive slices, the model's own target and a continuous score, where the patient-level
            AUROC over a dozen validation patients moves in steps), any other metric the stage
            validates (``val_patient_auroc``, ``val_patient_myocardium_dice``, ...), or "" for the
            last epoch.
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
    detection_min_mm2: float = 10.0
    synthetic_fraction: float | None = None
    select_by: str = "val_scar_dice"
    name: str = STAGE
    augment: bool = True

    def __post_init__(self) -> None:
        require_epochs(self.loop, "loop")
        if self.n_synthetic < 0:
            raise ValueError(f"n_synthetic must be >= 0, got {self.n_synthetic}")
        if self.synthetic_min_dice is not None and not -1.0 <= self.synthetic_min_dice < 1.0:
            raise ValueError(f"synthetic_min_dice must be None or in [-1, 1) (Dice > it), got {self.synthetic_min_dice}")
        if self.synthetic_fraction is not None and not 0.0 <= self.synthetic_fraction < 1.0:
            raise ValueError(f"synthetic_fraction must be None or in [0, 1), got {self.synthetic_fraction}")
        if self.detection_min_mm2 < 0:
            raise ValueError(f"detection_min_mm2 must be >= 0, got {self.detection_min_mm2}")


def load_downstream(folder) -> tuple[Any, dict[str, Any]]:
    """The exported downstream model of ``<folder>/downstream.*`` in eval mode, and its record
    (config, sha256, ``detection_min_mm2``, ...)."""
    from engine.models.downstream import DownstreamModelConfig, build_downstream_model
    from engine.training.checkpoint import load_model_weights, read_model_config

    record = read_model_config(folder, STAGE)
    model = build_downstream_model(DownstreamModelConfig.from_dict(record["model"]))
    load_model_weights(folder, STAGE, model)
    return model.eval(), record


def predict_masks(model, arrays, device, batch_size: int = 32) -> dict[str, np.ndarray]:
    """The model's scar and myocardium masks (probability > 0.5) of every slice of ``arrays``:
    ``{"scar": bool [N, S, S], "myocardium": bool [N, S, S]}``."""
    import torch

    scar, myocardium = [], []
    with torch.no_grad():
        for start in range(0, len(arrays), batch_size):
            x = torch.tensor(arrays.image[start:start + batch_size], device=device)  # a copy: may be a read-only view
            prob = torch.sigmoid(model(x)[:, :2].float()).cpu().numpy()
            scar.append(prob[:, 0] > 0.5)
            myocardium.append(prob[:, 1] > 0.5)
    empty = np.zeros((0, *arrays.label.shape[1:]), bool)
    return {"scar": np.concatenate(scar) if scar else empty, "myocardium": np.concatenate(myocardium) if myocardium else empty}


def patient_scores(masks: dict[str, np.ndarray], arrays) -> dict[str, float]:
    """Patient id -> its scar score: the largest component of predicted scar inside the predicted
    myocardium, in mm^2, over its slices (:func:`engine.evaluation.metrics.largest_scar_component_mm2`)."""
    from engine.evaluation.metrics import largest_scar_component_mm2

    slices = largest_scar_component_mm2(masks["scar"], masks["myocardium"], arrays.pixel_area_mm2)
    scores: dict[str, float] = {}
    for pid, value in zip(arrays.patient_id, slices, strict=True):
        scores[pid] = max(scores.get(pid, 0.0), float(value))
    return dict(sorted(scores.items()))


def patient_records(masks: dict[str, np.ndarray], arrays, threshold_mm2: float) -> dict[str, dict[str, Any]]:
    """Per patient, what :mod:`engine.evaluation.stats` resamples: truth, score (mm^2), the call
    (score > ``threshold_mm2``), and the summed slice Dice of scar (over positive slices), of scar
    where it was found (Dice-TP) and of the myocardium region (labels 2-4, over slices holding it),
    with the slice counts."""
    from engine.anatomy.labels import MYOCARDIUM, SCAR
    from engine.evaluation.metrics import dice_per_sample

    scores = patient_scores(masks, arrays)
    truth_scar = arrays.label >= SCAR
    truth_myo = arrays.label >= MYOCARDIUM
    scar_dice = dice_per_sample(masks["scar"], truth_scar)
    myo_dice = dice_per_sample(masks["myocardium"], truth_myo)
    has_scar = truth_scar.reshape(len(arrays), -1).any(1)
    found = masks["scar"].reshape(len(arrays), -1).any(1) & has_scar
    has_myo = truth_myo.reshape(len(arrays), -1).any(1)
    ids = np.asarray(arrays.patient_id)
    records: dict[str, dict[str, Any]] = {}
    for pid, score in scores.items():
        mine = ids == pid
        records[pid] = {
            "positive": bool(has_scar[mine].any()), "score": score, "called": bool(score > threshold_mm2),
            "scar_dice_sum": float(scar_dice[mine & has_scar].sum()), "scar_slices": int((mine & has_scar).sum()),
            "scar_tp_dice_sum": float(scar_dice[mine & found].sum()), "scar_tp_slices": int((mine & found).sum()),
            "myocardium_dice_sum": float(myo_dice[mine & has_myo].sum()), "myocardium_slices": int((mine & has_myo).sum()),
        }
    return records


def patient_detection_metrics(masks: dict[str, np.ndarray], arrays, min_mm2: float) -> dict[str, float]:
    """Patient-level detection on real slices from the model's masks (:func:`predict_masks`): the
    largest scar component inside the myocardium > ``min_mm2``, the patients' AUROC of that score,
    and myocardium Dice."""
    from engine.evaluation.stats import PatientScores, confusion, metric_values

    records = patient_records(masks, arrays, min_mm2)
    scores = PatientScores.from_runs([{"seed": 0, "patients": records}])
    out = {f"val_patient_{m}": float(metric_values(scores, m)[0, 0])
           for m in ("accuracy", "balanced_accuracy", "auroc", "myocardium_dice")}
    out.update(zip(("val_tn", "val_fp", "val_fn", "val_tp"), confusion(scores)))
    return out


def downstream_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of the downstream stage."""
    from engine.models.downstream import build_downstream_model, downstream_loss_fn
    from engine.training.loop import paired_batches
    from engine.training.runner import worker_setup
    from engine.training.segmentation import scar_metrics, train_segmentation_model

    setup = worker_setup(config, DownstreamStageConfig)
    stage, val = setup.stage, setup.arrays["val"]
    if not stage.augment:
        setup.data = dataclasses.replace(setup.data, augment=False)
    net = build_downstream_model(stage.model)

    def validate() -> dict[str, float]:  # one pass over the validation slices for every metric
        net.eval()
        masks = predict_masks(net, val, setup.device)
        return {**scar_metrics(masks["scar"], val.label), **patient_detection_metrics(masks, val, stage.detection_min_mm2)}

    train = setup.arrays["train"]
    positive, synthetic = np.asarray(train.positive, bool), np.asarray(train.synthetic, bool)

    def batches(epoch: int, rank: int, world: int) -> list[list[int]]:
        # every arm (real only, + any method) the same real draws and steps; synthetic samples added
        return paired_batches(positive, synthetic, stage.loop.batch_size, epoch, rank, world, stage.loop.seed,
                              stage.synthetic_fraction)

    train_segmentation_model(
        config, setup, name=STAGE, net=net, loss_fn=downstream_loss_fn(stage.model), outputs="scar+myocardium",
        batch_plan=batches, select=stage.select_by,
        input_range=INPUT_RANGE, validate=validate, export_dir=Path(setup.ctx.run_dir) / stage.name,
        export_record={"n_synthetic": stage.n_synthetic, "synthetic": config["synthetic"],
                       "synthetic_min_dice": stage.synthetic_min_dice,
                       "detection_min_mm2": stage.detection_min_mm2,
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
