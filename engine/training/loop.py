"""The epoch loop every model trains with, inside a Ray Train worker.

One loop for the reward model, the VAE, the generator and the downstream model; each stage supplies
its dataset, a ``step_fn(batch) -> {"loss": tensor, ...}`` and a ``validate_fn() -> metrics``. The
loop owns what they share: per-rank deterministic sampling (``DistributedSampler`` or class-balanced
weighted draws), AdamW (constant or warm-up + cosine learning rate), gradient clipping, bf16
autocast on GPU, cross-rank averaging of losses, a checkpoint every ``checkpoint_every_steps`` steps and at every epoch end, and resuming mid-epoch
from the latest checkpoint (the batches already seen in that epoch are skipped, not repeated).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine.training.distributed import RunContext, autocast, report, restore, worker_context


@dataclass
class TrainLoopConfig:
    """How one model trains.

    Args:
        epochs: passes over the training set.
        batch_size: samples per worker and step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        grad_clip: max gradient norm (0 disables clipping).
        seed: sampling and initialisation seed.
        max_steps: stop after this many optimizer steps in total (0: no limit).
        balanced: draw positive and negative slices equally often (segmentation stages).
        schedule: learning rate over the run: ``"constant"`` (``lr`` throughout) or ``"cosine"``
            (linear warm-up over the first ``WARMUP_FRACTION`` of the steps, then cosine decay
            to 0 at the last step; Loshchilov & Hutter 2017). The rate is a function of the step
            alone, so a resumed run continues on the same curve.

    Example:
        >>> TrainLoopConfig(epochs=5, batch_size=16, lr=3e-4)
        TrainLoopConfig(epochs=5, batch_size=16, lr=0.0003, weight_decay=0.0001, grad_clip=1.0, seed=0, max_steps=0, balanced=False, schedule='constant')
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    max_steps: int = 0
    balanced: bool = False
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.epochs < 0:  # 0 is for phases that may be skipped; stages that must train check >= 1
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.max_steps < 0:
            raise ValueError("weight_decay, grad_clip and max_steps must be >= 0")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule: expected 'constant' or 'cosine', got {self.schedule!r}")


def require_epochs(loop: TrainLoopConfig, where: str) -> None:
    """Raise ValueError unless ``loop`` trains at least one epoch (``where`` names the section)."""
    if loop.epochs < 1:
        raise ValueError(f"{where}.epochs must be >= 1, got {loop.epochs}")


WARMUP_FRACTION = 0.05


def learning_rate(loop: TrainLoopConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps`` under ``loop.schedule``."""
    if loop.schedule == "constant":
        return loop.lr
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return loop.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
    return loop.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_indices(n: int, epoch: int, rank: int, world: int, seed: int, weights: np.ndarray | None) -> list[int]:
    """This rank's sample order for an epoch; every rank gets ``ceil(n / world)`` indices.

    Without weights: a seeded permutation split across ranks (``DistributedSampler`` semantics,
    padding by wrapping). With weights: ``ceil(n / world)`` draws with replacement, seeded per
    (seed, epoch, rank).
    """
    per_rank = math.ceil(n / world)
    if weights is None:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        order = np.concatenate([order, order[: per_rank * world - n]])
        return order[rank::world].tolist()
    p = np.asarray(weights, dtype=np.float64)
    return np.random.default_rng([seed, epoch, rank]).choice(n, size=per_rank, replace=True, p=p / p.sum()).tolist()


def paired_batches(positive: np.ndarray, synthetic: np.ndarray, batch_size: int, epoch: int, rank: int, world: int,
                   seed: int, synthetic_fraction: float | None = None) -> list[list[int]]:
    """This rank's batches of an epoch for arms that must differ only in their synthetic samples.

    The real draws are those of :func:`epoch_indices` over the real samples alone, class-balanced
    (positive and negative real slices equally often): the same draws in the same order, cut into
    the same batches, whatever synthetic samples an arm has. Synthetic samples (all positive) are
    added to the batches, never drawn in place of a real slice: a batch with ``k`` real positive draws
    gets ``k * f / (1 - f)`` synthetic ones (stochastically rounded, drawn uniformly with
    replacement, from generators of their own), so that ``f`` is their share among the positive
    draws. Every arm thus takes the same number of optimizer steps and sees the same real slices.

    Args:
        positive, synthetic: bool ``[N]`` per sample of the training set (real and synthetic).
        synthetic_fraction: ``f`` in [0, 1); None: the synthetic samples' share of all positive
            samples, as if they had joined the real positives' pool.

    Returns:
        ``ceil(ceil(n_real / world) / batch_size)`` lists of sample indices into the training set.
    """
    positive, synthetic = np.asarray(positive, bool), np.asarray(synthetic, bool)
    real = np.flatnonzero(~synthetic)
    real_positive = positive[real]
    if real_positive.all() or not real_positive.any():
        raise ValueError(f"cannot balance classes: {int(real_positive.sum())} positive and "
                         f"{int((~real_positive).sum())} negative real slices")
    weights = np.where(real_positive, 0.5 / real_positive.sum(), 0.5 / (~real_positive).sum())
    draws = real[epoch_indices(len(real), epoch, rank, world, seed, weights)]
    batches = [draws[i:i + batch_size].tolist() for i in range(0, len(draws), batch_size)]
    pool = np.flatnonzero(synthetic)
    if not len(pool):
        return batches
    if synthetic_fraction is None:
        synthetic_fraction = len(pool) / (len(pool) + int(real_positive.sum()))
    if not 0.0 <= synthetic_fraction < 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1), got {synthetic_fraction}")
    ratio = synthetic_fraction / (1.0 - synthetic_fraction)
    rng = np.random.default_rng([seed, epoch, rank, 1])  # a stream of its own: the real draws stay as they are
    for batch in batches:
        wanted = ratio * int(positive[batch].sum())
        count = int(wanted) + int(rng.uniform() < wanted - int(wanted))
        batch.extend(pool[rng.integers(0, len(pool), count)].tolist())
    return batches


def _mean_across_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def train_epochs(
    *,
    ctx: RunContext,
    loop: TrainLoopConfig,
    models: Mapping[str, nn.Module],
    parameters: Sequence[nn.Parameter],
    dataset: torch.utils.data.Dataset,
    step_fn: Callable[[Any], Mapping[str, torch.Tensor]],
    validate_fn: Callable[[], dict[str, float]] | None = None,
    collate_fn: Callable | None = None,
    sample_weights: np.ndarray | None = None,
    batch_plan: Callable[[int, int, int], list[list[int]]] | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``parameters`` by ``step_fn`` over ``dataset``; checkpoint ``models``; resume if possible.

    Args:
        ctx: the run context (:func:`engine.training.distributed.run_context`).
        loop: epochs, batch size, optimizer settings.
        models: what a checkpoint holds, by name (prepared/DDP-wrapped modules are fine).
        parameters: the parameters the optimizer updates (frozen parts are left out).
        dataset: map-style dataset; ``dataset.set_epoch(e)`` is called when it exists.
        step_fn: ``batch -> {"loss": scalar tensor, other scalars...}`` (forward only).
        validate_fn: called on rank 0 at every epoch end; its metrics are reported with ``val_`` keys as given.
        collate_fn: DataLoader collate function.
        sample_weights: per-sample draw weights (class balance); None for plain shuffling.
        batch_plan: ``(epoch, rank, world) -> batches`` (lists of sample indices), instead of the
            sampling above (e.g. :func:`paired_batches`); a resumed epoch skips the batches done.
        config: json config stored in every checkpoint.

    Returns:
        The last reported metrics (rank 0's validation metrics included).
    """
    rank, world, device = worker_context()
    optimizer = torch.optim.AdamW(list(parameters), lr=loop.lr, weight_decay=loop.weight_decay)
    state = restore(models, {"optimizer": optimizer}) or {}
    step = int(state.get("step", 0))
    epoch = int(state.get("epoch", 0))
    skip = int(state.get("batch_in_epoch", 0))
    every = ctx.train.checkpoint_every_steps
    metrics: dict[str, Any] = dict(state.get("metrics", {}))
    stop = loop.max_steps and step >= loop.max_steps
    steps_per_epoch = (len(batch_plan(0, rank, world)) if batch_plan is not None
                       else math.ceil(math.ceil(len(dataset) / world) / loop.batch_size))
    total_steps = loop.epochs * steps_per_epoch
    if loop.max_steps:
        total_steps = min(total_steps, loop.max_steps)

    def checkpoint(values: dict[str, Any], batch_in_epoch: int, epoch_now: int) -> None:
        report(values, models=models, optimizers={"optimizer": optimizer}, config=config, checkpoint=True,
               state={"step": step, "epoch": epoch_now, "batch_in_epoch": batch_in_epoch, "metrics": values})

    while epoch < loop.epochs and not stop:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if batch_plan is not None:
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_plan(epoch, rank, world)[skip:],
                                                 collate_fn=collate_fn)
        else:
            indices = epoch_indices(len(dataset), epoch, rank, world, loop.seed, sample_weights)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=loop.batch_size, sampler=indices[skip * loop.batch_size:], collate_fn=collate_fn
            )
        for model in models.values():
            model.train()
        sums: dict[str, float] = {}
        seen, started = 0, time.perf_counter()
        batch_in_epoch = skip
        for batch in loader:
            with autocast(ctx.train, device):
                losses = step_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if loop.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(parameters), loop.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(loop, step, total_steps)
            optimizer.step()
            step += 1
            batch_in_epoch += 1
            seen += len(next(iter(batch.values()))) if isinstance(batch, Mapping) else loop.batch_size
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach() if isinstance(value, torch.Tensor) else value)
            stop = bool(loop.max_steps and step >= loop.max_steps)
            if step % every == 0 and not stop:
                values = _mean_across_ranks({k: v / batch_in_epoch for k, v in sums.items()}, world)
                checkpoint({**values, "step": step, "epoch": epoch}, batch_in_epoch, epoch)
            if stop:
                break
        skip = 0
        n_batches = max(batch_in_epoch, 1)
        metrics = _mean_across_ranks({k: v / n_batches for k, v in sums.items()}, world)
        metrics["samples_per_s"] = seen * world / max(time.perf_counter() - started, 1e-9)
        epoch += 1
        metrics.update(step=step, epoch=epoch)
        if validate_fn is not None and rank == 0:
            for model in models.values():
                model.eval()
            metrics.update(validate_fn())
        checkpoint(metrics, 0, epoch)
    return metrics
