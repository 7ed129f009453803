"""``lgesynth evaluate``: the three gates for real-only and every configured method, in one harness.

For each method the run's synthesis settings are reused with only the method and the store changed
(the run's own store for its own method, ``<run_dir>/evaluation/<method>.zarr`` for the others):
the same plan, scar masks, captions, noise seeds, filter and threshold. The downstream models are
trained on the train patients (real only, or with N kept samples of a method) for every seed,
calibrated on the validation patients and tested on the test patients; the test patients are read
here (realism by default, utility) and by no training or sweep. The downstream runs are Ray Tune
trials (engine.evaluation.sweep: the same trial function and run names as ``lgesynth sweep``, so a
model trained by one is scored, not retrained, by the other), several at once where the cluster
holds them. Re-running continues: complete stores and finished downstream runs are reused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from engine.evaluation.gates import (
    ratio_distance,
    real_positive_reference,
    realism,
    realism_items,
    store_alignment,
    store_ratios,
)
from engine.evaluation.metrics import scar_intensity_ratios

UTILITY_KEYS = ("dice", "dice_tp", "myocardium_dice", "auroc", "accuracy", "balanced_accuracy")
COMPARED_KEYS = ("balanced_accuracy", "auroc", "dice")  # each method vs real only and vs paste


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


def utility_runs(cfg, parts, grid: list[dict[str, Any]], log) -> dict[str, list[dict[str, Any]]]:
    """The downstream runs of ``grid`` (sweep settings: real only, and method x store threshold x n)
    for every evaluation seed, as Ray Tune trials (several train at once where the cluster holds
    them); each calibrated on the validation patients and scored on the test patients. Runs by
    setting label, each run as :func:`engine.evaluation.gates.score_downstream` reports it plus
    ``seed``, ``n_synthetic`` and ``seconds``. Models already trained under the same config (by an
    earlier evaluation or a sweep) are scored, not trained again."""
    import shutil
    import uuid

    from engine.evaluation.sweep import run_trials, setting_label, store_selection

    stores = store_selection(cfg, grid)
    out_dir = Path(cfg.run_dir) / "evaluation" / "utility"
    shutil.rmtree(out_dir, ignore_errors=True)  # Tune's bookkeeping only: the models are runs of their own
    trials, errors = run_trials(cfg, parts, stores, grid, list(cfg.evaluation.seeds), out_dir, call=uuid.uuid4().hex,
                                score_on="test", log=log)
    if errors:
        raise RuntimeError("evaluate: downstream run(s) failed: " + "; ".join(
            f"{setting_label(e)} seed {e['seed']}: {e['error']} ({e['path']})" for e in errors))
    runs: dict[str, list[dict[str, Any]]] = {}
    for trial in sorted(trials, key=lambda t: t["seed"]):
        run = {key: trial[key] for key in (*UTILITY_KEYS, "collapsed", "detection_min_mm2", "seconds", "run")}
        run.update(seed=int(trial["seed"]), n_synthetic=int(trial["n_used"]), patients=int(trial["test_patients"]),
                   confusion=[int(trial[k]) for k in ("tn", "fp", "fn", "tp")])
        runs.setdefault(setting_label(trial), []).append(run)
        log(f"evaluate: {run['run']}: balanced accuracy {run['balanced_accuracy']:.3f}, Dice {run['dice']:.3f}, "
            f"[TN, FP, FN, TP] = {run['confusion']}" + (" (collapsed)" if run["collapsed"] else ""))
    return runs


def patient_scores(run_dir: str | Path, runs: list[dict[str, Any]], split: str = "test"):
    """The per-patient records of an arm's downstream runs (one per seed), as written beside each
    model by its trial (:data:`engine.evaluation.sweep.PATIENTS_FILE`)."""
    from engine.evaluation.sweep import PATIENTS_FILE
    from engine.evaluation.stats import PatientScores

    loaded = []
    for run in runs:
        path = Path(run_dir) / run["run"] / PATIENTS_FILE.format(split=split)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the per-patient records of downstream run {run['run']} are missing; "
                                    "delete that run's folder and evaluate again to score it")
        loaded.append({"seed": run["seed"], "patients": json.loads(path.read_text())})
    return PatientScores.from_runs(loaded)


def summarize_utility(runs: list[dict[str, Any]], scores, resamples: int, seed: int) -> dict[str, Any]:
    """An arm's utility: each metric's mean and SD over seeds with its patient-level bootstrap
    interval (:func:`engine.evaluation.stats.summary`), the runs, and how many collapsed."""
    from engine.evaluation.stats import summary

    return {"runs": runs, **summary(scores, UTILITY_KEYS, n_resamples=resamples, seed=seed),
            "patients": len(scores.patients), "collapsed": sum(bool(r["collapsed"]) for r in runs)}


def compare_arms(result: dict[str, Any], scores: dict[str, Any], resamples: int, seed: int) -> None:
    """Each method's paired differences (:func:`engine.evaluation.stats.paired_difference`) against
    real only (``utility.vs_real_only``) and against the paste control (``utility.vs_paste``), for
    balanced accuracy, AUROC and Dice, in place."""
    from engine.evaluation.stats import paired_difference

    for method, entry in result["methods"].items():
        if method not in scores:
            continue
        util = entry["utility"]
        util["vs_real_only"] = paired_difference(scores[method], scores[REAL_ONLY], COMPARED_KEYS, resamples, seed,
                                                 what=f"{method} vs real only")
        if method != "paste" and "paste" in scores:
            util["vs_paste"] = paired_difference(scores[method], scores["paste"], COMPARED_KEYS, resamples, seed,
                                                 what=f"{method} vs paste")


REAL_ONLY = "real only"


def evaluate(cfg, *, sequential: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three gates (see the module docstring); the result dict, also written as the report.

    Args:
        sequential: make the method stores with the sequential loop instead of Ray Data (tests,
            debugging); the downstream models always train on Ray Train.
    """
    from engine.evaluation.report import verdict, write_report
    from engine.evaluation.sweep import REAL, absolute_paths, setting_label
    from engine.synthesis.methods import method_actor
    from engine.synthesis.pipeline import SynthesisJob, synthesize
    from engine.training.prepare import prepare_arrays

    cfg = absolute_paths(cfg)  # the downstream runs train in Tune trials, in other working directories
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
    # how scar looks against blood pool and remote myocardium: the real positive slices, then each method's kept samples
    real_split = parts[ev.realism_split]
    ratios = {"real": scar_intensity_ratios(real_split.image[:, 0], real_split.label)}
    result["real_scar_appearance"] = ratio_distance(ratios["real"], ratios["real"])
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
        ratios[method] = store_ratios(job.url, cfg.synthesis.storage_options)
        entry["scar_appearance"] = ratio_distance(ratios[method], ratios["real"])
        result["methods"][method] = entry
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
        entry["setting"] = {"method": method, "threshold": float(threshold), "n": int(n)}
    grid = [{"method": REAL, "threshold": None, "n": 0},
            *(e["setting"] for e in result["methods"].values() if "setting" in e)]
    runs = utility_runs(cfg, parts, grid, log)
    boot = {"resamples": ev.bootstrap_resamples, "seed": ev.bootstrap_seed}
    scores = {REAL_ONLY: patient_scores(cfg.run_dir, runs[setting_label(grid[0])])}
    result["real_only"] = {"utility": summarize_utility(runs[setting_label(grid[0])], scores[REAL_ONLY], **boot)}
    for method, entry in result["methods"].items():
        if "setting" in entry:
            arm = runs[setting_label(entry.pop("setting"))]
            scores[method] = patient_scores(cfg.run_dir, arm)
            entry["utility"] = summarize_utility(arm, scores[method], **boot)
    compare_arms(result, scores, **boot)
    result["bootstrap"] = {**boot, "unit": "test patient", "stratified": True, "interval": "95% percentile"}
    result["seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(ev.report_dir or Path(cfg.run_dir) / "reports")
    result["verdict"] = verdict(result)
    result["report"] = write_report(result, out_dir, storage_options=cfg.synthesis.storage_options,
                                    realism_real=real_images, realism_scars=real_scars, ratios=ratios)
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
