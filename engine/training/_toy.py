"""A tiny real training function: the harness's worked example and the subject of its tests.

A two-layer MLP learns a noisy linear map ``y = x @ w + 0.1 * noise`` (x: [N, 4], y: [N, 1]) with
Adam and DDP through :mod:`engine.training.distributed`. Everything is a function of ``seed`` and
the global step, so a run that is interrupted and resumed from a checkpoint ends with exactly the
weights of an uninterrupted one:

* data: fixed by ``seed``; epoch ``e`` visits it in the order ``randperm(N, seed + 1 + e)``;
* global step ``s`` (in epoch ``s // steps_per_epoch``) gives rank ``r`` the batch at position
  ``(s % steps_per_epoch) * world_size + r`` of that order;
* a checkpoint every ``checkpoint_every_steps`` steps and at the end holds weights, Adam state and
  ``state = {"step", "epoch", "start_steps", "node_ips", "metrics"}``, where ``start_steps`` lists the
  step each attempt (first run, worker restart, new fit) started from.

``crash_at_step`` / ``crash_rank`` simulate a worker dying: that rank ``os._exit(1)``s just before
that step, once per run (a marker file in the run dir stops the restarted attempt from crashing
again), after waiting until its reports are committed so the checkpoint to resume from is known.

Config keys (all optional): ``seed`` 0, ``epochs`` 2, ``samples`` 256, ``batch_size`` 16 (per
worker), ``lr`` 0.01, ``crash_at_step`` None, ``crash_rank`` 1. A test holds a run where it interrupts
it from outside with the ``train.checkpoint`` fail point (:mod:`engine.failpoints`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from engine.training.distributed import autocast, prepare, report, restore, run_context, wait_for_commit, worker_context


def toy_regression_data(seed: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [samples, 4], y [samples, 1]) of the toy problem, identical on every worker."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, generator=generator)
    w = torch.randn(4, 1, generator=generator)
    return x, x @ w + 0.1 * torch.randn(samples, 1, generator=generator)


def toy_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _node_ips(world_size: int) -> list[str]:
    """The node IP of every rank, gathered over the process group (as integer tensors, no pickle)."""
    import ray.util

    mine = torch.tensor([int(part) for part in ray.util.get_node_ip_address().split(".")], dtype=torch.int64)
    if world_size == 1:
        return [".".join(map(str, mine.tolist()))]
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, mine)
    return [".".join(map(str, ip.tolist())) for ip in gathered]


def toy_train_fn(config: dict[str, Any]) -> dict[str, Any]:
    """Train the toy regressor on the Ray Train workers (see the module docstring)."""
    run = run_context(config)
    rank, world_size, device = worker_context()
    seed, epochs = int(config.get("seed", 0)), int(config.get("epochs", 2))
    samples, batch_size = int(config.get("samples", 256)), int(config.get("batch_size", 16))
    steps_per_epoch = samples // (batch_size * world_size)
    if steps_per_epoch < 1:
        raise ValueError(f"samples {samples} < batch_size {batch_size} x world_size {world_size}: no full step per epoch")
    total_steps = epochs * steps_per_epoch

    x, y = toy_regression_data(seed, samples)
    model = prepare(toy_model(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config.get("lr", 0.01)))
    models, optimizers = {"toy": model}, {"toy": optimizer}
    state = restore(models, optimizers) or {"step": 0, "epoch": 0, "start_steps": []}
    step = int(state["step"])
    start_steps = [*state["start_steps"], step]
    node_ips = _node_ips(world_size)
    crash_marker = os.path.join(run.run_dir, f"{run.name}.crashed")

    last_report, steps_since_report, loss_sum = time.perf_counter(), 0, torch.zeros((), dtype=torch.float64)
    while step < total_steps:
        if step == config.get("crash_at_step") and rank == int(config.get("crash_rank", 1)) and not os.path.exists(crash_marker):
            os.makedirs(run.run_dir, exist_ok=True)
            open(crash_marker, "w").close()
            wait_for_commit()  # so the test knows which checkpoint the restart must resume from
            os._exit(1)  # a worker dying without cleanup
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed + 1 + epoch))
        start = (position * world_size + rank) * batch_size
        index = order[start : start + batch_size]
        with autocast(run.train, device):
            loss = nn.functional.mse_loss(model(x[index].to(device)), y[index].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        steps_since_report += 1
        loss_sum += loss.detach().double().cpu()

        at_checkpoint = step % run.train.checkpoint_every_steps == 0 or step == total_steps
        if step % steps_per_epoch == 0 or at_checkpoint:
            mean_loss = loss_sum / steps_since_report
            if world_size > 1:
                torch.distributed.all_reduce(mean_loss)
                mean_loss /= world_size
            elapsed = time.perf_counter() - last_report
            metrics = {
                "step": step,
                "epoch": (step - 1) // steps_per_epoch,
                "loss": float(mean_loss),
                "samples_per_s": steps_since_report * batch_size * world_size / max(elapsed, 1e-9),
                "start_step": start_steps[-1],
                "node_ips": ",".join(node_ips),
            }
            state = {"step": step, "epoch": metrics["epoch"], "start_steps": start_steps, "node_ips": node_ips, "seed": seed}
            report(metrics, models=models, optimizers=optimizers, state=state, config={"model": "toy", "seed": seed}, checkpoint=at_checkpoint)
            last_report, steps_since_report, loss_sum = time.perf_counter(), 0, torch.zeros((), dtype=torch.float64)
    return {"step": step, "start_steps": start_steps}


class PlacementGroupMaker:
    """A Ray actor class (``ray.remote(num_cpus=0)(PlacementGroupMaker)``) that makes placement groups:
    groups whose creator is an actor, for the tests of
    :func:`engine.training.distributed.release_orphaned_placement_groups`."""

    def make(self, bundle: dict[str, float]):
        import ray

        return ray.util.placement_group([bundle])
