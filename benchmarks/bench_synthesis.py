"""Synthesis throughput, overheads and memory on a phantom cohort with untrained models (CPU).

Model sizes come from ``--config`` (configs/phantom.yaml: 96 px crops, packaged MiniLM captions);
weights are random (``engine.models.untrained``): throughput does not depend on what they learned.
Every pipeline run writes a fresh store. Figures (``--only`` picks some):

1. Ray Data pipeline (2 diffusion actors x 1 torch thread, 1 filter actor x 1 thread) vs the
   sequential loop over the same models in one process, on one core (1 torch thread: the loop the
   goal's "1.8x on two cores" measures against) and with torch's default threads (both cores, by
   intra-op parallelism), candidates/s of the same ``--candidates``: the whole run (with and
   without Ray start-up) and the steady state (shard completion times from the store, after the
   first shard of every diffusion actor). Beside it: two one-core loops at once (the two cores'
   ceiling for this work), the CPU time of every process by role, and the CPU seconds a shard
   costs the diffusion actors against a loop's whole shard (slower actors or fewer cores).
2. One diffusion actor's ``generate`` vs diffusers' stock ``StableDiffusionControlNetInpaintPipeline``
   on the same UNet, ControlNet, VAE, scheduler, caption states, batch and steps (1 torch thread
   each, the actor's setting; warmed up; median of ``--repeats``): the pipeline as diffusers ships
   it (the weights in torch's default layout), and the pipeline on the actor's own modules (its
   channels-last layout, ``synthesis.diffusion.channels_last``).
3. End-to-end pipeline vs the same pipeline with the filter pool and the Zarr writer replaced by a
   sink that drops the generated rows: the ratio is what filtering and writing add to generation,
   over the whole run and in the steady state (as figure 1).
4. Peak RSS (VmHWM) by process role (driver, diffusion actor, filter actor, task workers of the
   preparation and write tasks, Ray's own actors and agents) for N and 10N candidates, each run in a
   fresh process with its own Ray instance (``--rss-steps`` sampler steps to keep 10N short).
5. Zarr write throughput (``create_store`` + ``ShardWriter``) vs a raw fsspec ``pipe`` of the same
   encoded objects, shard by shard (its objects, then its marker), to a local folder and to S3 (moto
   server on 127.0.0.2); and vs the same pipe plus plain numcodecs encoding of the same chunks (the
   writer encodes, the first raw writer does not). The writers take turns within each repeat (the
   store first, then last), each after an ``os.sync``; the ratios are medians of each repeat's own.
   Written twice: ``--store-shards`` shards of the config's size (16 candidates) and
   ``--store-large-shards`` of configs/paper.yaml's 256 (objects 16x larger: a fixed cost an object
   weighs 16x less).

Usage: python benchmarks/bench_synthesis.py [--candidates 128] [--steps 10] [--repeats 5] [--only 1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

POOLS = [  # fit a 2-CPU local Ray instance: 2 x 0.5 + 0.5 + 2 x 0.25 (preparation and write tasks)
    "synthesis.diffusion.actors=2", "synthesis.diffusion.num_cpus=0.5", "synthesis.diffusion.torch_threads=1",
    "synthesis.filter.actors=1", "synthesis.filter.num_cpus=0.5", "synthesis.filter.torch_threads=1",
    "synthesis.prepare_cpus=0.25",
]
SEQUENTIAL = ["synthesis.diffusion.torch_threads=0", "synthesis.filter.torch_threads=0"]  # 0: torch's default
S3_IP = "127.0.0.2"
SAME_MODULES = "stock on the actor's modules"  # figure 2's second diffusers pipeline


def quiet(_: str) -> None:
    """A ``log`` for :func:`synthesize` that prints nothing (the benchmark prints its own lines)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="1,2,3,4,5", help="figures to measure, comma-separated (default all)")
    parser.add_argument("--candidates", type=int, default=128, help="candidates per pipeline run of figures 1 and 3")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of figures 1-3 (demo: 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of figures 2 and 5 (median)")
    parser.add_argument("--rss-candidates", type=int, default=32, help="N of figure 4 (also runs 10N)")
    parser.add_argument("--rss-steps", type=int, default=2, help="sampler steps of figure 4 (short 10N runs)")
    parser.add_argument("--store-shards", type=int, default=32, help="shards written per store in figure 5")
    parser.add_argument("--store-large-shards", type=int, default=8,
                        help="figure 5 also writes this many shards of configs/paper.yaml's 256 candidates (0: not)")
    parser.add_argument("--compression", default="fast,small",
                        help="store compressions of figure 5 (synthesis.compression), comma-separated")
    parser.add_argument("--patients", type=int, default=24, help="phantom patients (192 px)")
    parser.add_argument("--candidates-per-slice", type=int, default=8, help="draws per negative slice")
    parser.add_argument("--config", default="configs/phantom.yaml", help="model sizes and synthesis settings")
    parser.add_argument("--out", default="", help="folder for cohort, models and stores (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of every run (e.g. synthesis.shard_size=32); repeatable")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit of every Ray step")
    parser.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)  # figure 4's child runs
    parser.add_argument("--loop-child", default="", help=argparse.SUPPRESS)  # figure 1's concurrent loops
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise TimeoutError in the main thread when the block runs past ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"{what}: still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def connect_ray(timeout_s: float) -> float:
    """Start (or join) Ray as the engine does; seconds it took. Refuses to join a `ray start` cluster
    left on this machine (ray.init would attach to it instead of starting a local instance)."""
    import ray

    from engine.training.distributed import connect

    if ray.is_initialized():
        return 0.0
    if not os.environ.get("RAY_ADDRESS") and Path(tempfile.gettempdir(), "ray", "ray_current_cluster").exists():
        raise RuntimeError("a cluster started with `ray start` is live on this machine; ray.init would join it: "
                           "stop it (or set RAY_ADDRESS deliberately) before benchmarking")
    start = time.perf_counter()
    with deadline(timeout_s, "Ray start-up"):
        connect()
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one plan and one summary line per run otherwise
    return time.perf_counter() - start


def disconnect_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def prepare_base(base: Path, args) -> None:
    """Phantom cohort (reused when present) and freshly exported untrained models under ``base``."""
    from engine.models.untrained import export_untrained
    from engine.phantom import write_phantom_cohort
    from engine.phantom.config import PhantomConfig

    if not (base / "cohort").is_dir():
        write_phantom_cohort(base / "cohort", args.patients, seed=0, cfg=PhantomConfig(image_size=192))
    export_untrained(run_config(base, base / "models", args), base / "models")  # always: models follow the code


def run_config(base: Path, run_dir: Path, args, extra=()):
    """The run config of ``run_dir``, emptied first: every run writes a fresh store."""
    from engine.config import load_config
    from engine.settings import EngineConfig

    shutil.rmtree(run_dir, ignore_errors=True)
    models = base / "models"
    return load_config(EngineConfig, args.config, [
        f"cohort.root={base / 'cohort'}", f"run_dir={run_dir}", f"vae.pretrained={models / 'vae'}",
        f"synthesis.generator={models / 'generator'}", f"synthesis.reward={models / 'reward'}",
        f"synthesis.candidates_per_slice={args.candidates_per_slice}", *POOLS, *args.set, *extra,
    ])


def load_parts(base: Path, args, need: int):
    """The split's slice arrays (read once; every run then plans from them), checked to hold ``need``
    candidates."""
    from engine.synthesis.plan import make_plan
    from engine.training.prepare import prepare_arrays

    cfg = run_config(base, base / "split", args)
    parts, _ = prepare_arrays(cfg)
    plan = len(make_plan(parts[cfg.synthesis.split], cfg.synthesis.candidates_per_slice, cfg.synthesis.seed))
    if plan < need:
        raise SystemExit(f"the phantom plan holds {plan} candidates, the benchmark needs {need}: "
                         "raise --patients or --candidates-per-slice")
    return parts


def ratio_line(name: str, value: str, goal: str, ratio: float) -> str:
    return f"{name}: {value} (goal {goal}, ratio {ratio:.2f}x)"


def add(lines: list, figure: int, line: str) -> None:
    lines.append((figure, line))


# ------------------------------------------------------------------------------- figures 1 and 3
def completion_times(store: str) -> list[float]:
    """When each shard of a local store was marked complete (its ``shard_complete`` object's
    mtime), in order: the store's own clock of a run, the same for the sequential loop and the
    pipeline's write tasks."""
    import zarr

    from engine.synthesis.store import MARKER

    flags = zarr.open_array(str(Path(store, MARKER)), mode="r")  # its objects' keys, whatever their encoding
    paths = (Path(store, MARKER, flags.metadata.encode_chunk_key((i,))) for i in range(flags.shape[0]))
    return sorted(p.stat().st_mtime for p in paths if p.exists())


def steady_rate(times: list[float], shard_size: int, warm: int) -> float:
    """Candidates/s from the ``warm``-th shard completion to the last: throughput once every
    worker is loaded and busy (``warm`` = shards in flight at once: the diffusion actors; 1 for the
    sequential loop), start-up excluded. A job of millions of candidates runs at this rate."""
    if len(times) <= warm:
        raise SystemExit(f"steady state needs more than {warm} shards; raise --candidates")
    return (len(times) - warm) * shard_size / (times[-1] - times[warm - 1])


def figure_pipeline_vs_sequential(base: Path, parts, args, lines: list) -> None:
    import torch

    from engine.synthesis.pipeline import synthesize

    common = [f"synthesis.max_candidates={args.candidates}", f"synthesis.num_inference_steps={args.steps}"]
    loops = {}  # torch threads -> (whole-run, steady-state) candidates/s of the sequential loop
    loop_cpu = 0.0  # CPU seconds a shard of the one-core loop: generation, filter and write
    for threads in sorted({1, DEFAULT_THREADS}, reverse=True):
        torch.set_num_threads(threads)  # the actors' settings are 0 (keep torch's) in SEQUENTIAL
        cfg = run_config(base, base / f"f1-sequential-{threads}", args, [*common, *SEQUENTIAL])
        with ProcessCPU() as cpu:
            seq = synthesize(cfg, sequential=True, log=quiet, parts=parts)
        if threads == 1:
            loop_cpu = cpu.per_shard(completion_times(seq["store"]))
        steady = steady_rate(completion_times(seq["store"]), cfg.synthesis.shard_size, 1)
        loops[threads] = seq["candidates_per_s"], steady
        print(f"[1] sequential loop, 1 process, {threads} torch thread(s): {seq['written']} candidates in "
              f"{seq['seconds']:.1f} s = {seq['candidates_per_s']:.2f} candidates/s; steady state (after the first "
              f"shard) {steady:.2f} candidates/s", flush=True)
    torch.set_num_threads(DEFAULT_THREADS)
    two, two_cpu = two_loops_at_once(base, args)
    startup = connect_ray(args.timeout_s)
    cfg = run_config(base, base / "f1-ray", args, common)
    with deadline(args.timeout_s, "figure 1: Ray pipeline"), PeakRSS(interval=1.0) as usage:
        ray_run = synthesize(cfg, log=quiet, parts=parts)
    actors = cfg.synthesis.diffusion.actors
    shards_done = completion_times(ray_run["store"])
    for what, window, cpu in (
            ("the whole pipeline run", ray_run["seconds"], usage.cpu_by_role()),
            ("its steady state (after the first shard of every diffusion actor)",
             usage.window(shards_done[actors - 1], shards_done[-1]),
             usage.cpu_by_role(shards_done[actors - 1], shards_done[-1]))):
        capacity = window * (os.cpu_count() or 1)
        print(f"[1] CPU time of {what} by process role ({window:.1f} s x {os.cpu_count()} cores = {capacity:.0f} "
              "CPU s; the driver's share includes a once-a-second /proc sampler): "
              + ", ".join(f"{role} {sec:.1f} s ({100 * sec / capacity:.1f}%)"
                          for role, sec in sorted(cpu.items(), key=lambda item: -item[1]))
              + f"; idle {capacity - sum(cpu.values()):.1f} s", flush=True)
    ray_steady = steady_rate(completion_times(ray_run["store"]), cfg.synthesis.shard_size, actors)
    # The pipeline's steady rate is the CPU its diffusion actors get divided by what a shard costs
    # them: set beside the loops' cost of a whole shard, this tells slower actors from fewer cores.
    steady_cpu = usage.cpu_by_role(shards_done[actors - 1], shards_done[-1])
    window = usage.window(shards_done[actors - 1], shards_done[-1])
    actor_cpu = steady_cpu.get("diffusion actor", 0.0) / max(len(shards_done) - actors, 1)
    print(f"[1] CPU seconds a shard in the steady state: diffusion actors {actor_cpu:.2f} (generation only), the "
          f"one-core loop {loop_cpu:.2f}, each of two loops at once {two_cpu:.2f} (their whole shard: preparation, "
          f"generation, filter, write); the diffusion "
          f"actors had {100 * steady_cpu.get('diffusion actor', 0.0) / (window * (os.cpu_count() or 1)):.1f}% of "
          f"the {os.cpu_count()} cores, the rest went to the processes listed above", flush=True)
    with_startup = ray_run["written"] / (ray_run["seconds"] + startup)
    print(f"[1] Ray pipeline, {actors} diffusion actors x 1 thread + 1 filter actor x 1 thread: {ray_run['written']} "
          f"candidates in {ray_run['seconds']:.1f} s = {ray_run['candidates_per_s']:.2f} candidates/s "
          f"(+{startup:.1f} s Ray start-up: {with_startup:.2f} candidates/s); actor start-up and model "
          f"loading are inside both figures; steady state (after the first {actors} shards) {ray_steady:.2f} "
          "candidates/s", flush=True)
    add(lines, 1, ratio_line("two one-core loops at once (two processes, no Ray: what two cores give this work "
                            "here) vs one, steady state", f"{two:.2f} vs {loops[1][1]:.2f}", "(the ceiling)",
                            two / loops[1][1]))
    add(lines, 1, ratio_line("pipeline vs two one-core loops at once, steady state", f"{ray_steady:.2f} vs {two:.2f}",
                            "(share of the ceiling)", ray_steady / two))
    for threads, (whole, steady) in loops.items():
        loop = f"sequential loop with {threads} torch thread(s)" + (" (one core)" if threads == 1 else "")
        add(lines, 1, ratio_line(f"pipeline vs {loop}, candidates/s, whole run",
                                f"{ray_run['candidates_per_s']:.2f} vs {whole:.2f}", ">= 1.8x on two cores",
                                ray_run["candidates_per_s"] / whole))
        add(lines, 1, ratio_line(f"pipeline (incl. Ray start-up) vs {loop}", f"{with_startup:.2f} vs {whole:.2f}",
                                ">= 1.8x on two cores", with_startup / whole))
        add(lines, 1, ratio_line(f"pipeline vs {loop}, steady state (start-up excluded)",
                                f"{ray_steady:.2f} vs {steady:.2f}", ">= 1.8x on two cores", ray_steady / steady))


def loop_child(base: Path, args) -> None:
    """Figure 1's child: the sequential loop on one torch thread over ``--candidates`` in this fresh
    process, into its own store (``--loop-child`` names the run)."""
    import torch

    from engine.synthesis.pipeline import synthesize

    torch.set_num_threads(1)
    parts = load_parts(base, args, args.candidates)
    cfg = run_config(base, base / f"f1-{args.loop_child}", args, [
        f"synthesis.max_candidates={args.candidates}", f"synthesis.num_inference_steps={args.steps}", *SEQUENTIAL])
    with ProcessCPU() as cpu:
        summary = synthesize(cfg, sequential=True, log=quiet, parts=parts)
    times = completion_times(summary["store"])
    print("LOOP_RESULT " + json.dumps({"written": summary["written"], "seconds": summary["seconds"],
                                       "cpu_per_shard": cpu.per_shard(times),
                                       "shard_size": cfg.synthesis.shard_size, "times": times}), flush=True)


def two_loops_at_once(base: Path, args) -> tuple[float, float]:
    """Candidates/s of two one-thread sequential loops running at once in two processes (each over
    half of ``--candidates``, no Ray), counted over the time both ran in their steady state (from
    the later first shard to the earlier last one): what two cores give this work on this machine
    when nothing is shared but the hardware (memory bandwidth, caches, the VM's scheduler); and the
    CPU seconds a shard cost each of them in its steady state (the mean of the two)."""
    half = max(args.candidates // 2, 1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--loop-child", f"concurrent-{i}", "--candidates", str(half), "--out", str(base),
         "--config", args.config, "--steps", str(args.steps), "--patients", str(args.patients),
         "--candidates-per-slice", str(args.candidates_per_slice), *(f"--set={kv}" for kv in args.set)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=args.timeout_s + 120)
        found = [line for line in out.splitlines() if line.startswith("LOOP_RESULT ")]
        if proc.returncode or not found:
            raise RuntimeError(f"figure 1's concurrent loop failed ({proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(found[-1].split(" ", 1)[1]))
    times = [r["times"] for r in results]
    start, stop = max(t[0] for t in times), min(t[-1] for t in times)
    shards = sum(1 for t in times for x in t if start < x <= stop)
    if stop <= start or not shards:
        raise SystemExit("the two concurrent loops did not overlap in their steady state; raise --candidates")
    rate = shards * results[0]["shard_size"] / (stop - start)
    print(f"[1] two sequential loops at once, 1 torch thread each, {half} candidates each: "
          + ", ".join(f"{r['written']} in {r['seconds']:.1f} s" for r in results)
          + f"; {shards} shards completed in the {stop - start:.1f} s both were past their first: "
          f"{rate:.2f} candidates/s together", flush=True)
    return rate, statistics.mean(r["cpu_per_shard"] for r in results)


class DroppingDatasink:
    """Stand-in for the Zarr sink of figure 3: consumes the generated blocks, writes nothing, and
    keeps the wall-clock time each block (shard) arrived (``times``, filled on the driver)."""

    @staticmethod
    def make():
        from ray.data import Datasink
        from ray.data.block import BlockAccessor

        class _Drop(Datasink):
            def __init__(self):
                self.times: list[float] = []

            def get_name(self) -> str:
                return "Drop"

            def write(self, blocks, ctx):
                return [(time.time(), BlockAccessor.for_block(b).num_rows()) for b in blocks]

            def on_write_complete(self, write_result):
                self.times = sorted(t for task in write_result.write_returns for t, rows in task if rows)

        return _Drop()


def generation_only(job) -> tuple[float, list[float]]:
    """Seconds of the pipeline of ``job`` without its filter pool (``SynthesisJob.dataset(...,
    filtered=False)``: preparation tasks and the diffusion actor pool, same resources) into a
    dropping sink, over all shards, and the times the shards reached the sink."""
    from engine.synthesis.pipeline import check_pools_fit

    start = time.perf_counter()
    check_pools_fit(job.syn)
    sink = DroppingDatasink.make()
    job.dataset(list(range(job.layout.shards)), filtered=False).write_datasink(
        sink, ray_remote_args={"num_cpus": job.syn.prepare_cpus})
    return time.perf_counter() - start, sink.times


def figure_end_to_end_vs_generation(base: Path, parts, args, lines: list) -> None:
    from engine.synthesis.pipeline import SynthesisJob, synthesize

    common = [f"synthesis.max_candidates={args.candidates}", f"synthesis.num_inference_steps={args.steps}"]
    connect_ray(args.timeout_s)
    # end to end first: on a cold cluster (figure 1 not run) the first run pays the workers' imports
    cfg = run_config(base, base / "f3-end-to-end", args, common)
    with deadline(args.timeout_s, "figure 3: end-to-end pipeline"):
        full = synthesize(cfg, log=quiet, parts=parts)
    with deadline(args.timeout_s, "figure 3: generation-only pipeline"):
        gen_s, gen_times = generation_only(SynthesisJob(run_config(base, base / "f3-generation", args, common), parts))
    shard_size, actors = cfg.synthesis.shard_size, cfg.synthesis.diffusion.actors
    full_steady = steady_rate(completion_times(full["store"]), shard_size, actors)
    gen_steady = steady_rate(gen_times, shard_size, actors)
    print(f"[3] {full['written']} candidates: end to end {full['seconds']:.1f} s; generation alone (filter pool "
          f"and Zarr writer replaced by a sink that drops the rows) {gen_s:.1f} s; steady state (after the first "
          f"{actors} shards) {full_steady:.2f} vs {gen_steady:.2f} candidates/s", flush=True)
    add(lines, 3, ratio_line("end-to-end vs generation-alone time, whole run", f"{full['seconds']:.1f} s vs {gen_s:.1f} s",
                            "<= 1.1x", full["seconds"] / gen_s))
    add(lines, 3, ratio_line("end-to-end vs generation-alone time per candidate, steady state",
                            f"{1 / full_steady:.3f} s vs {1 / gen_steady:.3f} s", "<= 1.1x", gen_steady / full_steady))


# ------------------------------------------------------------------------------------------ figure 2
def stock_pipeline(model):
    """diffusers' ControlNet inpainting pipeline on the generator's own components.

    What had to be adapted: nothing in diffusers. The pipeline takes tensors [B, 1, H, W]: its
    VaeImageProcessor converts only PIL images to RGB (``do_convert_rgb``) and passes 1-channel
    tensors through (resized to the same size, i.e. unchanged); the image goes in as [0, 1] (it
    normalizes to [-1, 1]), the mask is binarized, the edge map passes unnormalized, as ours. The
    caption states go in as ``prompt_embeds`` (so ``text_encoder``/``tokenizer`` are None, no
    tokenizer work is timed); ``guidance_scale=1`` and ``controlnet_conditioning_scale=1`` as ours.
    Differences that remain: the stock loop encodes only the masked image (ours also encodes the
    full image for the kept-region latents), resizes the mask to latents by nearest neighbour (ours:
    max pooling), does not keep the known region per step, and does not blend in pixel space.
    """
    from diffusers import StableDiffusionControlNetInpaintPipeline

    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=model.vae, text_encoder=None, tokenizer=None, unet=model.unet, controlnet=model.controlnet,
        scheduler=model.make_sampler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def figure_actor_vs_stock(base: Path, parts, args, lines: list) -> None:
    import torch

    from engine.synthesis.actors import DiffusionActor, prepare_shards
    from engine.synthesis.pipeline import SynthesisJob

    cfg = run_config(base, base / "f2", args, [f"synthesis.num_inference_steps={args.steps}"])
    job = SynthesisJob(cfg, parts)
    diffusion_args, _ = job.actor_args()
    actor = DiffusionActor(**diffusion_args)  # sets torch to the actor's 1 thread
    batch_size = cfg.synthesis.batch_size
    # A batch of candidates that all take a scar (the actor skips rows without one).
    rows, seeds, captions = {}, [], []
    for shard in range(job.layout.shards):
        inputs = prepare_shards({"shard": np.asarray([shard])}, job.context)
        meta = json.loads(str(inputs["meta"][0]))
        active = np.flatnonzero(np.asarray(inputs["scar"][0]).reshape(len(meta["seed"]), -1).any(1))
        for key in ("image", "mask", "condition", "scar"):
            rows.setdefault(key, []).append(np.asarray(inputs[key][0])[active])
        seeds += [meta["noise_seed"][i] for i in active]
        captions += [meta["caption"][i] for i in active]
        if len(seeds) >= batch_size:
            break
    ours_in = {k: np.concatenate(v)[:batch_size] for k, v in rows.items()}
    ours_in["caption"], seeds = captions[:batch_size], seeds[:batch_size]
    if len(seeds) < batch_size:
        raise SystemExit(f"figure 2: only {len(seeds)} candidates take a scar; need {batch_size}")

    model = actor.model  # in the actor's layout (synthesis.diffusion.channels_last, default on)
    # diffusers as it ships: the same weights in torch's default (contiguous) layout; and the same
    # pipeline on the actor's own modules, so that the layout is the same on both sides
    pipes = {"stock": stock_pipeline(copy.deepcopy(model).to(memory_format=torch.contiguous_format)),
             SAME_MODULES: stock_pipeline(model)}
    image01 = (torch.as_tensor(ours_in["image"]) + 1.0) / 2.0
    mask = torch.as_tensor(ours_in["mask"], dtype=torch.float32)
    control = torch.as_tensor(ours_in["condition"], dtype=torch.float32)
    with torch.no_grad():
        prompt_embeds = model.text_states(ours_in["caption"])  # caption encoding is not timed for diffusers

    def ours() -> None:
        actor.generate(ours_in, seeds)

    def stock(pipe) -> None:
        # one generator: diffusers encodes the VAE batch at once (a list would encode sample by sample)
        out = pipe(prompt_embeds=prompt_embeds, image=image01, mask_image=mask, control_image=control,
                   num_inference_steps=args.steps, guidance_scale=1.0, controlnet_conditioning_scale=1.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert tuple(out.shape) == tuple(image01.shape), out.shape

    calls = {"ours": ours, **{name: functools.partial(stock, pipe) for name, pipe in pipes.items()}}
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up (allocator, caption cache, diffusers' first-call checks)
        call()
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    sources = len(np.unique(ours_in["image"].reshape(batch_size, -1), axis=0))
    layout = "channels-last" if diffusion_args.get("channels_last") else "contiguous"
    print(f"[2] batch {batch_size} ({sources} distinct source slices, as the plan orders candidates), {args.steps} "
          f"steps, {torch.get_num_threads()} torch thread(s), median of {args.repeats}: DiffusionActor.generate "
          f"({layout} weights) {median['ours']:.2f} s ({batch_size / median['ours']:.2f} images/s), diffusers "
          f"StableDiffusionControlNetInpaintPipeline as shipped {median['stock']:.2f} s "
          f"({batch_size / median['stock']:.2f} images/s), the same on the actor's {layout} modules "
          f"{median[SAME_MODULES]:.2f} s", flush=True)
    for name in pipes:
        add(lines, 2, ratio_line(f"diffusion actor vs diffusers' pipeline ({name}) images/s",
                                f"{batch_size / median['ours']:.2f} vs {batch_size / median[name]:.2f}", ">= 1x",
                                median[name] / median["ours"]))
    torch.set_num_threads(DEFAULT_THREADS)


# ------------------------------------------------------------------------------------------ figure 4
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory_kib(pid: int) -> tuple[dict[str, int], str]:
    """``VmHWM`` (peak resident set), ``RssAnon`` (resident private memory now: the process's own
    heap) and ``RssShmem`` (resident shared memory now: the pages of Ray's object store it has read)
    in KiB, and the process title (Ray workers set ``ray::<name>``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return {}, ""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("VmHWM", "RssAnon", "RssShmem") if key in fields}, title


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (``/proc/<pid>/stat``), None once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


class ProcessCPU:
    """This process's CPU seconds (all its threads), sampled with the wall clock every
    ``interval`` s in a thread: :meth:`per_shard` is what a shard cost between the first and the
    last of the completion times given (the steady state of a loop: its start-up left out)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append((time.time(), time.process_time()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), time.process_time()))

    def per_shard(self, times: list[float]) -> float:
        def at(t: float) -> float:
            return min(self.samples, key=lambda sample: abs(sample[0] - t))[1]

        return (at(times[-1]) - at(times[0])) / max(len(times) - 1, 1)


class PeakRSS:
    """Samples the memory of this process and all its descendants (the Ray processes a local
    ``ray.init`` starts) every ``interval`` s: each process's peak RSS (VmHWM, kept by the kernel)
    and the peaks of its private (RssAnon) and shared (RssShmem) resident memory as sampled; and
    the CPU seconds each used between entering and leaving (as last sampled: a process that exits
    between samples loses at most ``interval`` of its CPU time)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peaks, self.titles = interval, {}, {}
        self.cpu_first: dict[int, float] = {}  # CPU seconds when first seen (0 for a process started inside)
        self.cpu_last: dict[int, float] = {}
        self.cpu_series: list[tuple[float, dict[int, float]]] = []  # (wall clock, {pid: CPU s}) per sample
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for pid in _descendants(os.getpid()):
            kib, title = _memory_kib(pid)
            if kib.get("VmHWM"):
                peaks = self.peaks.setdefault(pid, {})
                for key, value in kib.items():
                    peaks[key] = max(value, peaks.get(key, 0))
                self.titles.setdefault(pid, set()).add(title)  # a worker's title changes with its task
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self.cpu_first.setdefault(pid, cpu if not self._started else 0.0)
                self.cpu_last[pid] = cpu
        self.cpu_series.append((time.time(), dict(self.cpu_last)))
        self._started = True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()  # the CPU already used by processes alive now is not counted
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def role(self, pid: int) -> str:
        """What process ``pid`` was, from every title it had."""
        titles = " ".join(sorted(self.titles.get(pid, ())))
        if pid == os.getpid():
            return "driver"
        for name, role in (("DiffusionActor", "diffusion actor"), ("FilterActor", "filter actor")):
            if name in titles:
                return role
        if re.search(r"ray::(IDLE|MapBatches|Write|Map\b)", titles):  # Ray Data's tasks run in these
            return "task worker"
        if "ray::" in titles:  # Ray's own actors and agents (Ray Data's stats and locality actors, ...)
            return "Ray's own actors"
        return "Ray system (raylet, GCS, ...)"

    def by_role(self, key: str = "VmHWM") -> dict[str, float]:
        """Largest peak ``key`` (MiB) per role: driver, diffusion actor, filter actor, task workers
        (preparation and write tasks), Ray's own actors and agents, Ray system processes."""
        roles: dict[str, float] = {}
        for pid, peaks in self.peaks.items():
            role = self.role(pid)
            roles[role] = max(roles.get(role, 0.0), peaks.get(key, 0) / 1024)
        return roles

    def cpu_by_role(self, start: float | None = None, stop: float | None = None) -> dict[str, float]:
        """CPU seconds used inside the sampled window, summed per role (see :meth:`role`); with
        ``start`` and ``stop`` (wall clock), between the samples nearest to them."""
        first, last = self.cpu_first, self.cpu_last
        if start is not None and stop is not None:
            first = min(self.cpu_series, key=lambda sample: abs(sample[0] - start))[1]
            last = min(self.cpu_series, key=lambda sample: abs(sample[0] - stop))[1]
        roles: dict[str, float] = {}
        for pid, cpu in last.items():
            role = self.role(pid)
            roles[role] = roles.get(role, 0.0) + cpu - first.get(pid, 0.0)
        return roles

    def window(self, start: float, stop: float) -> float:
        """Seconds between the samples :meth:`cpu_by_role` takes for ``start`` and ``stop``."""
        times = [sample[0] for sample in self.cpu_series]
        return min(times, key=lambda t: abs(t - stop)) - min(times, key=lambda t: abs(t - start))

    def largest(self, role: str) -> str:
        """The titles of the process with the largest peak RSS in ``role`` (which one it was)."""
        pids = [pid for pid in self.peaks if self.role(pid) == role]
        top = max(pids, key=lambda pid: self.peaks[pid]["VmHWM"]) if pids else None
        return " | ".join(sorted(self.titles[top]))[:160] if pids else ""


def rss_child(base: Path, args) -> None:
    """Figure 4's child: one pipeline run of ``args.rss_child`` candidates in this fresh process."""
    from engine.synthesis.pipeline import synthesize

    parts = load_parts(base, args, args.rss_child)
    cfg = run_config(base, base / f"f4-{args.rss_child}", args, [
        f"synthesis.max_candidates={args.rss_child}", f"synthesis.num_inference_steps={args.rss_steps}"])
    with PeakRSS() as rss:
        connect_ray(args.timeout_s)
        with deadline(args.timeout_s, "figure 4: Ray pipeline"):
            summary = synthesize(cfg, log=quiet, parts=parts)
        rss.sample()
    disconnect_ray()
    print("RSS_RESULT " + json.dumps({"written": summary["written"], "seconds": summary["seconds"],
                                      "roles": rss.by_role(), "private": rss.by_role("RssAnon"),
                                      "shared": rss.by_role("RssShmem"),
                                      "ray_actors": rss.largest("Ray's own actors")}),
          flush=True)


def figure_peak_rss(base: Path, args, lines: list) -> None:
    disconnect_ray()  # each run starts its own Ray instance in a fresh process
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    results = {}
    for n in (args.rss_candidates, 10 * args.rss_candidates):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--out", str(base), "--config", args.config,
               "--rss-steps", str(args.rss_steps), "--patients", str(args.patients),
               "--candidates-per-slice", str(args.candidates_per_slice), "--timeout-s", str(args.timeout_s),
               *(f"--set={kv}" for kv in args.set)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=args.timeout_s + 120)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RSS_RESULT ")]
        if proc.returncode or not found:
            raise RuntimeError(f"figure 4 run of {n} candidates failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results[n] = json.loads(found[-1].split(" ", 1)[1])
        roles = ", ".join(f"{role} {mib:.0f} ({results[n]['private'][role]:.0f} private, "
                          f"{results[n]['shared'][role]:.0f} shared) MiB"
                          for role, mib in sorted(results[n]["roles"].items()))
        print(f"[4] {results[n]['written']} candidates ({args.rss_steps} steps, {results[n]['seconds']:.1f} s): "
              f"peak RSS {roles} (the largest of Ray's own: {results[n]['ray_actors']})", flush=True)
    small, large = results[args.rss_candidates], results[10 * args.rss_candidates]
    for role in ("driver", "diffusion actor", "filter actor", "task worker", "Ray's own actors"):
        if role in small["roles"] and role in large["roles"]:
            for key, what in (("roles", "peak RSS"), ("private", "peak private RSS (RssAnon)")):
                name = f"{what} {role}, {args.rss_candidates} vs {10 * args.rss_candidates} candidates"
                add(lines, 4, ratio_line(name,
                                        f"{small[key][role]:.0f} MiB vs {large[key][role]:.0f} MiB",
                                        "10N within 10% of N", large[key][role] / small[key][role]))


# ------------------------------------------------------------------------------------------ figure 5
def store_rows(job) -> dict[int, dict]:
    """Rows of every shard of ``job``'s layout as the filter writes them (all kept): real phantom crops
    and labels, conditions, scores and texts."""
    from engine.anatomy.labels import MYOCARDIUM

    rng = np.random.default_rng(0)
    slices, layout, out = job.plan.slices, job.layout, {}
    for shard in range(layout.shards):
        start, stop = layout.shard_rows(shard)
        src = job.plan.jobs[start:stop, 0]
        n = stop - start
        out[shard] = {
            "image": slices.image[src].reshape(n, layout.height, layout.width).astype(np.float32),
            "label": slices.label[src].astype(np.uint8),
            "condition": (slices.label[src] == MYOCARDIUM).astype(np.uint8),
            "dice": rng.random(n, dtype=np.float32), "passed": np.ones(n, bool),
            "seed": rng.integers(0, 2**62, n, dtype=np.int64),
            **{k: np.asarray(job.plan.sample_ids[start:stop], dtype=object)
               for k in ("sample_id", "source", "caption", "spec", "skip_reason")},
        }
    return out


def array_bytes(rows: dict) -> dict[str, bytes]:
    """One shard's arrays as plain bytes (numbers as stored in memory, texts as lines of UTF-8)."""
    return {name: "\n".join(str(v) for v in value).encode() if value.dtype == object else np.ascontiguousarray(value).tobytes()
            for name, value in rows.items()}


def raw_codecs(group, name: str):
    """``(serialise, compressors)`` of array ``name`` as plain numcodecs calls: what a hand-written
    writer of the same chunks would run (zstd and blosc, the compressors the store uses)."""
    import numcodecs

    array = group[name]
    compressors = []
    for codec in array.compressors:
        config = codec.to_dict()["configuration"]
        if codec.to_dict()["name"] == "zstd":
            compressors.append(numcodecs.Zstd(level=config["level"], checksum=config["checksum"]))
        elif codec.to_dict()["name"] == "blosc":
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config["shuffle"]]
            compressors.append(numcodecs.Blosc(config["cname"], config["clevel"], shuffle, config["blocksize"]))
        else:
            raise ValueError(f"{name}: no raw equivalent of {codec}")
    if array.dtype.kind in "OTU" or str(array.dtype) == "StringDType()":
        utf8 = numcodecs.VLenUTF8()
        return (lambda chunk: utf8.encode(np.asarray([str(v) for v in chunk], dtype=object))), compressors, array.chunks
    return (lambda chunk: np.ascontiguousarray(chunk).tobytes()), compressors, array.chunks


def raw_encode(codecs: dict, shard_rows: dict) -> int:
    """Encode one shard's chunks (one per inner chunk, all-zero chunks left out as zarr does) with
    plain numcodecs; returns the encoded byte count (the time is the point)."""
    size = 0
    for name, value in shard_rows.items():
        serialise, compressors, chunks = codecs[name]
        value = np.asarray(value)
        for i in range(0, len(value), chunks[0]):
            chunk = value[i:i + chunks[0]]
            if chunk.dtype != object and not chunk.any():
                continue
            data = serialise(chunk)
            for compressor in compressors:
                data = compressor.encode(data)
            size += len(data)
    return size


def zarr_vs_raw(fs, root: str, url_of, options, layout, rows, repeats: int, compression: str) -> dict[str, float]:
    """Median seconds of writing every shard with the store (``ShardWriter``: encode, then every
    array's shard object, then the shard's ``shard_complete`` flag), of piping the same encoded
    objects with ``fs``, of piping the arrays' plain bytes with ``fs``, and of encoding the same
    chunks with plain numcodecs (no IO), with the byte counts, and the median over repeats of each
    repeat's ratio of a raw put to the store's write. Both raw writers put a shard as the store
    does: one ``pipe`` call of its array objects, then one of its marker object (written only once
    the rest is stored), shard after shard as the pipeline's writers do. ``root`` is ``fs``'s path
    of a fresh folder, ``url_of(path)`` its URL for zarr; ``compression`` the store's
    (``synthesis.compression``).

    A local disk's speed drifts within seconds here (the same put of 28 MB: 0.02-0.09 s), so the
    three writers run one right after the other in each repeat, the store's write first in even
    repeats and last in odd ones, and the ratios are taken within a repeat; every timed write starts
    with no dirty pages (``os.sync``: the kernel's writeback of what the writer before it wrote would
    otherwise land on whichever runs next). The encoded objects are the untimed first round's."""
    from engine.synthesis.store import MARKER, ShardWriter, create_store

    plain = {shard: array_bytes(shard_rows) for shard, shard_rows in rows.items()}
    objects: dict[int, dict[str, bytes]] = {}  # the store's objects by shard, from the first round
    codecs = None

    def write_zarr(r: int) -> float:
        nonlocal codecs
        path = f"{root}/{compression}/zarr-{r}.zarr"
        group = create_store(url_of(path), layout, {"benchmark": True}, options, compression=compression)
        codecs = {name: raw_codecs(group, name) for name in rows[next(iter(rows))]}
        os.sync()
        start = time.perf_counter()
        writer = ShardWriter(group, layout)  # as a write task of the datasink: arrays opened once
        for shard, shard_rows in rows.items():
            writer.write(shard, shard_rows)
        writer.close()
        seconds = time.perf_counter() - start
        if not objects:  # every chunk object, grouped by shard (the first chunk coordinate)
            for key in fs.find(path):
                rel = key[len(path) + 1:]
                chunk = re.fullmatch(r"[^/]+/c[./](\d+)(?:[./]\d+)*", rel)  # <array>/c.<shard>.0.0
                if chunk:
                    objects.setdefault(int(chunk.group(1)), {})[rel] = fs.cat_file(key)
        return seconds

    def put_encoded(r: int) -> float:
        os.sync()
        start = time.perf_counter()
        for shard in sorted(objects):
            arrays = {rel: data for rel, data in objects[shard].items() if not rel.startswith(f"{MARKER}/")}
            fs.pipe({f"{root}/{compression}/encoded-{r}/{rel}": data for rel, data in arrays.items()})
            fs.pipe({f"{root}/{compression}/encoded-{r}/{rel}": data for rel, data in objects[shard].items()
                     if rel not in arrays})
        return time.perf_counter() - start

    def put_plain(r: int) -> float:
        os.sync()
        start = time.perf_counter()
        for shard, arrays in plain.items():
            fs.pipe({f"{root}/{compression}/plain-{r}/{name}/{shard}": data for name, data in arrays.items()})
            fs.pipe({f"{root}/{compression}/plain-{r}/{MARKER}/{shard}": b"\x01"})
        return time.perf_counter() - start

    def encode(r: int) -> float:
        start = time.perf_counter()
        for shard_rows in rows.values():
            raw_encode(codecs, shard_rows)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"zarr": [], "encoded": [], "plain": [], "encode": []}
    for r in range(repeats + 1):  # the first round warms codecs and connections, untimed
        order = [("zarr", write_zarr), ("encoded", put_encoded), ("plain", put_plain), ("encode", encode)]
        if r % 2:
            order = order[2::-1] + order[3:]  # plain, encoded, zarr, then encode
        taken = {name: run(r) for name, run in order}
        if r:
            for name, value in taken.items():
                times[name].append(value)
    out = {name: statistics.median(values) for name, values in times.items()}
    out.update({f"{name}_ratio": statistics.median(raw / z for raw, z in zip(times[name], times["zarr"], strict=True))
                for name in ("encoded", "plain")})
    out["encode_ratio"] = statistics.median((e + raw) / z for e, raw, z in zip(times["encode"], times["encoded"],
                                                                                 times["zarr"], strict=True))
    out.update(encoded_mb=sum(len(d) for shard in objects.values() for d in shard.values()) / 1e6,
               plain_mb=sum(len(d) for arrays in plain.values() for d in arrays.values()) / 1e6)
    return out


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def figure_store_writes(base: Path, parts, args, lines: list) -> None:
    import fsspec

    from engine.synthesis.pipeline import SynthesisJob
    from engine.synthesis.store import StoreLayout

    setups = []  # (shards, shard size, layout, rows by shard)
    for want, size in ((args.store_shards, []), (args.store_large_shards, ["synthesis.shard_size=256"])):
        if not want:
            continue
        extra, per_slice = ["synthesis.max_candidates=0", *size], args.candidates_per_slice
        job = SynthesisJob(run_config(base, base / "f5", args, extra), parts)
        if job.layout.shards < want:  # more draws a slice until the plan holds the shards asked for
            per_slice *= -(-want * job.layout.shard_size // job.layout.rows)
            extra.append(f"synthesis.candidates_per_slice={per_slice}")
            job = SynthesisJob(run_config(base, base / "f5", args, extra), parts)
        shards, shard_size = min(want, job.layout.shards), job.layout.shard_size
        layout = StoreLayout(rows=shards * shard_size, height=job.layout.height, width=job.layout.width,
                             shard_size=shard_size)
        setups.append((shards, shard_size, layout, {s: r for s, r in store_rows(job).items() if s < shards}))

    local = fsspec.filesystem("file", auto_mkdir=True)
    targets = [("local", local, str(base / "f5"), lambda p: p, None)]
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    # moto runs as a thread of this process (as the tests' endpoint): both writers pay its share of the GIL
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = _free_port(S3_IP)
    server = ThreadedMotoServer(ip_address=S3_IP, port=port, verbose=False)
    server.start()
    try:
        options = {"endpoint_url": f"http://{S3_IP}:{port}"}
        s3 = fsspec.filesystem("s3", **options)
        s3.mkdir("bench")
        targets.append(("S3 (moto)", s3, "bench/f5", lambda p: f"s3://{p}", options))
        for (shards, shard_size, layout, rows), (name, fs, root, url_of, opts), compression in itertools.product(
                setups, targets, args.compression.split(",")):
            t = zarr_vs_raw(fs, f"{root}/s{shard_size}", url_of, opts, layout, rows, args.repeats, compression)
            mb = t["plain_mb"]  # throughputs count the candidates' plain array bytes
            name = f"{name}, shards of {shard_size}, compression {compression}"
            print(f"[5] {name}: {shards} shards x {shard_size} candidates = {mb:.1f} MB of arrays "
                  f"({t['encoded_mb']:.1f} MB as Zarr chunk objects); median of {args.repeats}: zarr ShardWriter "
                  f"{t['zarr']:.3f} s ({mb / t['zarr']:.1f} MB/s); fsspec pipe, two calls per shard (objects, "
                  f"then marker), of the same encoded objects {t['encoded']:.3f} s, of the plain array bytes "
                  f"{t['plain']:.3f} s ({mb / t['plain']:.1f} MB/s); numcodecs encode of the same chunks, no IO, "
                  f"{t['encode']:.3f} s", flush=True)
            # ratios: the median of each repeat's own ratio (the times beside them are medians)
            add(lines, 5, ratio_line(f"Zarr write vs raw fsspec put of the same encoded objects, {name}",
                                     f"{t['zarr']:.3f} s vs {t['encoded']:.3f} s", ">= 0.8x", t["encoded_ratio"]))
            add(lines, 5, ratio_line(f"Zarr write vs numcodecs encode + raw fsspec put of the same objects, {name}",
                                     f"{t['zarr']:.3f} s vs {t['encode']:.3f} + {t['encoded']:.3f} s", ">= 0.8x",
                                     t["encode_ratio"]))
            add(lines, 5, ratio_line(f"Zarr write vs raw fsspec put of the plain array bytes, {name}",
                                     f"{mb / t['zarr']:.1f} vs {mb / t['plain']:.1f} MB/s", ">= 0.8x",
                                     t["plain_ratio"]))
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ main
def main(args: argparse.Namespace) -> None:
    import ray
    import torch

    global DEFAULT_THREADS
    DEFAULT_THREADS = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        base = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base = base.absolute()
        if args.rss_child:
            rss_child(base, args)
            return
        if args.loop_child:
            loop_child(base, args)
            return
        only = {int(x) for x in args.only.split(",") if x.strip()}
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
              f"torch {torch.__version__} (default {DEFAULT_THREADS} threads), ray {ray.__version__}", flush=True)
        prepare_base(base, args)
        parts = load_parts(base, args, max(args.candidates, 10 * args.rss_candidates if 4 in only else 0))
        lines: list = []
        try:
            if 1 in only:
                figure_pipeline_vs_sequential(base, parts, args, lines)
            if 3 in only:
                figure_end_to_end_vs_generation(base, parts, args, lines)
            disconnect_ray()  # figures 2, 4 and 5 time single processes; no idle Ray beside them
            if 2 in only:
                figure_actor_vs_stock(base, parts, args, lines)
            if 4 in only:
                figure_peak_rss(base, args, lines)
            if 5 in only:
                figure_store_writes(base, parts, args, lines)
        finally:
            disconnect_ray()
        print()
        for _, line in sorted(lines, key=lambda item: item[0]):
            print(line)


DEFAULT_THREADS = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

if __name__ == "__main__":
    main(parse_args())
