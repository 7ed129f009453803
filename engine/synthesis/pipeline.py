"""The synthesis stage's driver: plan, store, and the streaming Ray Data pipeline.

::

    shard ids (only those not yet complete in the store)
      -> prepare_shards   (tasks: scar masks, edge maps, captions)
      -> DiffusionActor   (actor pool, generator loaded once per actor; or another method's actor,
                           engine.synthesis.methods: the model-free paste control, the SPADE and
                           ControlNet baselines)
      -> FilterActor      (actor pool, frozen reward model: Dice, passed, label)
      -> ZarrShardDatasink (write tasks: each shard written whole, then marked complete)

Exactly once: the plan (sample ids, shards) is a pure function of the cohort, the split, the
sampler and the seed; the store records the plan's fingerprint, and a shard is complete only once
all its arrays are stored. A re-run, after any crash, makes exactly the shards still missing; a
re-run of a complete store makes nothing. A retried task (a killed actor or node) rewrites its own
shard whole. A store written under another plan, config or checkpoint is refused, not mixed. A
pipeline in which no shard completes for ``synthesis.stall_timeout_s`` (Ray Data can wait forever
after a lost node or a hung actor) is stopped and started again on the shards still missing, with
twice the time for a shard at each restart. Every
``synthesis.progress_interval_s`` the driver logs the shards complete, the rate and the time left.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.config import config_changes
from engine.synthesis import SynthesisIncomplete
from engine.synthesis.config import SynthesisConfig
from engine.synthesis.controlnet_baseline import controlnet_record
from engine.synthesis.methods import CONTROLNET_METHODS, SPADE_METHODS
from engine.synthesis.spade import spade_record
from engine.synthesis.store import (
    ATTRS_KEY,
    FORMAT_VERSION,
    ShardWriter,
    completed_shards,
    create_store,
    creation_interrupted,
    open_store,
    read_arrays,
    shared_filesystem,
    store_attrs,
    store_exists,
    update_attrs,
)

# Settings that change what the store holds; the others (actors, batch sizes, addresses) do not.
CONTENT_KEYS = ("split", "candidates_per_slice", "seed", "max_candidates", "shard_size",
                "num_inference_steps", "threshold", "keep_rejected")


def _engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lgesynth")
    except PackageNotFoundError:
        return "unknown"


def checkpoint_hashes(folders: dict[str, Path]) -> dict[str, str]:
    """sha256 of each exported model (from its json record, which :func:`load_model_weights` verifies)."""
    out = {}
    for name, folder in folders.items():
        record = Path(folder) / f"{name}.json"
        if not record.is_file():
            raise ValueError(f"{record}: missing; train the {name} model first (or point the config at it)")
        out[name] = json.loads(record.read_text())["sha256"]
    return out


def _fingerprint(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def check_pools_fit(syn: SynthesisConfig) -> None:
    """Raise ValueError unless the live cluster can hold both actor pools plus one preparation and one
    write task (Ray Data would otherwise wait forever for resources that never come)."""
    import ray

    need_cpu = (syn.diffusion.actors * syn.diffusion.num_cpus + syn.filter.actors * syn.filter.num_cpus
                + 2 * syn.prepare_cpus)
    need_gpu = syn.diffusion.actors * syn.diffusion.num_gpus + syn.filter.actors * syn.filter.num_gpus
    have = ray.cluster_resources()
    for pool, cfg in (("diffusion", syn.diffusion), ("filter", syn.filter)):
        for name, amount in cfg.resources.items():
            if cfg.actors * amount > have.get(name, 0.0) + 1e-9:
                raise ValueError(
                    f"synthesis.{pool}.resources asks {cfg.actors} x {amount:g} of {name!r}; the cluster has "
                    f"{have.get(name, 0.0):g}" + ("" if name in have else " (no node offers it)") +
                    ": check the resource's name against the nodes' (`ray status`), or lower the amount")
    if need_cpu > have.get("CPU", 0.0) + 1e-9 or need_gpu > have.get("GPU", 0.0) + 1e-9:
        raise ValueError(
            f"the synthesis pools need {need_cpu:g} CPU and {need_gpu:g} GPU (diffusion {syn.diffusion.actors} x "
            f"{syn.diffusion.num_cpus:g} CPU/{syn.diffusion.num_gpus:g} GPU, filter {syn.filter.actors} x "
            f"{syn.filter.num_cpus:g} CPU/{syn.filter.num_gpus:g} GPU, preparation and writing 2 x {syn.prepare_cpus:g} CPU); "
            f"the cluster has {have.get('CPU', 0.0):g} CPU and {have.get('GPU', 0.0):g} GPU: lower synthesis.*.actors or "
            "synthesis.*.num_cpus")


class _Stalled(BaseException):
    """Raised into the driver's thread by :func:`_watch_shards`: a BaseException, like a Ctrl-C, so
    that no ``except Exception`` of Ray Data's on the way takes it for an error of its own."""


def _duration(seconds: float) -> str:
    """``seconds`` as a person reads a time left: 45s, 3m05s, 2h07m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Progress:
    """The run's progress line from the store's complete shards: shards and candidates complete
    (those of earlier runs included), this run's candidates/s and the time left at that rate.

    Args:
        rows: candidates of each shard of the store.
        done: the shards complete when this run started.
        clock: seconds of a monotonic clock.
    """

    def __init__(self, rows: np.ndarray, done: np.ndarray, clock: Callable[[], float] = time.monotonic):
        self.rows, self.start_rows, self.clock = rows, int(rows[done].sum()), clock
        self.start = clock()

    def line(self, done: np.ndarray) -> str:
        rows, total = int(self.rows[done].sum()), int(self.rows.sum())
        made, elapsed = rows - self.start_rows, self.clock() - self.start
        rate = made / elapsed if elapsed > 0 else 0.0
        left = f", about {_duration((total - rows) / rate)} left" if rate > 0 and rows < total else ""
        return (f"synthesis: {int(done.sum())} of {done.size} shards complete ({rows} of {total} candidates, "
                f"{rows / max(total, 1):.0%}); this run {made} in {_duration(elapsed)} "
                f"({rate:.2f} candidates/s){left}")


@contextlib.contextmanager
def _watch_shards(url: str, storage_options: dict | None, timeout_s: float, progress: _Progress | None = None,
                  progress_s: float = 0.0, log: Callable[[str], None] = print):
    """While the block runs, a thread counts the complete shards of ``url``: every ``progress_s``
    seconds (0: never) it logs ``progress``'s line, and once no shard has completed for
    ``timeout_s`` seconds (0: never) it raises :class:`_Stalled` in this thread (the exception
    reaches the Ray Data loop this thread waits in: it polls every 10 ms)."""
    stall = timeout_s > 0
    report = progress is not None and progress_s > 0
    if not (stall or report):
        yield
        return
    poll = min(30.0, max(0.5, timeout_s / 10)) if stall else float("inf")
    target, stop, lock = threading.get_ident(), threading.Event(), threading.Lock()
    state = {"fired": False}

    def watch() -> None:
        last, since = -1, time.monotonic()
        logged = since
        while not stop.wait(min(poll, max(0.05, logged + progress_s - time.monotonic()) if report else poll)):
            try:
                done = completed_shards(open_store(url, "r", storage_options))
            except Exception:  # noqa: BLE001 - an unreadable moment of the store is no progress
                done = None
            count = last if done is None else int(done.sum())
            now = time.monotonic()
            if report and done is not None and now - logged >= progress_s - 1e-3:
                logged = now
                log(progress.line(done))
            if count != last:
                last, since = count, now
            elif stall and now - since >= timeout_s:
                with lock:
                    if not stop.is_set():
                        state["fired"] = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(_Stalled))
                return

    watcher = threading.Thread(target=watch, name="shard-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        with lock:
            stop.set()
            if state["fired"]:  # not raised yet (the run ended meanwhile): take it back
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
        watcher.join()


class SynthesisJob:
    """Everything the driver decides before any candidate is made: plan, store, models.

    Args:
        cfg: the run's :class:`engine.settings.EngineConfig`.
    """

    def __init__(self, cfg, parts: dict[str, Any] | None = None):
        from engine.config import to_dict
        from engine.models.generator import GeneratorConfig
        from engine.synthesis.actors import PlanContext
        from engine.synthesis.plan import make_plan
        from engine.training.checkpoint import read_model_config
        from engine.training.generator import generator_data_config
        from engine.training.prepare import prepare_arrays

        self.cfg, syn = cfg, cfg.synthesis
        self.syn = syn
        self.generator_folder = syn.generator_folder(cfg.run_dir)
        self.reward_folder = syn.reward_folder(cfg.run_dir)
        self.vae_folder = Path(cfg.vae.folder(cfg.run_dir)).absolute()
        if syn.method == "lgesynthnet":
            self.checkpoints = checkpoint_hashes({"reward": self.reward_folder, "vae": self.vae_folder,
                                                  "unet": self.generator_folder, "controlnet": self.generator_folder})
            record = json.loads((self.generator_folder / "controlnet.json").read_text())["config"]
            model_cfg = GeneratorConfig.from_dict(read_model_config(self.generator_folder, "controlnet")["model"])
            self.data_cfg = generator_data_config(cfg.data, model_cfg)
            if int(record.get("crop_size", cfg.data.crop_size)) != cfg.data.crop_size:
                raise ValueError(f"{self.generator_folder}: the generator was trained on {record['crop_size']} px crops, "
                                 f"the config asks for data.crop_size={cfg.data.crop_size}")
        elif syn.method in SPADE_METHODS:  # the inpainting region as the SPADE model was trained with
            self.spade_folder = syn.spade_folder(cfg.run_dir)
            self.spade_record = spade_record(self.spade_folder, syn.method, cfg.data.crop_size)
            self.checkpoints = checkpoint_hashes({"reward": self.reward_folder, "spade": self.spade_folder})
            self.data_cfg = dataclasses.replace(cfg.data, mask_dilation=int(self.spade_record["mask_dilation"]))
        elif syn.method in CONTROLNET_METHODS:  # conditions as the baseline was trained with (the generator's)
            self.controlnet_folder = syn.controlnet_folder(cfg.run_dir)
            record = controlnet_record(self.controlnet_folder, cfg.data.crop_size)
            self.checkpoints = checkpoint_hashes({"reward": self.reward_folder, "vae": self.vae_folder,
                                                  "controlnet_baseline": self.controlnet_folder})
            self.data_cfg = generator_data_config(cfg.data, GeneratorConfig.from_dict(record["model"]))
        else:  # a model-free method: only the filter's reward model; conditions as the run's data section
            self.checkpoints = checkpoint_hashes({"reward": self.reward_folder})
            self.data_cfg = cfg.data
        if parts is None:
            parts, _ = prepare_arrays(cfg)
        self.plan = make_plan(parts[syn.split], syn.candidates_per_slice, syn.seed, syn.max_candidates)
        if not len(self.plan):
            raise ValueError(f"{cfg.cohort.root}: the {syn.split} patients have no negative basal, mid or apical slice "
                             "to synthesize on")
        self.layout = self.plan.layout(syn.shard_size)
        self.url = syn.store_url(cfg.run_dir)
        self.context = PlanContext(slices=self.plan.slices, jobs=self.plan.jobs, seed=syn.seed,
                                   shard_size=syn.shard_size, sampler=cfg.scar_sampler, data=self.data_cfg,
                                   reference_angle=cfg.cohort.reference_angle)
        content = {
            "plan": self.plan.fingerprint(), "rows": self.layout.rows, "crop_size": self.layout.height,
            "synthesis": {k: getattr(syn, k) for k in CONTENT_KEYS},
            # sampler weights only when set: stores written before they existed keep their fingerprint
            "scar_sampler": {k: v for k, v in to_dict(cfg.scar_sampler).items()
                             if k not in ("segment_weights", "transmurality_weights") or v},
            "data": to_dict(self.data_cfg),
            "reference_angle": cfg.cohort.reference_angle, "checkpoints": self.checkpoints,
            "sources": self.plan.sources_fingerprint(),
        }
        if syn.method != "lgesynthnet":  # stores written before methods existed hold the generator's
            content["synthesis"]["method"] = syn.method
        if syn.method == "paste":
            content["paste"] = to_dict(syn.paste)
        if syn.method in SPADE_METHODS:
            content["spade"] = {k: self.spade_record[k] for k in ("context", "limited_margin_px")}
        if syn.method == "controlnet-template":
            content["controlnet"] = {"template_strength": cfg.controlnet_baseline.template_strength}
        self.fingerprint = _fingerprint(content)
        # a store written before the sources were fingerprinted is resumed on everything else
        self.legacy_fingerprint = _fingerprint({k: v for k, v in content.items() if k != "sources"})
        self.attrs = {
            "format": FORMAT_VERSION, "engine_version": _engine_version(), "fingerprint": self.fingerprint,
            "content": content, "seed": syn.seed, "candidates": self.layout.rows, "shard_size": syn.shard_size,
            "config": {k: v for k, v in to_dict(syn).items() if k != "storage_options"},
            "cohort": str(cfg.cohort.root), "skipped_sources": self.plan.skipped, "complete": False,
        }

    # ------------------------------------------------------------------------------------ store
    def open_or_create(self):
        """The store, created if absent or if its creation was interrupted (nothing written to it
        yet); an existing store of another plan or config is refused."""
        opts = self.syn.storage_options
        if store_exists(self.url, opts):
            group = open_store(self.url, "r+", opts)
            if not creation_interrupted(group):
                stored = store_attrs(group)
                if not stored:
                    raise ValueError(f"{self.url}: a Zarr group without lgesynth's attributes, not a synthetic store; "
                                     "write to a new synthesis.store, or delete this one to start over")
                if stored.get("fingerprint") not in (self.fingerprint, self.legacy_fingerprint):
                    changes = (config_changes(stored.get("content", {}), self.attrs["content"])
                               or [f"fingerprint {stored.get('fingerprint')} -> {self.fingerprint}"])
                    raise ValueError(
                        f"{self.url}: the store was written with another plan, config or checkpoint "
                        f"({'; '.join(changes[:6])}); write to a new synthesis.store, or delete this one to start over")
                return group
        return create_store(self.url, self.layout, self.attrs, opts, compression=self.syn.compression)

    def actor_args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from engine.config import to_dict

        syn = self.syn
        pool = {"batch_size": syn.batch_size, "num_gpus": syn.diffusion.num_gpus, "dtype": syn.diffusion.dtype,
                "torch_threads": syn.diffusion.torch_threads, "channels_last": syn.diffusion.channels_last}
        if syn.method == "paste":
            diffusion: dict[str, Any] = {"paste": to_dict(syn.paste)}
        elif syn.method in SPADE_METHODS:
            diffusion = {"spade_folder": str(self.spade_folder), "method": syn.method, **pool}
        elif syn.method in CONTROLNET_METHODS:
            diffusion = {"controlnet_folder": str(self.controlnet_folder), "vae_folder": str(self.vae_folder),
                         "method": syn.method, "num_inference_steps": syn.num_inference_steps,
                         "template_strength": self.cfg.controlnet_baseline.template_strength, **pool}
        else:
            diffusion = {"generator_folder": str(self.generator_folder), "vae_folder": str(self.vae_folder),
                         "num_inference_steps": syn.num_inference_steps, **pool}
        filt = {"reward_folder": str(self.reward_folder), "threshold": syn.threshold,
                "keep_rejected": syn.keep_rejected, "batch_size": syn.batch_size, "num_gpus": syn.filter.num_gpus,
                "dtype": syn.filter.dtype, "torch_threads": syn.filter.torch_threads,
                "channels_last": syn.filter.channels_last}
        return diffusion, filt

    # ------------------------------------------------------------------------------------ runs
    def dataset(self, todo: list[int], filtered: bool = True):
        """The lazy Ray Dataset of the pipeline over shards ``todo`` (one row per shard); without
        ``filtered``, the generated rows before the filter pool (what generation alone makes)."""
        import ray

        from engine.synthesis.actors import FilterActor, prepare_shards
        from engine.synthesis.methods import method_actor

        syn = self.syn
        diffusion_args, filter_args = self.actor_args()
        ds = ray.data.from_items([{"shard": int(i)} for i in todo], override_num_blocks=max(1, len(todo)))
        ds = ds.map_batches(prepare_shards, batch_size=1, fn_kwargs={"context": ray.put(self.context)},
                            num_cpus=syn.prepare_cpus)
        ds = ds.map_batches(method_actor(syn.method), batch_size=1, fn_constructor_kwargs=diffusion_args,
                            compute=ray.data.ActorPoolStrategy(size=syn.diffusion.actors), num_cpus=syn.diffusion.num_cpus,
                            num_gpus=syn.diffusion.num_gpus or None, resources=syn.diffusion.resources or None)
        if not filtered:
            return ds
        return ds.map_batches(FilterActor, batch_size=1, fn_constructor_kwargs=filter_args,
                              compute=ray.data.ActorPoolStrategy(size=syn.filter.actors), num_cpus=syn.filter.num_cpus,
                              num_gpus=syn.filter.num_gpus or None, resources=syn.filter.resources or None)

    def run_ray(self, todo: list[int], log: Callable[[str], None]) -> None:
        """Make shards ``todo`` with the Ray pipeline; one that stalls is started again on the rest."""
        from engine.training.distributed import connect

        connect(self.syn.address)
        check_pools_fit(self.syn)
        syn = self.syn
        progress = _Progress(self.layout.shard_sizes(), ~np.isin(np.arange(self.layout.shards), todo))
        timeout_s = syn.stall_timeout_s
        for restart in range(syn.stall_restarts + 1):
            try:
                with _watch_shards(self.url, syn.storage_options, timeout_s, progress, syn.progress_interval_s, log):
                    self._run_ray_once(todo, log)
                return
            except _Stalled:
                done = completed_shards(open_store(self.url, "r", syn.storage_options))
                todo = [i for i in todo if not done[i]]
                if not todo:
                    return
                if restart == syn.stall_restarts:
                    raise SynthesisIncomplete(
                        f"{self.url}: the Ray pipeline stalled {restart + 1} time(s), the last with no shard "
                        f"completing for {timeout_s:g} s; {len(todo)} shard(s) missing. The complete ones are kept: "
                        "re-run to make the rest (raise synthesis.stall_timeout_s if a shard takes longer)") from None
                # A restart waits twice as long: where the first window was too short for the actors'
                # start-up (a node the autoscaler adds, a slow model load), the next one is not.
                timeout_s *= 2
                log(f"synthesis: no shard completed for {timeout_s / 2:g} s: the Ray pipeline stalled; "
                    f"starting it again on the {len(todo)} shard(s) missing (restart {restart + 1} of "
                    f"{syn.stall_restarts}, waiting up to {timeout_s:g} s for a shard)")

    def _run_ray_once(self, todo: list[int], log: Callable[[str], None]) -> None:
        from engine.synthesis.actors import unpack_store_rows
        from engine.synthesis.sink import ZarrShardDatasink

        ds = self.dataset(todo)
        if shared_filesystem(self.url):
            ds.write_datasink(ZarrShardDatasink(self.url, self.syn.storage_options),
                              ray_remote_args={"num_cpus": self.syn.prepare_cpus})
            return
        log(f"{self.url}: a process-local store; the driver writes the streamed shards")
        writer = ShardWriter(open_store(self.url, "r+", self.syn.storage_options), self.layout)
        try:
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                writer.write(*unpack_store_rows({k: v[0] for k, v in batch.items()}))
        finally:
            writer.close()

    def run_sequential(self, todo: list[int], log: Callable[[str], None]) -> None:
        """The same steps in one process, shard after shard, no Ray (the benchmark's reference loop)."""
        from engine.synthesis.actors import FilterActor, prepare_shards, unpack_store_rows
        from engine.synthesis.methods import method_actor

        diffusion_args, filter_args = self.actor_args()
        diffusion, filt = method_actor(self.syn.method)(**diffusion_args), FilterActor(**filter_args)
        writer = ShardWriter(open_store(self.url, "r+", self.syn.storage_options), self.layout)
        start, every = time.perf_counter(), max(1, len(todo) // 10)
        try:
            for n, shard in enumerate(todo, 1):
                batch = filt(diffusion(prepare_shards({"shard": np.asarray([shard])}, self.context)))
                writer.write(*unpack_store_rows({k: v[0] for k, v in batch.items()}))
                if n % every == 0 or n == len(todo):
                    log(f"synthesis: {n}/{len(todo)} shards written ({time.perf_counter() - start:.1f} s)")
        finally:
            writer.close()


def summarize(group) -> dict[str, Any]:
    """Counts of a store: candidates, made, skipped, kept, pass rate, complete shards."""
    rows = read_arrays(group, ("passed", "skip_reason"))  # one chunk per shard each, many in flight
    passed = np.asarray(rows["passed"], bool)
    skip = np.asarray([bool(str(r)) for r in rows["skip_reason"]], bool)
    done = completed_shards(group)
    made = int((~skip).sum())
    return {"candidates": int(len(passed)), "made": made, "skipped": int(skip.sum()), "kept": int(passed.sum()),
            "pass_rate": float(passed.sum() / made) if made else 0.0,
            "shards": int(len(done)), "shards_complete": int(done.sum())}


def synthesize(cfg, *, sequential: bool = False, log: Callable[[str], None] = print, parts=None) -> dict[str, Any]:
    """Run the synthesis stage of ``cfg`` (``cfg.synthesis``) to completion; the summary.

    Returns:
        ``store``, ``candidates``, ``made``, ``skipped`` (no scar fits), ``kept``, ``pass_rate``,
        ``written`` (candidates made by this run), ``shards_already_complete`` (complete when this run
        opened the store: a resumed run skipped them), ``seconds``, ``candidates_per_s`` (this run).
    """
    job = SynthesisJob(cfg, parts)
    group = job.open_or_create()
    done = completed_shards(group)
    todo = [int(i) for i in np.flatnonzero(~done)]
    rows = int(job.layout.shard_sizes()[todo].sum())
    log(f"synthesis ({job.syn.method}): {job.layout.rows} candidates in {job.layout.shards} shards -> {job.url}; "
        f"{len(todo)} shard(s) ({rows} candidates) to make, {int(done.sum())} already complete; "
        f"{len(job.plan.skipped)} apex candidate(s) not planned")
    start = time.perf_counter()
    if todo:
        (job.run_sequential if sequential else job.run_ray)(todo, log)
    seconds = time.perf_counter() - start
    group = open_store(job.url, "r+", job.syn.storage_options)
    summary = summarize(group)
    if summary["shards_complete"] != summary["shards"]:
        missing = summary["shards"] - summary["shards_complete"]
        raise SynthesisIncomplete(f"{job.url}: {missing} shard(s) still incomplete after the pipeline finished; "
                                  "re-run to complete them")
    update_attrs(group, complete=True, summary=summary)
    summary.update(store=job.url, method=job.syn.method, written=rows, shards_already_complete=int(done.sum()),
                   seconds=round(seconds, 3),
                   candidates_per_s=round(rows / seconds, 3) if rows and seconds > 0 else 0.0)
    log(f"synthesis: {summary['candidates']} candidates, {summary['made']} made, {summary['kept']} kept "
        f"(pass rate {summary['pass_rate']:.1%} at Dice > {job.syn.threshold}), {summary['skipped']} without a scar; "
        f"this run wrote {rows} in {seconds:.1f} s ({summary['candidates_per_s']:.2f} candidates/s)")
    return summary


__all__ = ["ATTRS_KEY", "SynthesisIncomplete", "SynthesisJob", "summarize", "synthesize", "check_pools_fit"]
