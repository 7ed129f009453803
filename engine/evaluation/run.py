"""``lgesynth evaluate``: the three gates for real-only and every configured method, in one harness.

For each method the run's synthesis settings are reused with only the method and the store changed
(the run's own store for its own method, ``<run_dir>/evaluation/<method>.zarr`` for the others):
the same plan, scar masks, captions, noise seeds, filter and threshold. The downstream models are
trained on the train patients (real only, or with N kept samples of a method) for every seed,
calibrated on the validation patients and tested on the test patients; the test patients are read
here (realism by default, utility) and by no training or sweep. Re-running continues: complete
stores and finished downstream runs are reused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from engine.evaluation.gates import (
    mean_sd,
    real_positive_reference,
    realism,
    realism_items,
    store_alignment,
    score_downstream,
)

UTILITY_KEYS = ("dice", "dice_tp", "accuracy", "balanced_accuracy")


def method_config(cfg, method: str):
    """``cfg`` with the synthesis section pointed at ``method`` and its store: the run's own store
    (``lgesynth synthesize``) for the run's method at the run's size, else
    ``<run_dir>/evaluation/<method>.zarr``."""
    ev = cfg.evaluation
    if method == cfg.synthesis.method and not ev.candidates:
        return cfg
    root = str(cfg.run_dir).rstrip("/")
    store = f"{root}/evaluation/{method}.zarr"
    syn = dataclasses.replace(cfg.synthesis, method=method, store=store,
                              max_candidates=ev.candidates or cfg.synthesis.max_candidates)
    return dataclasses.replace(cfg, synthesis=syn)


def downstream_config(cfg, name: str, seed: int, synthetic: str = "", n: int = 0):
    stage = cfg.downstream
    loop = dataclasses.replace(stage.loop, seed=int(seed))
    return dataclasses.replace(cfg, downstream=dataclasses.replace(stage, name=name, synthetic=synthetic,
                                                                      n_synthetic=int(n), loop=loop))


def _utility_run(cfg, parts, name: str, seed: int, log, synthetic: str = "", n: int = 0) -> dict[str, Any]:
    from engine.training.downstream import train_downstream

    start = time.perf_counter()
    train_downstream(downstream_config(cfg, name, seed, synthetic, n))
    result = score_downstream(Path(cfg.run_dir) / name, parts["test"], parts["val"], cfg.evaluation.collapse_min_positive)
    result.update(seed=int(seed), n_synthetic=int(n), seconds=round(time.perf_counter() - start, 1))
    log(f"evaluate: {name}: balanced accuracy {result['balanced_accuracy']:.3f}, Dice {result['dice']:.3f}, "
        f"[TN, FP, FN, TP] = {result['confusion']}" + (" (collapsed)" if result["collapsed"] else ""))
    return result


def _summarize_utility(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"runs": runs, **{k: mean_sd([r[k] for r in runs]) for k in UTILITY_KEYS},
            "collapsed": sum(bool(r["collapsed"]) for r in runs)}


def evaluate(cfg, *, sequential: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three gates (see the module docstring); the result dict, also written as the report.

    Args:
        sequential: make the method stores with the sequential loop instead of Ray Data (tests,
            debugging); the downstream models always train on Ray Train.
    """
    from engine.evaluation.report import verdict, write_report
    from engine.synthesis.methods import method_actor
    from engine.synthesis.pipeline import SynthesisJob, synthesize
    from engine.training.prepare import prepare_arrays

    ev = cfg.evaluation
    parts, _ = prepare_arrays(cfg)
    for name in ("train", "test", ev.realism_split):
        if not len(parts[name]):
            raise ValueError(f"{cfg.cohort.root}: the {name} split has no slices; the evaluation needs train and test patients")
    threshold = cfg.synthesis.threshold
    started = time.perf_counter()
    result: dict[str, Any] = {"threshold": threshold, "seeds": list(ev.seeds), "n_synthetic": ev.n_synthetic,
                              "realism_split": ev.realism_split, "methods": {}}
    reward_folder = cfg.synthesis.reward_folder(cfg.run_dir)
    result["reference"] = real_positive_reference(reward_folder, parts[ev.realism_split], threshold)
    log(f"evaluate: reward model on real {ev.realism_split} positives: pass rate {result['reference']['pass_rate']:.1%} "
        f"(the paper: 35.6%)")
    has_positives = bool((parts[ev.realism_split].label >= 3).any())
    real_images = real_scars = None
    for method in ev.methods:
        mcfg = method_config(cfg, method)
        job = SynthesisJob(mcfg, parts)
        entry: dict[str, Any] = {"store": job.url}
        if has_positives:
            actor = method_actor(method)(**job.actor_args()[0])
            items = realism_items(parts[ev.realism_split], job.data_cfg, ev.realism_max)
            entry["realism"] = realism(actor, items, seed=cfg.synthesis.seed)
            real_images, real_scars = (items["image"][:, 0] + 1.0) / 2.0, items["scar"][:, 0] > 0
            log(f"evaluate: {method}: realism SSIM whole {entry['realism']['ssim_whole']['mean']:.3f}, "
                f"LV crop {entry['realism']['ssim_crop']['mean']:.3f} on {entry['realism']['slices']} slices")
        summary = synthesize(mcfg, sequential=sequential, log=log, parts=parts)
        entry["synthesis"] = {k: summary[k] for k in ("candidates", "made", "kept", "pass_rate")}
        entry["alignment"] = store_alignment(job.url, threshold, cfg.synthesis.storage_options)
        result["methods"][method] = entry
    real_runs = [_utility_run(cfg, parts, f"evaluation-real-s{seed}", seed, log) for seed in ev.seeds]
    result["real_only"] = {"utility": _summarize_utility(real_runs)}
    kept_by = {m: e["alignment"]["kept"] for m, e in result["methods"].items()}
    fewest = min([k for k in kept_by.values() if k > 0], default=0)
    for method, entry in result["methods"].items():
        kept = kept_by[method]
        n = min(ev.n_synthetic, kept, fewest if ev.equal_n else kept)
        if n == 0:
            entry["utility"] = None
            entry["utility_note"] = f"no kept sample (0 of {entry['alignment']['made']} passed): nothing to add"
            log(f"evaluate: {method}: {entry['utility_note']}")
            continue
        if n < min(ev.n_synthetic, kept):
            entry["utility_note"] = (f"{kept} kept, {n} added instead of {ev.n_synthetic}: every method adds the same "
                                     f"number, the fewest any method kept (evaluation.equal_n)")
        elif n < ev.n_synthetic:
            entry["utility_note"] = f"only {kept} kept: {n} added instead of {ev.n_synthetic}"
        # n in the name: a training run resumes by name, so another n must be another run
        runs = [_utility_run(cfg, parts, f"evaluation-{method}-n{n}-s{seed}", seed, log, entry["store"], n)
                for seed in ev.seeds]
        entry["utility"] = _summarize_utility(runs)
    result["seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(ev.report_dir or Path(cfg.run_dir) / "reports")
    result["verdict"] = verdict(result)
    result["report"] = write_report(result, out_dir, storage_options=cfg.synthesis.storage_options,
                                    realism_real=real_images, realism_scars=real_scars)
    log(f"evaluate: report in {out_dir} ({result['seconds']:.0f} s)")
    return result


def json_ready(obj: Any) -> Any:
    """``obj`` without numpy arrays (they go to the figures, not the JSON); numpy scalars as numbers."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None  # NaN: JSON has none
    return obj


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(json_ready(result), indent=1, sort_keys=True)
