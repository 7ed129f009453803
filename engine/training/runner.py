"""The two halves every training stage shares: launching a stage's worker on Ray Train from the
driver (:func:`launch`), and unpacking what the worker receives (:func:`worker_setup`)."""

from __future__ import annotations

from dataclasses import dataclass
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


def launch(cfg, stage_cfg, worker: Callable[[dict], None], *, name: str, arrays: Mapping[str, Any],
           extra: Mapping[str, Any] | None = None, ignore_changes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Put ``arrays`` in the object store and run ``worker`` on Ray Train (``stage_cfg.ray``) as run
    ``name`` of ``cfg.run_dir``; the final metrics (rank 0's, of the last checkpointed report).
    ``ignore_changes``: config keys the run does not depend on (see ``distributed.fit``)."""
    import ray

    from engine.config import to_dict
    from engine.training.distributed import connect, fit

    connect(stage_cfg.ray.address)
    loop_config = {"stage": to_dict(stage_cfg), "data": to_dict(cfg.data),
                   "arrays": {key: ray.put(value) for key, value in arrays.items()}, **(extra or {})}
    result = fit(worker, loop_config, name=name, run_dir=cfg.run_dir, cfg=stage_cfg.ray, ignore_changes=ignore_changes)
    return dict(result.metrics or {})
