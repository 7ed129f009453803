"""Ray job entrypoint: failure-targeted synthesis, rounds of synthesis -> downstream training ->
reweighting of the scar sampler toward what the model misses (the same as `lgesynth loop`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/loop.py --config configs/paper.yaml --rounds 3 [key=value ...]

Inside a submitted job RAY_ADDRESS is set, so synthesis (Ray Data) and the downstream trials (Ray
Tune) run on the cluster it was submitted to. Submitting the job again reuses the complete round
stores and finished downstream models in <run_dir>/loop/<loop.name>.
"""

import argparse
import sys

from engine.cli import main as cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Failure-targeted synthesis: steer the scar sampler toward the model's misses.")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/paper.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: loop.rounds)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. loop.seeds=[0,1,2]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = [] if args.rounds is None else ["--rounds", str(args.rounds)]
    return cli(["loop", "--config", args.config, *rounds, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
