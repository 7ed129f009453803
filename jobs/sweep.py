"""Ray job entrypoint: the Ray Tune sweep of a run's synthetic sample counts x filter thresholds (the
same as `lgesynth sweep`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py --config configs/paper.yaml [key=value ...]

Inside a submitted job RAY_ADDRESS is set, so the trials and their Ray Train workers run on the
cluster it was submitted to. Submitting the job again resumes the experiment in
<run_dir>/sweeps/<sweep.name>: finished trials are kept, unfinished and failed ones run.
"""

import argparse
import sys

from engine.cli import main as cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sweep synthetic sample counts x filter thresholds on Ray Tune.")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. sweep.seeds=[0,1,2]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(["sweep", "--config", args.config, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
