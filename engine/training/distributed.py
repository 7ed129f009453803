"""The Ray Train harness every model's training runs through: DDP workers, checkpoints, resume.

Driver side, :func:`fit` builds a ``TorchTrainer`` (Ray Train V2) from a :class:`RayTrainConfig`:
gloo on CPU / nccl on GPU, one Ray worker per rank, ``FailureConfig(max_failures)``,
``CheckpointConfig(num_to_keep)`` and ``RunConfig(name, storage_path)`` with the storage path
absolute (default ``<run_dir>/ray``). Worker side, a train function uses :func:`worker_context`,
:func:`prepare`, :func:`autocast`, :func:`restore` and :func:`report`; ``engine.training._toy`` is the
worked example.

How resuming works (Ray 2.60, Train V2; both cases are exercised by ``tests/test_distributed.py``):

* Worker failure. When a worker process dies, the controller tears down the worker group and, while
  ``max_failures`` allows, starts a new one. Each new worker's ``ray.train.get_checkpoint()`` is the
  latest *committed* checkpoint, so :func:`restore` resumes from it. A report is committed once the
  controller has collected it from every rank; it polls the workers every 2 s
  (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), so a worker that dies within that window after a report
  loses that checkpoint and the run resumes from the one before (still correct, only older).
  :func:`wait_for_commit` blocks until this worker's reports are committed.
* In process (``num_workers: 0``). The train function runs in the calling process as rank 0 of 1:
  no controller, no worker actors, no failure recovery, none of their start-up (about 15 s a run on
  two CPU cores), which is what many short single-worker runs (the evaluation's and the sweeps'
  downstream models, each inside its own Tune trial) want. Ray Train's own local mode
  (``ScalingConfig(num_workers=0)``) does not serve here: it keeps no checkpoints, and inside a
  Tune trial Train V2 refuses its ``ray.train`` calls. So the worker-side functions below answer
  from this module's in-process session instead, and :func:`report` writes checkpoints to the same
  ``<storage_path>/<name>/`` with a manifest (``in_process_checkpoints.json``) that
  :func:`restore` and :func:`latest_checkpoint_path` read: a run resumes and is recognised as
  finished the same way in either mode. A run trained by workers may continue in process; the other
  way round is refused (Ray's workers only resume from Ray's own snapshot).
* Driver death, or a finished run continued. Every registered checkpoint is recorded in
  ``<storage_path>/<name>/checkpoint_manager_snapshot.json``. A new ``fit`` with the same ``name`` and
  ``run_dir`` (hence the same storage path) loads that snapshot when its controller starts, so the
  first attempt's ``ray.train.get_checkpoint()`` already returns the latest checkpoint: job-level
  restoration is built into Train V2 and nothing is passed by hand (``resume_from_checkpoint`` is
  deprecated and raises under V2). To start afresh, use a new ``name`` or delete that folder.

Checkpoints themselves are :mod:`engine.training.checkpoint` directories (safetensors + json, no
pickle), written by rank 0 only; every rank calls ``ray.train.report`` the same number of times,
because the call is a barrier, and Ray registers a checkpoint when any rank attaches one.

Example:
    .. code-block:: python

        from engine.training.distributed import RayTrainConfig, fit
        from engine.training._toy import toy_train_fn

        result = fit(toy_train_fn, {"epochs": 2}, name="toy", run_dir="runs/demo/toy",
                     cfg=RayTrainConfig(num_workers=2, checkpoint_every_steps=4))
        print(result.checkpoint.path, result.metrics)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from engine import failpoints
from engine.config import config_changes
from engine.training.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "RayTrainConfig",
    "RunContext",
    "InsufficientResourcesError",
    "connect",
    "fit",
    "storage_path_for",
    "latest_checkpoint_path",
    "check_cluster_resources",
    "run_context",
    "worker_context",
    "prepare",
    "autocast",
    "restore",
    "report",
    "wait_for_commit",
]

logger = logging.getLogger(__name__)

HARNESS_KEY = "_harness"  # the train_loop_config entry fit() adds: {"train", "run_dir", "name"}


class InsufficientResourcesError(RuntimeError):
    """The Ray cluster can never place the requested workers (so fit() refuses instead of hanging)."""


@dataclass
class RayTrainConfig:
    """How a model trains on Ray: workers, devices, precision, failures and checkpoints.

    Args:
        num_workers: Ray Train workers (DDP ranks); 0 trains in the calling process (no worker
            actors, no failure recovery; checkpoints on a local path; see the module docstring).
        use_gpu: one or more GPUs per worker (``gpus_per_worker``).
        cpus_per_worker: CPUs reserved per worker (fractional allowed).
        gpus_per_worker: GPUs reserved per worker; only used when ``use_gpu``.
        backend: torch.distributed backend; "auto" is nccl on GPU, gloo on CPU.
        mixed_precision: "auto" and "bf16" autocast to bfloat16 on GPU; CPU always runs fp32.
        max_failures: worker-group failures Ray recovers from (restarting from the latest
            checkpoint); -1 retries forever, 0 never.
        checkpoint_every_steps: optimizer steps between checkpoints (train functions read it).
        keep_checkpoints: most recent checkpoints kept in storage.
        address: Ray cluster address for ``ray.init``; empty: the connected cluster, else
            ``RAY_ADDRESS``/a local one (``ray.init()``'s default).
        storage_path: where Ray Train keeps checkpoints and its run snapshot; empty:
            ``<run_dir>/ray``. Made absolute (local) or kept as a URI (``s3://...``).
        check_resources: refuse to start when the cluster's nodes cannot hold the workers; turn off
            on autoscaling clusters whose nodes appear on demand.
        allow_config_change: resume a run whose checkpoints were written under another config
            (another learning rate, model, data or synthetic mix); off by default, so a re-run with a
            changed config is refused instead of silently continuing the old run. More epochs or
            steps and other Ray resources are never a change.

    Example:
        >>> RayTrainConfig(num_workers=2, cpus_per_worker=0.5).resolved_backend
        'gloo'
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    max_failures: int = 2
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 3
    address: str = ""
    storage_path: str = ""
    check_resources: bool = True
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0: in the calling process), got {self.num_workers!r}")
        if not (isinstance(self.cpus_per_worker, (int, float)) and math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if self.use_gpu and not (isinstance(self.gpus_per_worker, (int, float)) and self.gpus_per_worker > 0):
            raise ValueError(f"gpus_per_worker must be > 0 when use_gpu, got {self.gpus_per_worker!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend 'nccl' needs use_gpu=True; use 'gloo' (or 'auto') on CPU")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no', got {self.mixed_precision!r}")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"max_failures must be an int >= -1 (-1: retry forever), got {self.max_failures!r}")
        if isinstance(self.checkpoint_every_steps, bool) or not isinstance(self.checkpoint_every_steps, int) or self.checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be an int >= 1, got {self.checkpoint_every_steps!r}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be an int >= 1, got {self.keep_checkpoints!r}")

    @property
    def resolved_backend(self) -> str:
        """The torch.distributed backend: nccl on GPU, gloo on CPU, unless set explicitly."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.use_gpu else "gloo"

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """Ray resources one worker reserves."""
        resources = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            resources["GPU"] = float(self.gpus_per_worker)
        return resources


@dataclass(frozen=True)
class RunContext:
    """What a train function knows about its run (from the ``train_loop_config`` fit() built)."""

    name: str
    run_dir: str
    train: RayTrainConfig


# ----------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path


def storage_path_for(run_dir: str, cfg: RayTrainConfig) -> str:
    """The absolute storage path (or URI) Ray Train uses for a run: ``cfg.storage_path`` or ``<run_dir>/ray``."""
    path = cfg.storage_path or (run_dir.rstrip("/") + "/ray" if _is_uri(run_dir) else os.path.join(run_dir, "ray"))
    return path if _is_uri(path) else os.path.abspath(path)


IN_PROCESS_MANIFEST = "in_process_checkpoints.json"  # checkpoints of num_workers=0 runs, oldest first


def _in_process_checkpoints(experiment: str) -> list[str]:
    """Checkpoint folders the in-process runs of ``experiment`` registered, oldest first."""
    import json

    try:
        with open(os.path.join(experiment, IN_PROCESS_MANIFEST)) as f:
            names = json.load(f)["checkpoints"]
    except FileNotFoundError:
        return []
    return [os.path.join(experiment, n) for n in names]


def latest_checkpoint_path(run_dir: str, name: str, cfg: RayTrainConfig | None = None) -> str | None:
    """The checkpoint a new ``fit(name=name, run_dir=run_dir)`` would resume from, or None.

    Read through Ray's public ``Result.from_path`` from the run snapshot Train V2 restores from, and
    from the manifest of in-process (``num_workers: 0``) runs; the newer of the two when both exist.
    """
    from ray.train import Result

    experiment = storage_path_for(run_dir, cfg or RayTrainConfig()).rstrip("/") + "/" + name
    found = []
    if _is_uri(experiment) or os.path.exists(os.path.join(experiment, "checkpoint_manager_snapshot.json")):
        try:
            with warnings.catch_warnings():  # Ray 2.60 reads its snapshot with Pydantic's deprecated
                # parse_obj: one DeprecationWarning a call, about Ray's code, for every poll of a run
                warnings.filterwarnings("ignore", message=r"The `parse_obj` method is deprecated",
                                        category=DeprecationWarning)
                checkpoint = Result.from_path(experiment).checkpoint
        except RuntimeError:  # no experiment folder / no snapshot yet
            checkpoint = None
        if checkpoint is not None:
            found.append(checkpoint.path)
    if not _is_uri(experiment):
        found += _in_process_checkpoints(experiment)[-1:]
    if len(found) > 1:  # both modes trained this run: the one written last
        found.sort(key=lambda path: os.path.getmtime(path) if os.path.exists(path) else 0.0)
    return found[-1] if found else None


LOCAL_NODE_IP = "127.0.0.2"  # loopback: 127.0.0.1 is silently replaced by the machine's address


# a resumed run may train longer and on other resources; anything else is another run
RESUMABLE_CHANGES = ("*.epochs", "*.max_steps", "stage.ray.*")


def check_resumable(checkpoint: str, config: Mapping[str, Any], name: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise ValueError when the config a run's latest ``checkpoint`` was written with differs from
    ``config`` (its ``stage`` and ``data`` sections, the ones every checkpoint stores) other than in
    :data:`RESUMABLE_CHANGES` and ``ignore``."""
    import json

    from engine.training.checkpoint import read_checkpoint_config

    # only the sections both know: a train function may store keys of its own that fit() never sees
    saved = {key: value for key, value in read_checkpoint_config(checkpoint).items() if key in config}
    current = json.loads(json.dumps({key: config[key] for key in saved}, default=list))
    changes = config_changes(saved, current, RESUMABLE_CHANGES + tuple(ignore))
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise ValueError(f"run {name!r} has checkpoints ({checkpoint}) written under another config ({shown}): "
                         "resuming it would mix two runs. Use another run name or run_dir, delete the run's "
                         "checkpoints, or set ray.allow_config_change=true to continue it anyway")


# Ray kills a worker process that has been idle for 1 s (its default) whenever a node runs more
# worker processes than it has CPUs, and actors count: a synthesis node with its diffusion and filter
# actors is always over, so every per-shard preparation and write task started a fresh Python
# worker and imported the engine again (2-CPU node: 16 worker processes for 16 shards, ~30% of the
# CPU; benchmarks/RESULTS.md). A minute keeps them between shards. Set for the local instance here,
# as RAY_idle_worker_killing_time_threshold_ms on every node of a cluster (cluster/).
IDLE_WORKER_KEEP_MS = 60_000


def connect(address: str = "") -> None:
    """Connect this process to Ray: the given address, else ``RAY_ADDRESS`` (set for ``ray job submit``
    jobs), else a new single-node local instance bound to loopback only (nothing listens on a
    non-loopback address unless the user asks for it). Then releases the placement groups that dead Ray
    actors left behind (:func:`release_orphaned_placement_groups`)."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address)
        else:
            ray.init(_node_ip_address=LOCAL_NODE_IP, include_dashboard=True, dashboard_host="127.0.0.1",
                     _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS})
    release_orphaned_placement_groups()


def orphaned_placement_groups(groups: list[dict], actor_state: Callable[[str], str | None]) -> list[dict]:
    """The placement groups of ``groups`` that Ray keeps but nothing can use: not removed, not
    detached, their creator job ended and their creator actor dead (``actor_state(actor_id)``:
    "DEAD", another state, or None for an actor the GCS no longer knows). A group created by a
    driver itself (no creator actor) is left to Ray, which removes it with its job.

    Each group is a dict with the GCS's fields ``placement_group_id`` (hex), ``state``,
    ``is_detached``, ``creator_job_dead`` and ``creator_actor_id`` (hex).
    """
    orphans = []
    for group in groups:
        creator = group["creator_actor_id"]
        if (group["state"] == "REMOVED" or group["is_detached"] or not group["creator_job_dead"]
                or not creator.strip("f")):  # nil actor id: the driver made it
            continue
        if actor_state(creator) in (None, "DEAD"):
            orphans.append(group)
    return orphans


_ORPHAN_LOOKUP_FAILED: list[Exception] = []


def release_orphaned_placement_groups() -> list[str]:
    """Remove the placement groups Ray should have removed (:func:`orphaned_placement_groups`) and
    return their ids (hex).

    A Ray Train controller can create its worker group's placement group as it dies: a sweep
    stopped with Ctrl-C kills its trials, the trial's workers die first, the controller restarts its
    worker group and is killed. Ray (2.60) registers that group after the actor's death and keeps it,
    with its CPUs or GPUs, for the cluster's life; Ray Train's own PlacementGroupCleaner does not
    know it (and without the dashboard cannot tell that the controller died). The next run of the
    engine on the cluster releases it. The GCS's own tables are read (the state API would need the
    dashboard); on a Ray whose tables differ, nothing is removed and a warning says why.
    """
    import ray

    try:
        from ray._private import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = state.state._connect_and_get_accessor()
        records = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]
        groups = [{"placement_group_id": r.placement_group_id.hex(),
                   "state": gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name(r.state),
                   "is_detached": r.is_detached, "creator_job_dead": r.creator_job_dead,
                   "creator_actor_id": r.creator_actor_id.hex(),
                   "bundles": [dict(b.unit_resources) for b in r.bundles]} for r in records]

        def actor_state(actor_id: str) -> str | None:
            return state.state.actor_table(actor_id).get("State") or None

        orphans = orphaned_placement_groups(groups, actor_state)
    except Exception as err:  # noqa: BLE001 - a cleanup of Ray's leftovers must never stop a run
        if not _ORPHAN_LOOKUP_FAILED:  # said once a process: connect() calls this each time
            _ORPHAN_LOOKUP_FAILED.append(err)
            logger.warning("could not look for placement groups left by dead Ray actors: %s: %s",
                           type(err).__name__, err)
        return []
    released = []
    for group in orphans:
        pg_id = group["placement_group_id"]
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        except Exception as err:  # noqa: BLE001 - see above
            logger.warning("could not release placement group %s: %s: %s", pg_id, type(err).__name__, err)
            continue
        logger.warning("released placement group %s %s: its creator job ended and its creator actor %s is dead",
                       pg_id, group["bundles"], group["creator_actor_id"])
        released.append(pg_id)
    return released


def check_cluster_resources(cfg: RayTrainConfig) -> None:
    """Raise InsufficientResourcesError unless the alive nodes can hold ``cfg.num_workers`` workers.

    Each worker needs ``cfg.resources_per_worker`` on a single node, so both the cluster totals and
    the per-node fit are checked (two 1-CPU nodes cannot hold a 1.5-CPU worker).
    """
    import ray

    need = cfg.resources_per_worker
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = 0
    for node in nodes:
        have = node.get("Resources", {})
        fits += min(math.floor(have.get(key, 0.0) / amount + 1e-9) for key, amount in need.items())
    if fits >= cfg.num_workers:
        return
    total = ray.cluster_resources()
    wanted = ", ".join(f"{key} {amount:g}" for key, amount in need.items())
    per_node = "; ".join(
        f"{n.get('NodeManagerAddress')}: " + ", ".join(f"{k} {n['Resources'].get(k, 0):g}" for k in need) for n in nodes
    )
    raise InsufficientResourcesError(
        f"the Ray cluster cannot hold {cfg.num_workers} training workers of {{{wanted}}} each: "
        f"only {fits} fit (cluster total: " + ", ".join(f"{k} {total.get(k, 0):g}" for k in need) + f"; nodes: {per_node or 'none alive'}). "
        "Lower num_workers or cpus_per_worker/gpus_per_worker, add nodes, or set check_resources=False "
        "on an autoscaling cluster."
    )


def fit(
    train_fn: Callable[[dict], Any],
    train_loop_config: Mapping[str, Any],
    *,
    name: str,
    run_dir: str,
    cfg: RayTrainConfig,
    datasets: Mapping[str, Any] | None = None,
    ignore_changes: tuple[str, ...] = (),
):
    """Run ``train_fn`` on ``cfg.num_workers`` Ray Train workers; resume if the run has checkpoints.

    Args:
        train_fn: ``train_fn(config)``, importable on the workers (it must live in ``engine``).
        train_loop_config: the train function's config; fit adds ``config["_harness"]`` with the run
            name, run_dir and ``cfg`` (read it back with :func:`run_context`).
        name: the run's name: ``RunConfig(name)``; the same name and run_dir continue the same run.
        run_dir: the run's folder; Ray Train storage defaults to ``<run_dir>/ray``.
        cfg: workers, devices, failures, checkpoint retention.
        datasets: Ray Datasets for ``ray.train.get_dataset_shard``.
        ignore_changes: config keys (globs on dotted keys, e.g. ``"stage.controlnet.*"``) this run
            does not depend on, so a change there does not stop it from resuming.

    Returns:
        The ``ray.train.Result`` (``checkpoint``: the latest; ``metrics``: rank 0's metrics of the
        latest checkpointed report; ``path``: ``<storage_path>/<name>``).

    Raises:
        InsufficientResourcesError: the cluster's nodes cannot hold the workers.
        ray.train.TrainingFailedError: training failed more than ``cfg.max_failures`` times.
        ValueError: the run has checkpoints written under another config (see
            :func:`check_resumable`; ``cfg.allow_config_change`` lifts it).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not name or "/" in name:
        raise ValueError(f"name must be a non-empty folder name, got {name!r}")
    if HARNESS_KEY in train_loop_config:
        raise ValueError(f"train_loop_config key {HARNESS_KEY!r} is reserved for the harness")
    connect(cfg.address)
    if cfg.check_resources and cfg.num_workers:
        check_cluster_resources(cfg)
    run_dir = run_dir if _is_uri(run_dir) else os.path.abspath(run_dir)
    storage_path = storage_path_for(run_dir, cfg)
    if not cfg.num_workers and _is_uri(storage_path):
        raise ValueError(f"run {name!r}: num_workers 0 (in process) keeps its checkpoints on a local path, but the "
                         f"storage path is {storage_path}; use num_workers >= 1 or a local storage_path")
    resume = latest_checkpoint_path(run_dir, name, cfg)
    if resume and cfg.num_workers and resume in _in_process_checkpoints(os.path.dirname(resume)):
        raise ValueError(f"run {name!r} was last trained in process (num_workers 0; latest checkpoint {resume}) and "
                         "Ray Train workers cannot resume from it: continue it with num_workers 0, or use another "
                         "run name or run_dir")
    if resume and not cfg.allow_config_change:
        check_resumable(resume, train_loop_config, name, ignore_changes)
    logger.info(
        "training %s %s (storage %s): %s",
        name, f"on {cfg.num_workers} {'GPU' if cfg.use_gpu else 'CPU'} worker(s)" if cfg.num_workers else "in this process",
        storage_path, f"resuming from {resume}" if resume else "starting from scratch",
    )
    config = dict(train_loop_config)
    config[HARNESS_KEY] = {"name": name, "run_dir": run_dir, "train": dataclasses.asdict(cfg)}
    if not cfg.num_workers:
        if datasets:
            raise ValueError(f"run {name!r}: num_workers 0 (in process) takes no Ray Datasets; use num_workers >= 1")
        return _fit_in_process(train_fn, config, os.path.join(storage_path, name), resume, cfg)
    interrupted: list[int] = []

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller):
            # Ray Train's Ctrl-C handler aborts the run and the driver then ends with SystemExit(1)
            # and no word of why; noted here, so that fit raises KeyboardInterrupt instead
            super()._register_sigint_handler(controller)
            abort = signal.getsignal(signal.SIGINT)

            def note_and_abort(signum, frame):
                interrupted.append(signum)
                abort(signum, frame)

            signal.signal(signal.SIGINT, note_and_abort)

    trainer = Trainer(
        train_fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend=cfg.resolved_backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=cfg.resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=dict(datasets) if datasets else None,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = trainer.fit()
    except SystemExit:
        if interrupted:
            raise KeyboardInterrupt(f"run {name!r} aborted") from None
        raise
    finally:
        if main_thread:  # Ray Train leaves its handler in place: a later Ctrl-C would only 'abort' this run
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt(f"run {name!r} aborted")
    return result


@dataclass
class _InProcessRun:
    """The session of a ``num_workers: 0`` run: what the worker-side functions answer from."""

    experiment: str  # <storage_path>/<name>
    resume: str | None
    keep: int
    device: torch.device
    metrics: dict[str, Any] | None = None  # of the last checkpointed report, as Ray's Result keeps
    checkpoint: str | None = None


_in_process_run: _InProcessRun | None = None  # set while fit() runs a num_workers=0 run in this process


def _fit_in_process(train_fn: Callable[[dict], Any], config: dict[str, Any], experiment: str, resume: str | None,
                    cfg: RayTrainConfig):
    """Run ``train_fn(config)`` in this process as rank 0 of 1, torch on ``cfg.cpus_per_worker``
    threads as a worker's; a ``ray.train.Result`` as :func:`fit` returns it."""
    import ray.train

    global _in_process_run
    if _in_process_run is not None:
        raise RuntimeError(f"an in-process run ({_in_process_run.experiment}) is already training in this process")
    if cfg.use_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"run {os.path.basename(experiment)!r}: use_gpu is set but this process sees no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    run = _in_process_run = _InProcessRun(experiment, resume, cfg.keep_checkpoints, device)
    try:
        value = train_fn(config)
    finally:
        _in_process_run = None
        torch.set_num_threads(threads)
    checkpoint = run.checkpoint or resume
    return ray.train.Result(metrics=run.metrics, checkpoint=ray.train.Checkpoint(checkpoint) if checkpoint else None,
                            error=None, path=experiment, return_value=value)


# ----------------------------------------------------------------------------------------------
# Worker side (inside a train function)
# ----------------------------------------------------------------------------------------------


def run_context(config: Mapping[str, Any]) -> RunContext:
    """The run's name, run_dir and RayTrainConfig, from the config fit() passed to the train function."""
    try:
        harness = config[HARNESS_KEY]
    except KeyError:
        raise KeyError(f"config has no {HARNESS_KEY!r} entry: was the train function started by engine.training.distributed.fit?") from None
    return RunContext(name=harness["name"], run_dir=harness["run_dir"], train=RayTrainConfig(**harness["train"]))


def worker_context() -> tuple[int, int, torch.device]:
    """(world rank, world size, device) of this worker."""
    if _in_process_run is not None:
        return 0, 1, _in_process_run.device
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def prepare(model: nn.Module) -> nn.Module:
    """Move ``model`` to this worker's device and wrap it in DDP when there is more than one worker."""
    if _in_process_run is not None:
        return model.to(_in_process_run.device)
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def autocast(cfg: RayTrainConfig, device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on GPU (``mixed_precision`` "auto"/"bf16"); a no-op on CPU or with "no"."""
    if device is None:
        device = worker_context()[2]
    if device.type == "cuda" and cfg.mixed_precision in ("auto", "bf16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def restore(
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
) -> dict[str, Any] | None:
    """Load the run's latest checkpoint into the given objects; the saved state, or None if there is none.

    Call it on every rank after :func:`prepare` and after building the optimizers (so optimizer state
    lands on the parameters' device). ``ray.train.get_checkpoint()`` is the latest checkpoint after a
    worker restart and, through Ray's run snapshot, after a new fit() of the same run.
    """
    import ray.train

    if _in_process_run is not None:
        checkpoint = ray.train.Checkpoint(_in_process_run.resume) if _in_process_run.resume else None
    else:
        checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, models=models, optimizers=optimizers, schedulers=schedulers, strict=strict)
    if worker_context()[0] == 0:
        _progress_logger().info("restored %s (step %s, epoch %s)", checkpoint.path, state.get("step"), state.get("epoch"))
    return state


def _progress_logger() -> logging.Logger:
    """The rank-0 progress logger; Ray forwards worker stdout to the driver."""
    progress = logging.getLogger("engine.training.progress")
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False
    return progress


def _format_progress(metrics: Mapping[str, Any], checkpoint: bool) -> str:
    parts = []
    for key, fmt in (("step", "step {}"), ("epoch", "epoch {}"), ("loss", "loss {:.4g}"), ("samples_per_s", "{:.1f} samples/s")):
        if key in metrics:
            parts.append(fmt.format(metrics[key]))
    return " ".join(parts) + (" [checkpoint]" if checkpoint else "")


def report(
    metrics: Mapping[str, Any],
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    state: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    checkpoint: bool,
) -> None:
    """Report metrics from every rank; with ``checkpoint``, rank 0 also writes and attaches a checkpoint.

    Every rank must call this the same number of times (``ray.train.report`` is a barrier). Only
    rank 0's metrics are kept by Ray, so reduce them across ranks first. The checkpoint (see
    :func:`engine.training.checkpoint.save_checkpoint`) holds the models, optimizers, schedulers,
    ``state`` (plus ``state["metrics"]`` = these metrics unless given) and ``config``; it is written
    to a local temporary folder, copied to the run's storage by Ray, then removed. Rank 0 also logs a
    one-line progress message (step, epoch, loss, samples/s).
    """
    import ray.train

    metrics = {key: (value.item() if isinstance(value, torch.Tensor) else value) for key, value in metrics.items()}
    rank = worker_context()[0]
    if rank == 0:
        _progress_logger().info(_format_progress(metrics, checkpoint))
    if not checkpoint:
        if _in_process_run is None:  # in process there is no one to report to
            ray.train.report(metrics)
        return
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)  # rank 0's checkpoint dir name is broadcast to all
        return
    _report_checkpoint(metrics, models, optimizers, schedulers, state, config)
    # a test's hold (engine.failpoints), on rank 0 (the others wait for it at the next collective):
    # once the checkpoint is committed, so that it is the one an interrupted run resumes from
    failpoints.reach("train.checkpoint", before_pause=wait_for_commit, run=_run_name(), step=metrics.get("step"))


def _run_name() -> str:
    if _in_process_run is not None:
        return os.path.basename(_in_process_run.experiment)
    import ray.train

    return ray.train.get_context().get_experiment_name()


def _report_checkpoint(metrics, models, optimizers, schedulers, state, config) -> None:
    """Rank 0's checkpointed report (see :func:`report`)."""
    import ray.train

    saved_state = dict(state)
    saved_state.setdefault("metrics", metrics)
    step = saved_state.get("step")
    dir_name = f"checkpoint_step{step:08d}_{uuid.uuid4().hex[:6]}" if isinstance(step, int) else None
    if _in_process_run is not None:
        _in_process_run.checkpoint = _save_in_process(
            _in_process_run, dir_name or f"checkpoint_{uuid.uuid4().hex[:12]}", models=models, optimizers=optimizers,
            schedulers=schedulers, state=saved_state, config=config)
        _in_process_run.metrics = metrics
        return
    with tempfile.TemporaryDirectory(prefix="lgesynth-ckpt-") as tmp:
        directory = save_checkpoint(
            os.path.join(tmp, "checkpoint"), models=models, optimizers=optimizers, schedulers=schedulers,
            state=saved_state, config=config,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)), checkpoint_dir_name=dir_name)


def _save_in_process(run: _InProcessRun, dir_name: str, **contents: Any) -> str:
    """Write a checkpoint of an in-process run into its experiment folder and register it in the
    manifest (the folder complete first, the manifest replaced atomically, then the oldest beyond
    ``keep`` removed), so a crash leaves either the old or the new latest checkpoint."""
    import json
    import shutil

    os.makedirs(run.experiment, exist_ok=True)
    path = os.path.join(run.experiment, dir_name)
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_checkpoint(partial, **contents)
    os.replace(partial, path)
    names = [os.path.basename(p) for p in _in_process_checkpoints(run.experiment) if os.path.basename(p) != dir_name]
    names.append(dir_name)
    manifest = os.path.join(run.experiment, IN_PROCESS_MANIFEST)
    with open(manifest + ".partial", "w") as f:
        json.dump({"checkpoints": names[-run.keep:]}, f)
    os.replace(manifest + ".partial", manifest)
    for old in names[:-run.keep]:
        shutil.rmtree(os.path.join(run.experiment, old), ignore_errors=True)
    return path


def wait_for_commit(timeout_s: float | None = 60.0) -> None:
    """Block until every report this worker made is committed by the controller (checkpoint registered)."""
    if _in_process_run is not None:
        return  # in process, a report is stored when report() returns
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s)
