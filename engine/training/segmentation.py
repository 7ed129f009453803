"""What the two segmentation stages (reward model, downstream model) share: the training step on
(image, label) batches and validation of scar Dice, Dice-TP and the pass rate on real slices."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.evaluation.metrics import dice_per_sample, dice_tp, pass_rate


def to_model_range(image: torch.Tensor, input_range: str) -> torch.Tensor:
    """Images in [0, 1] (the data layer's range) to the model's input range ("0,1" or "-1,1")."""
    return image * 2.0 - 1.0 if input_range == "-1,1" else image


def segmentation_step(model: nn.Module, loss_fn: nn.Module, targets_fn: Callable, input_range: str, device) -> Callable:
    """``step_fn(batch)`` for :func:`engine.training.loop.train_epochs`: loss of logits vs targets."""

    def step(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = to_model_range(batch["image"].to(device), input_range)
        label = batch["label"].to(device)
        loss = loss_fn(model(image).float(), targets_fn(label))
        return {"loss": loss}

    return step


@torch.no_grad()
def scar_validation(model: nn.Module, image: np.ndarray, label: np.ndarray, input_range: str, device,
                    threshold: float = 0.6, batch_size: int = 32) -> dict[str, float]:
    """Scar metrics of a segmentation model on real slices (numpy ``image [N,1,S,S]`` in [0, 1],
    ``label [N,S,S]``): mean Dice over positive slices, Dice-TP, the pass rate at ``threshold`` on
    positives (the paper's reference: real positives pass at 35.6%), and the share of negative slices
    with any predicted scar (false-positive slices)."""
    model.eval()
    preds = []
    for start in range(0, len(image), batch_size):
        # a copy: the arrays may be read-only views of Ray's object store (torch warns on those)
        x = to_model_range(torch.tensor(image[start:start + batch_size], device=device), input_range)
        preds.append((torch.sigmoid(model(x)[:, :1].float()) > 0.5)[:, 0].cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros(label.shape, bool)
    return scar_metrics(pred, label, threshold)


def scar_metrics(pred: np.ndarray, label: np.ndarray, threshold: float = 0.6) -> dict[str, float]:
    """:func:`scar_validation`'s metrics from predicted scar masks ``pred`` bool [N,S,S] (for a caller
    that has predicted the slices already)."""
    truth = label >= 3
    positive = truth.reshape(len(truth), -1).any(1)
    out: dict[str, float] = {"val_slices": float(len(label)), "val_positive_slices": float(positive.sum())}
    if positive.any():
        dice = dice_per_sample(pred[positive], truth[positive])
        out["val_scar_dice"] = float(dice.mean())
        out["val_scar_dice_tp"] = float(dice_tp(pred[positive], truth[positive]))
        out["val_pass_rate"] = float(pass_rate(dice, threshold))
    if (~positive).any():
        out["val_negative_fp_rate"] = float(pred[~positive].reshape((~positive).sum(), -1).any(1).mean())
    return out


class BestSoFar(nn.Module):
    """A copy of a model's weights at its best validation score so far, checkpointed with the run
    (the score and epoch are buffers, so a resumed run keeps comparing against them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        import copy

        self.model = copy.deepcopy(model).requires_grad_(False)
        self.register_buffer("score", torch.tensor(float("-inf"), dtype=torch.float64))
        self.register_buffer("epoch", torch.tensor(0, dtype=torch.int64))  # 1-based; 0: none yet
        self.register_buffer("validations", torch.tensor(0, dtype=torch.int64))

    def offer(self, model: nn.Module, score: float) -> bool:
        """One epoch's validation: keep ``model``'s weights when ``score`` is at least the best so far
        (a tie: the later epoch)."""
        self.validations += 1
        if not np.isfinite(score) or score < float(self.score):
            return False
        self.model.load_state_dict(model.state_dict())
        self.score.fill_(score)
        self.epoch.copy_(self.validations)
        return True


def train_segmentation_model(config: dict[str, Any], setup, *, name: str, net: nn.Module, loss_fn: nn.Module,
                             outputs: str, input_range: str, validate: Callable[[], dict[str, float]],
                             export_dir, export_record: dict[str, Any], batch_plan: Callable | None = None,
                             select: str = "") -> None:
    """The worker body both segmentation stages share: prepare the model (DDP), train it on the
    ``train`` slices (class-balanced when ``loop.balanced``) with ``validate`` each epoch, and on
    rank 0 export it as ``<export_dir>/<name>.safetensors`` + ``.json``.

    Args:
        config: the train loop config the worker received (its stage and data sections are stored
            in every checkpoint).
        setup: :func:`engine.training.runner.worker_setup` of the stage.
        outputs: target channels, as :func:`engine.models.reward.targets_from_label`.
        batch_plan: the batches of each epoch (see :func:`engine.training.loop.train_epochs`),
            instead of the class-balanced draws over all training slices.
        select: a validation metric (a key ``validate`` returns, higher is better): the model
            exported is the one of the epoch that scored best on it (:class:`BestSoFar`), not the
            last; its export record names the metric, value and epoch. Empty: the last.
    """
    from engine.models.reward import targets_from_label
    from engine.training.checkpoint import export_model
    from engine.training.data import positive_weighted_sampler_weights
    from engine.training.datasets import SegmentationDataset, collate
    from engine.training.distributed import prepare
    from engine.training.loop import train_epochs

    stage, train = setup.stage, setup.arrays["train"]
    model = prepare(net)
    models = {name: model}
    best = None
    if select:
        best = models["best"] = BestSoFar(net)
        plain_validate = validate

        def validate() -> dict[str, float]:  # on rank 0, once an epoch
            metrics = plain_validate()
            if select not in metrics:
                raise KeyError(f"{name}: the selection metric {select!r} is not among the validation metrics "
                               f"{sorted(metrics)}")
            best.offer(net, float(metrics[select]))
            return {**metrics, f"best_{select}": float(best.score), "best_epoch": int(best.epoch)}

    train_epochs(
        ctx=setup.ctx, loop=stage.loop, models=models, parameters=list(model.parameters()),
        dataset=SegmentationDataset(train, setup.data, train=True, seed=stage.loop.seed),
        step_fn=segmentation_step(model, loss_fn, lambda label: targets_from_label(label, outputs), input_range,
                                  setup.device),
        validate_fn=validate, collate_fn=collate,
        sample_weights=positive_weighted_sampler_weights(train) if stage.loop.balanced and batch_plan is None else None,
        batch_plan=batch_plan,
        config={"stage": config["stage"], "data": config["data"]},
    )
    if setup.rank == 0:
        record = {**export_record, "model": stage.model.to_dict(), "input_range": input_range,
                  "crop_size": setup.data.crop_size}
        if best is not None and np.isfinite(float(best.score)):
            net.load_state_dict(best.model.state_dict())
            record["selected"] = {"metric": select, "value": float(best.score), "epoch": int(best.epoch)}
        export_model(export_dir, name, net, record)
