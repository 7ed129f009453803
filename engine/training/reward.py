"""Stage: train the scar-segmentation reward model on real slices (DOMAIN.md section 4).

Trained on the train patients' positive and negative slices, validated on the val patients'
slices (scar Dice on positives, Dice-TP, pass rate at the filter threshold); exported to
``<run_dir>/reward/reward.safetensors`` + ``reward.json``, where the generator stage (reward loss)
and the synthesis filter read it, frozen. Its input range is [-1, 1], the generator's output range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models.reward import RewardModelConfig
from engine.training.distributed import RayTrainConfig
from engine.training.loop import TrainLoopConfig, require_epochs

STAGE = "reward"
INPUT_RANGE = "-1,1"


@dataclass
class RewardStageConfig:
    """Args:
        model: the reward network.
        loop: epochs, batch size, optimizer.
        ray: workers and resources.
        pass_threshold: Dice above which a sample passes the quality filter (paper: 0.6).
    """

    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    loop: TrainLoopConfig = field(default_factory=lambda: TrainLoopConfig(epochs=20, batch_size=16, lr=1e-3, balanced=True))
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    pass_threshold: float = 0.6

    def __post_init__(self) -> None:
        require_epochs(self.loop, "loop")
        if not 0.0 <= self.pass_threshold < 1.0:
            raise ValueError(f"pass_threshold must be in [0, 1), got {self.pass_threshold}")


def reward_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: builds the model from the object-store arrays, trains, exports."""
    from engine.models.reward import build_reward_model, reward_loss_fn
    from engine.training.runner import worker_setup
    from engine.training.segmentation import scar_validation, train_segmentation_model

    setup = worker_setup(config, RewardStageConfig)
    stage, val = setup.stage, setup.arrays["val"]
    net = build_reward_model(stage.model)
    train_segmentation_model(
        config, setup, name=STAGE, net=net, loss_fn=reward_loss_fn(stage.model), outputs=stage.model.outputs,
        input_range=INPUT_RANGE, export_dir=Path(setup.ctx.run_dir) / STAGE,
        validate=lambda: scar_validation(net, val.image, val.label, INPUT_RANGE, setup.device, stage.pass_threshold),
        export_record={"pass_threshold": stage.pass_threshold},
    )


def train_reward(cfg) -> dict[str, Any]:
    """Driver: prepare the cohort arrays, run :func:`reward_worker` on Ray Train, return the final metrics."""
    from engine.training.prepare import prepare_arrays
    from engine.training.runner import launch

    parts, _ = prepare_arrays(cfg)
    return launch(cfg, cfg.reward, reward_worker, name=STAGE, arrays={"train": parts["train"], "val": parts["val"]},
                  export=Path(cfg.run_dir) / STAGE / f"{STAGE}.json")
