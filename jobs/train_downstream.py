"""Ray job entrypoint: train the downstream model of a run (the same as `lgesynth train downstream`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_downstream.py --config configs/paper.yaml [key=value ...]

Inside a submitted job RAY_ADDRESS is set, so the trainer joins the cluster it runs on; submitting
the same job again continues from the run's latest checkpoint.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "downstream", *sys.argv[1:]]))
