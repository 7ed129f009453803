"""Foundation timings: phantom cohort generation and per-slice anatomy.

Prints figures and their ratio to the goals of the foundation issue:
- phantom: 100 patients at 256x256 "in seconds" (goal here: <= 30 s generated, and written to NIfTI);
- anatomy per 256x256 slice (AHA segments + radial depth + caption): "well under 10 ms".

Usage: python benchmarks/bench_foundation.py [--patients 100] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100, help="phantom patients to generate (default 100)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    args = parser.parse_args()

    from engine.anatomy import aha_segments, caption, radial_depth, slice_levels
    from engine.phantom import generate_patient, write_phantom_cohort
    from engine.phantom.config import PhantomConfig

    cfg = PhantomConfig(image_size=args.size)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, numpy {np.__version__}")

    generate_patient(0, args.seed, cfg)  # numba compilation / cache load, not part of the figure
    start = time.perf_counter()
    patients = [generate_patient(i, args.seed, cfg) for i in range(args.patients)]
    gen_s = time.perf_counter() - start
    n_slices = sum(p.image.shape[0] for p in patients)
    print(f"phantom generate: {args.patients} patients ({n_slices} slices, {args.size}x{args.size}) in {gen_s:.2f} s "
          f"= {1e3 * gen_s / args.patients:.0f} ms/patient; goal 30 s, ratio goal/actual = {30.0 / gen_s:.1f}x")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_phantom_cohort(tmp, args.patients, seed=args.seed, cfg=cfg)
        write_s = time.perf_counter() - start
    print(f"phantom write (generate + NIfTI + manifest): {args.patients} patients in {write_s:.2f} s "
          f"= {1e3 * write_s / args.patients:.0f} ms/patient; goal 30 s, ratio goal/actual = {30.0 / write_s:.1f}x")

    slices = []
    for p in patients:
        for label, level in zip(p.label, slice_levels(p.label)):
            if level in ("basal", "mid", "apical"):
                slices.append((label, level))
    for label, level in slices[:20]:  # warm-up
        aha_segments(label, level), radial_depth(label), caption(label, level)
    timings = []
    for label, level in slices:
        t0 = time.perf_counter()
        aha_segments(label, level)
        radial_depth(label)
        caption(label, level)
        timings.append(time.perf_counter() - t0)
    ms = 1e3 * np.asarray(timings)
    print(f"anatomy per slice (segments + depth + caption), {len(ms)} slices {args.size}x{args.size}: "
          f"median {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms, max {ms.max():.2f} ms; "
          f"goal 10 ms, ratio goal/median = {10.0 / np.median(ms):.1f}x")


if __name__ == "__main__":
    main()
