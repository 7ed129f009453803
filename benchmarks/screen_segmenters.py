"""Screen segmentation recipes quickly: the reward model or a downstream variant trained in this
process (no Ray, no checkpoints) for a fixed number of optimizer steps on the phantom's train
patients, with the scar and myocardium Dice on the validation and test patients every 40 steps and
the training wall time.

A screen, not a result: one seed, slice-level Dice without intervals. It is for choosing which
variants `bench_downstream.py` should measure with seeds and patient-level intervals.

    python benchmarks/screen_segmenters.py --cohort /tmp/bd/cohort --config configs/demo.yaml \\
        '{"kind": "reward"}' '{"model": {"stem_stride": 1, "full_resolution_channels": 0}}'

Each spec is JSON: ``kind`` ("downstream", default, or "reward"), ``model`` (overrides of the
config's ``downstream.model``), ``steps`` (120), ``batch`` (32), ``lr`` (0.005), ``loss``
("dice_focal"), ``augment`` (false), ``seed`` (0). Two torch threads, the whole machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dice(net, arrays, input_range: str) -> tuple[float, float]:
    import numpy as np
    import torch

    from engine.evaluation.metrics import dice_per_sample
    from engine.training.segmentation import to_model_range

    net.eval()
    scar, myo = [], []
    with torch.no_grad():
        for start in range(0, len(arrays), 64):
            prob = torch.sigmoid(net(to_model_range(torch.tensor(arrays.image[start:start + 64]), input_range))).numpy()
            scar.append(prob[:, 0] > 0.5)
            myo.append(prob[:, 1] > 0.5)
    net.train()
    scar, myo = np.concatenate(scar), np.concatenate(myo)
    truth_scar, truth_myo = arrays.label >= 3, arrays.label >= 2
    pos = truth_scar.reshape(len(scar), -1).any(1)
    has_myo = truth_myo.reshape(len(myo), -1).any(1)
    return (round(float(dice_per_sample(scar[pos], truth_scar[pos]).mean()), 3),
            round(float(dice_per_sample(myo[has_myo], truth_myo[has_myo]).mean()), 3))


def screen(spec: dict, parts: dict, cfg) -> dict:
    import torch

    from engine.models.downstream import DownstreamModelConfig, build_downstream_model
    from engine.models.reward import build_reward_model, segmentation_loss, targets_from_label
    from engine.training.data import positive_weighted_sampler_weights
    from engine.training.datasets import SegmentationDataset, collate
    from engine.training.loop import TrainLoopConfig, epoch_indices, learning_rate
    from engine.training.segmentation import to_model_range

    steps, batch_size, lr, seed = spec.get("steps", 120), spec.get("batch", 32), spec.get("lr", 0.005), spec.get("seed", 0)
    torch.manual_seed(seed)
    if spec.get("kind", "downstream") == "reward":
        net, input_range = build_reward_model(cfg.reward.model), "-1,1"
    else:
        model = {**cfg.downstream.model.to_dict(), **spec.get("model", {})}
        net, input_range = build_downstream_model(DownstreamModelConfig.from_dict(model)), "0,1"
    loss_fn = segmentation_loss(spec.get("loss", "dice_focal"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    train = parts["train"]
    weights = positive_weighted_sampler_weights(train)
    dataset = SegmentationDataset(train, dataclasses.replace(cfg.data, augment=bool(spec.get("augment", False))),
                                  train=True, seed=seed)
    schedule = TrainLoopConfig(epochs=1, lr=lr, schedule="cosine")
    history, step, epoch, started = [], 0, 0, time.perf_counter()
    while step < steps:
        order = epoch_indices(len(train), epoch, 0, 1, seed, weights)
        dataset.set_epoch(epoch)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            if step >= steps:
                break
            batch = collate([dataset[i] for i in order[start:start + batch_size]])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(schedule, step, steps)
            logits = net(to_model_range(batch["image"], input_range)).float()
            loss = loss_fn(logits, targets_from_label(batch["label"], "scar+myocardium"))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 40 == 0:
                history.append({"step": step, "loss": round(loss.item(), 3), "val": _dice(net, parts["val"], input_range)})
        epoch += 1
    seconds = time.perf_counter() - started
    return {"spec": spec, "parameters": sum(p.numel() for p in net.parameters()), "train_seconds": round(seconds, 1),
            "history": history, "val": _dice(net, parts["val"], input_range),
            "test": _dice(net, parts["test"], input_range)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True, help="a phantom cohort (lgesynth phantom DIR ...)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--run-dir", default="", help="where the split is written (default: <cohort>/../screen)")
    parser.add_argument("specs", nargs="+", help="JSON specs, one per model to screen")
    args = parser.parse_args(argv)

    import torch

    from engine.config import load_config
    from engine.settings import EngineConfig
    from engine.training.prepare import prepare_arrays

    torch.set_num_threads(2)
    run_dir = args.run_dir or str(Path(args.cohort).resolve().parent / "screen")
    cfg = load_config(EngineConfig, args.config, [f"run_dir={run_dir}", f"cohort.root={args.cohort}"])
    parts, _ = prepare_arrays(cfg)
    for text in args.specs:
        print(json.dumps(screen(json.loads(text), parts, cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
