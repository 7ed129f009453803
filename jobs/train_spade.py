"""Ray job entrypoint: train a SPADE baseline of a run (the same as `lgesynth train spade-fc|spade-lc`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_spade.py --config configs/paper.yaml --context limited [key=value ...]

Inside a submitted job RAY_ADDRESS is set, so the trainer joins the cluster it runs on; submitting
the same job again continues from the run's latest checkpoint.
"""

import argparse
import sys

from engine.cli import main as cli

STAGE = {"full": "spade-fc", "limited": "spade-lc"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a SPADE baseline (SPADE-FC or SPADE-LC) of a run on Ray Train.")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/paper.yaml")
    parser.add_argument("--context", choices=sorted(STAGE), default="full",
                        help="full: SPADE-FC, exported to <run_dir>/spade-fc; limited: SPADE-LC, to <run_dir>/spade-lc "
                             "(default full)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli(["train", STAGE[args.context], "--config", args.config, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
