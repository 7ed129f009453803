"""Ray job entrypoint: train the vae model of a run (the same as `lgesynth train vae`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train_vae.py --config configs/paper.yaml [key=value ...]

Inside a submitted job RAY_ADDRESS is set, so the trainer joins the cluster it runs on; submitting
the same job again continues from the run's latest checkpoint.
"""

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "vae", *sys.argv[1:]]))
