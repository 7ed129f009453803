"""Does the downstream model see scar? The reward model and downstream variants trained on the same
phantom train patients, scored on the same test patients, with the wall time each took.

For each model: test scar Dice (over positive slices), myocardium Dice (labels 2-4, over slices
holding myocardium), patient AUROC of the largest scar component inside the predicted myocardium,
each with its 95% patient-level bootstrap interval (engine.evaluation.stats, seeds averaged inside each
resample), and each model's paired difference to the first (the reward model unless ``--no-reward``).

    python benchmarks/bench_downstream.py --out /tmp/bd --patients 100 \\
        --variant plain downstream.model.full_resolution_channels=0 \\
        --variant fullres downstream.model.full_resolution_channels=16

Every run lives in ``<out>/<name>/`` (seed 0) or ``<out>/<name>-s<seed>/`` (a re-run reuses a finished model: delete its folder to train
it again); the cohort in ``<out>/cohort``. ``--config`` (default configs/phantom.yaml) sizes the
models; ``--set key=value`` applies to every run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("dice", "myocardium_dice", "auroc", "balanced_accuracy")


class _RewardAsDownstream:
    """The reward model with the downstream model's input range ([0, 1] -> its [-1, 1])."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        from engine.training.segmentation import to_model_range

        return self.model(to_model_range(x, "-1,1"))


def _lgesynth(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine.cli", *args], check=True, cwd=ROOT)
    return time.perf_counter() - started


def _records(model, parts, threshold_fallback: float = 10.0) -> dict:
    """Per test patient, what engine.evaluation.stats resamples; the detection threshold calibrated on
    the validation patients."""
    from engine.evaluation.gates import calibrate_detection
    from engine.training.data import patients_in
    from engine.training.downstream import patient_records, patient_scores, predict_masks

    threshold = calibrate_detection(patient_scores(predict_masks(model, parts["val"], "cpu"), parts["val"]),
                                    patients_in(parts["val"]), threshold_fallback)
    return patient_records(predict_masks(model, parts["test"], "cpu"), parts["test"], threshold)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", default=str(ROOT / "configs" / "phantom.yaml"))
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--no-reward", action="store_true", help="skip the reward model")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a downstream variant: its name, then its overrides")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (<stage>.loop.seed) of every model; seeds are averaged inside each "
                             "bootstrap resample of the test patients")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from engine.config import load_config
    from engine.evaluation.stats import PatientScores, paired_difference, summary
    from engine.settings import EngineConfig
    from engine.models.reward import RewardModelConfig, build_reward_model
    from engine.training.checkpoint import load_model_weights, read_model_config
    from engine.training.downstream import load_downstream
    from engine.training.prepare import prepare_arrays

    torch.set_num_threads(2)
    cohort = args.out / "cohort"
    if not (cohort / "manifest.json").is_file():
        _lgesynth("phantom", str(cohort), "--patients", str(args.patients), "--seed", "0", f"image_size={args.image_size}")
    common = [f"cohort.root={cohort}", *args.set]
    results, scored = {}, {}
    runs = ([] if args.no_reward else [("reward", "reward", [])]) + [(v[0], "downstream", v[1:]) for v in args.variant]
    for name, stage, overrides in runs:
        seed_runs, seconds_all = [], []
        for seed in args.seeds:
            run_dir = args.out / (name if seed == 0 else f"{name}-s{seed}")
            config_overrides = [f"run_dir={run_dir}", *common, *overrides, f"{stage}.loop.seed={seed}"]
            exported = run_dir / stage / f"{stage}.json"
            if not exported.is_file():
                seconds = _lgesynth("train", stage, "--config", args.config, *config_overrides)
                (run_dir / "seconds.json").write_text(json.dumps({"train_seconds": seconds}))
            seconds_all.append(json.loads((run_dir / "seconds.json").read_text())["train_seconds"])
            cfg = load_config(EngineConfig, args.config, config_overrides)
            parts, _ = prepare_arrays(cfg)
            if stage == "reward":
                record = read_model_config(run_dir / "reward", "reward")
                net = build_reward_model(RewardModelConfig.from_dict(record["model"]))
                load_model_weights(run_dir / "reward", "reward", net)
                model = _RewardAsDownstream(net.eval())
            else:
                model, _ = load_downstream(run_dir / "downstream")
            seed_runs.append({"seed": seed, "patients": _records(model, parts)})
        scored[name] = PatientScores.from_runs(seed_runs)
        results[name] = {"train_seconds": [round(x, 1) for x in seconds_all], "seeds": list(args.seeds),
                         "test_patients": len(set(parts["test"].patient_id)),
                         **summary(scored[name], METRICS, n_resamples=2000)}
        if name != runs[0][0]:
            results[name]["vs_" + runs[0][0]] = paired_difference(scored[name], scored[runs[0][0]], METRICS,
                                                                  n_resamples=2000)
        entry = results[name]
        print(f"{name}: {np.mean(entry['train_seconds']):.0f} s a seed; test " + ", ".join(
            f"{k} {entry[k]['mean']:.3f} [{entry[k]['ci95'][0]:.3f}, {entry[k]['ci95'][1]:.3f}]" for k in METRICS),
            flush=True)
        for k, d in entry.get("vs_" + runs[0][0], {}).items():
            print(f"    {k} vs {runs[0][0]}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", flush=True)
    (args.out / "bench_downstream.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
