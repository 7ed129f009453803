"""The two halves every training stage shares: launching a stage's worker on Ray Train from the
driver (:func:`launch`), and unpacking what the worker receives (:func:`worker_setup`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping


@dataclass
class WorkerSetup:
    """What a stage's Ray Train worker starts from.

    Attributes:
        ctx: run name, run_dir and RayTrainConfig.
        stage: the stage's config dataclass.
        data: the data layer's config.
        arrays: the stage's arrays, fetched from the object store by name (``train``, ``val``, ...).
        rank, device: this worker's rank and torch device.
    """

    ctx: Any
    stage: Any
    data: Any
    arrays: dict[str, Any]
    rank: int
    device: Any


def worker_setup(config: Mapping[str, Any], stage_cls: type, loop: str = "loop") -> WorkerSetup:
    """Rebuild the configs, fetch the object-store arrays, seed torch with the seed of the stage's
    training loop named ``loop`` (the generator has two: "base" and "controlnet")."""
    import ray
    import torch

    from engine.config import from_dict
    from engine.training.data import SliceDataConfig
    from engine.training.distributed import run_context, worker_context

    stage = from_dict(stage_cls, config["stage"])
    arrays = {name: ray.get(ref) for name, ref in config["arrays"].items()}
    rank, _, device = worker_context()
    torch.manual_seed(getattr(stage, loop).seed)
    return WorkerSetup(run_context(config), stage, from_dict(SliceDataConfig, config["data"]), arrays, rank, device)


def finished_metrics(run_dir: str, name: str, ray_cfg, loop, config: Mapping[str, Any], export: Path,
                     ignore_changes: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The final metrics of run ``name`` when it already finished under ``config`` (its latest
    checkpoint is at the last epoch or step of ``loop``, written under the same config, and the
    model was exported to ``export`` after it); None when there is anything left to do."""
    import os

    from engine.training.checkpoint import read_checkpoint_state
    from engine.training.distributed import check_resumable, latest_checkpoint_path

    checkpoint = latest_checkpoint_path(run_dir, name, ray_cfg)
    if checkpoint is None or "://" in checkpoint or not export.is_file():
        return None
    state = read_checkpoint_state(checkpoint)
    done = int(state.get("epoch", 0)) >= loop.epochs or bool(loop.max_steps and int(state.get("step", 0)) >= loop.max_steps)
    if not done or export.stat().st_mtime < os.path.getmtime(checkpoint):
        return None
    try:
        check_resumable(checkpoint, config, name, ignore_changes)
    except ValueError:
        return None  # fit() explains it (or continues it, with ray.allow_config_change)
    return dict(state.get("metrics", {}))


def launch(cfg, stage_cfg, worker: Callable[[dict], None], *, name: str, arrays: Mapping[str, Any],
           extra: Mapping[str, Any] | None = None, ignore_changes: tuple[str, ...] = (),
           export: Path | None = None, loop=None) -> dict[str, Any]:
    """Put ``arrays`` in the object store and run ``worker`` on Ray Train (``stage_cfg.ray``) as run
    ``name`` of ``cfg.run_dir``; the final metrics (rank 0's, of the last checkpointed report).
    ``ignore_changes``: config keys the run does not depend on (see ``distributed.fit``).

    With ``export`` (the model file the worker writes at the end), a run that already finished
    under the same config (see :func:`finished_metrics`, ``loop`` defaulting to ``stage_cfg.loop``)
    is not started again: its final metrics are returned as they were.
    """
    import ray

    from engine.config import to_dict
    from engine.training.distributed import connect, fit

    loop_config = {"stage": to_dict(stage_cfg), "data": to_dict(cfg.data), **(extra or {})}
    if export is not None:
        done = finished_metrics(cfg.run_dir, name, stage_cfg.ray, loop or stage_cfg.loop, loop_config, export,
                                ignore_changes)
        if done is not None:
            print(f"{name}: finished earlier under the same config ({export}); not trained again")
            return done
    connect(stage_cfg.ray.address)
    loop_config["arrays"] = {key: ray.put(value) for key, value in arrays.items()}
    result = fit(worker, loop_config, name=name, run_dir=cfg.run_dir, cfg=stage_cfg.ray, ignore_changes=ignore_changes)
    return dict(result.metrics or {})
