"""Ray job entrypoint: stream a run's synthetic candidates into its Zarr store (the same as
`lgesynth synthesize`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/synthesize.py --config configs/paper.yaml synthesis.store=s3://bucket/run/synthetic.zarr

Inside a submitted job RAY_ADDRESS is set, so the pipeline runs on the cluster it was submitted to.
Credentials for object storage come from the workers' environment (or the cloud's provider chain),
never from the config. Submitting the job again after a failure makes only the missing candidates.
"""

import argparse
import sys

from engine.cli import main as cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stream synthetic candidates into the run's Zarr store (Ray Data).")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/paper.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. synthesis.store=s3://...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(["synthesize", "--config", args.config, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
