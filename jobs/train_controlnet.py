"""Ray job entrypoint: train the ControlNet baselines' model of a run (the same as `lgesynth train controlnet`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_controlnet.py --config configs/paper.yaml [key=value ...]

One model serves both synthesis methods, `controlnet` and `controlnet-template`; it is exported to
<run_dir>/controlnet. Inside a submitted job RAY_ADDRESS is set, so the trainer joins the cluster it
runs on; submitting the same job again continues from the run's latest checkpoint.
"""

import argparse
import sys

from engine.cli import main as cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the ControlNet baselines' model (ControlNet, ControlNet with template guidance) of a run "
                    "on Ray Train.")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. controlnet_baseline.loop.epochs=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(["train", "controlnet", "--config", args.config, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
