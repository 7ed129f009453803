"""Training throughput (samples/s) of each model with 1 and 2 Ray Train workers, on a phantom cohort.

Each measurement is a fresh run (its own run_dir) of ``epochs`` epochs; samples/s is the last
epoch's figure reported by rank 0 (all ranks' samples over the epoch's wall time, data loading and
augmentation included, start-up excluded). Prints the 2-worker / 1-worker ratio per model.

Usage: python benchmarks/bench_training.py [--stages reward downstream] [--patients 24] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["reward", "vae", "generator", "downstream"],
                        choices=["reward", "vae", "generator", "downstream"], help="stages to measure")
    parser.add_argument("--patients", type=int, default=24, help="phantom patients (default 24)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2)")
    parser.add_argument("--config", default="configs/phantom.yaml", help="model sizes come from this config")
    args = parser.parse_args()

    from engine.config import load_config
    from engine.phantom import write_phantom_cohort
    from engine.phantom.config import PhantomConfig
    from engine.settings import EngineConfig
    from engine.models.untrained import export_untrained
    from engine.training.downstream import train_downstream
    from engine.training.generator import train_generator
    from engine.training.reward import train_reward
    from engine.training.vae import train_vae

    train = {"reward": train_reward, "vae": train_vae, "generator": train_generator, "downstream": train_downstream}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        cohort = Path(tmp) / "cohort"
        write_phantom_cohort(cohort, args.patients, seed=0, cfg=PhantomConfig(image_size=192))
        for stage in args.stages:
            rates = {}
            for workers in (1, 2):
                # the generator is measured in its ControlNet phase (diffusion + reward loss through the
                # VAE decoder and the reward model), on untrained reward and VAE exports
                epochs = ([f"{stage}.base.epochs=0", f"{stage}.controlnet.epochs={args.epochs}"] if stage == "generator"
                          else [f"{stage}.loop.epochs={args.epochs}"])
                cfg = load_config(EngineConfig, args.config, [
                    f"cohort.root={cohort}", f"run_dir={tmp}/{stage}-{workers}", *epochs,
                    f"{stage}.ray.num_workers={workers}", f"{stage}.ray.checkpoint_every_steps=100000",
                ])
                if stage == "generator":
                    export_untrained(cfg)
                rates[workers] = float(train[stage](cfg)["samples_per_s"])
                print(f"{stage}: {workers} worker(s): {rates[workers]:.1f} samples/s", flush=True)
            print(f"{stage}: 2 workers / 1 worker = {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
