"""``lgesynth sweep``: what synthetic samples are worth as a function of how many are added and how
strictly they were filtered, on Ray Tune (DESIGN.md "sweep"; the paper's 300/500/1000/1500 rows).

One Tune trial per (method, filter threshold, sample count) setting and downstream seed; the
real-only baseline (sample count 0) is one setting, not one per threshold or method. A trial is a
Tune function trainable that drives one Ray Train run, Ray's documented Train V2 + Tune pattern
(``TorchTrainer.fit`` inside the trial): it draws ``n`` samples whose Dice > threshold from the
method's store, trains the downstream model on the real train patients plus those samples
(:func:`engine.training.downstream.train_downstream`), scores it on the validation patients with
the patient detection threshold calibrated on the real train patients, and reports the final
metrics with ``ray.tune.report``. The test patients are dropped as soon as the run's split is
fixed: no sweep metric, calibration or choice sees them (they are ``lgesynth evaluate``'s).

Everything lives in ``<run_dir>/sweeps/<name>/``: Tune's experiment (state, per-trial CSV/JSON/
TensorBoard logs) and the sweep's outputs, ``results.csv``, ``results.md``, ``roi.png`` and
``sweep.json``. Re-running the same command restores the experiment (``Tuner.restore``): finished
trials are not run again, unfinished and errored ones are. A changed grid, downstream config or
store is refused (choose another ``sweep.name``): its trials would not compare with the stored ones.

Trial resources. A trial only drives its Ray Train run, whose workers reserve their own resources,
so by default it reserves no CPU. Ray Tune refuses a request of nothing at all ("Cannot initialize
a ResourceRequest with an empty head and zero worker bundles"), so it reserves a little logical
memory instead (``trial_memory_mb``). Even a small CPU fraction would cost a worker slot on its
node: on one-CPU nodes, two trials holding 0.01 CPU on two nodes leave no room for any one-CPU
worker, and both wait forever. With ``downstream.ray.num_workers: 0`` the model trains inside the
trial's own process (Ray Train's local mode, no controller or worker actors to start: about 15 s a
run saved on two CPU cores, which is what the demo uses), and the trial reserves that worker's CPUs
(and GPU) itself.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engine.config import config_changes

REAL = "real"  # the method name of the real-only baseline setting
RESULT_KEYS = ("balanced_accuracy", "auroc", "dice", "dice_tp", "myocardium_dice", "accuracy")
TRIAL_KEYS = (*RESULT_KEYS, "collapsed", "n_used", "n_available", "short", "tn", "fp", "fn", "tp", "run",
              "val_patients", "detection_calibrated_on_train", "test_patients", "detection_calibrated_on_val",
              "detection_min_mm2", "scored_on", "seconds", "call")
PATIENTS_FILE = "patients_{split}.json"  # in a downstream run's folder: the per-patient records it was scored on
SETTINGS_FILE = "sweep_settings.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class SweepConfig:
    """``lgesynth sweep``.

    Args:
        methods: synthesis methods whose stores are swept (:mod:`engine.synthesis.methods`); a
            method's store is the one ``lgesynth evaluate`` uses (the run's own for the run's method).
        n_synthetic: synthetic sample counts added to the real training slices; 0 is the real-only
            baseline, run once (not once per threshold or method).
        thresholds: filter thresholds: a trial draws from the samples with Dice > threshold. One
            below the store's own ``synthesis.threshold`` needs a store written with
            ``synthesis.keep_rejected=true`` (else the sweep refuses before any trial starts).
        seeds: downstream training seeds (mean and SD over them).
        name: the experiment's folder, ``<run_dir>/sweeps/<name>``; the same name resumes.
        max_concurrent_trials: trials (Ray Train runs) at once; 0: as many as the cluster's nodes can
            hold the downstream stage's workers (``downstream.ray``) for, never fewer than one.
        trial_cpus: CPUs each trial's driver (the Tune function) reserves; its Train workers reserve
            their own. 0 (default): none, see the module docstring.
        trial_memory_mb: logical memory each trial's driver reserves (it holds the train and
            validation slices and scores the model); with ``trial_cpus`` 0 it must be > 0.
        mlflow: MLflow tracking URI to log the trials to as well (empty: off; needs ``mlflow``).

    Example:
        >>> SweepConfig(n_synthetic=[0, 30, 60], thresholds=[0.6, 0.7], seeds=[0]).name
        'sweep'
    """

    methods: list[str] = field(default_factory=lambda: ["lgesynthnet"])
    n_synthetic: list[int] = field(default_factory=lambda: [0, 300, 500, 1000, 1500])
    thresholds: list[float] = field(default_factory=lambda: [0.6])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    name: str = "sweep"
    max_concurrent_trials: int = 0
    trial_cpus: float = 0.0
    trial_memory_mb: int = 512
    mlflow: str = ""

    def __post_init__(self) -> None:
        from engine.synthesis.methods import METHODS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}, got {self.methods}")
        if not self.n_synthetic or len(set(self.n_synthetic)) != len(self.n_synthetic) or min(self.n_synthetic) < 0:
            raise ValueError(f"n_synthetic must be distinct integers >= 0 (0: real only), got {self.n_synthetic}")
        if not self.thresholds or len(set(self.thresholds)) != len(self.thresholds) or \
                any(not -1.0 <= t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be distinct values in [-1, 1) (Dice > threshold), got {self.thresholds}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name must be a folder name (letters, digits, '.', '_', '-'), got {self.name!r}")
        for name in ("max_concurrent_trials", "trial_cpus", "trial_memory_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.trial_cpus == 0 and self.trial_memory_mb == 0:
            raise ValueError("trial_cpus and trial_memory_mb are both 0: Ray Tune cannot place a trial that reserves "
                             "nothing; keep trial_memory_mb > 0 (the default) or give trial_cpus")


# ---------------------------------------------------------------------------------------------------
# the grid


def sweep_grid(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The settings, one per trial and seed: the real-only baseline ``{"method": "real",
    "threshold": None, "n": 0}`` once (when 0 is among the counts), then every (method, threshold,
    count > 0) in config order with counts ascending."""
    settings: list[dict[str, Any]] = []
    if 0 in sweep.n_synthetic:
        settings.append({"method": REAL, "threshold": None, "n": 0})
    counts = sorted(int(n) for n in sweep.n_synthetic if n > 0)
    for method in sweep.methods:
        for threshold in sweep.thresholds:
            settings += [{"method": method, "threshold": float(threshold), "n": n} for n in counts]
    return settings


def setting_label(setting: Mapping[str, Any]) -> str:
    """``real-n0`` or ``<method>-t<threshold>-n<n>``."""
    if setting["method"] == REAL:
        return f"{REAL}-n0"
    return f"{setting['method']}-t{setting['threshold']:g}-n{setting['n']}"


def run_name(setting: Mapping[str, Any], seed: int, n_used: int | None = None, store: str = "") -> str:
    """The downstream run of a setting and seed (``<run_dir>/<name>/``): method, ``store`` (a short
    tag of the store the samples come from, :func:`store_tag`), threshold, the count of samples it
    trains with (``n_used`` when fewer than asked were available) and seed. The name says what the
    model was trained on and nothing else, so ``lgesynth evaluate`` and every sweep of the run share
    a trained model instead of training it again (a finished run is not started again; one of the
    same name under another downstream config is refused)."""
    used = setting["n"] if n_used is None else n_used
    label = setting_label({**setting, "n": used})
    if store and used:
        method = setting["method"]
        label = f"{method}-{store}{label[len(method):]}"
    return f"downstream-{label}-s{seed}"


def store_tag(store: Mapping[str, Any]) -> str:
    """8 hex digits naming a store in run names: its fingerprint (plan, config, checkpoints), else its URL."""
    import hashlib

    return str(store.get("fingerprint") or hashlib.sha256(str(store["url"]).encode()).hexdigest())[:8]


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: its setting and seed (the default would spell out the whole config)."""
    return f"{setting_label(trial.config['setting'])}-s{trial.config['seed']}-{trial.trial_id}"


def _threshold_key(threshold: float) -> str:
    return format(float(threshold), "g")


# ---------------------------------------------------------------------------------------------------
# stores, paths, resources


def method_store(cfg, method: str) -> str:
    """The store of ``method``: the one ``lgesynth evaluate`` makes and reads for it."""
    from engine.evaluation.run import method_config

    return method_config(cfg, method).synthesis.store_url(cfg.run_dir)


def store_selection(cfg, grid: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For every method the grid adds samples of: its store URL and fingerprint, and how many
    samples each of its thresholds selects (:func:`engine.synthesis.store.select_samples`).

    Raises:
        ValueError: a store is missing or incomplete, or a threshold it cannot serve (below its
            own, without ``keep_rejected``) is asked for; before any trial starts.
    """
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(s["method"] for s in grid if s["n"]):
        thresholds = list(dict.fromkeys(s["threshold"] for s in grid if s["method"] == method and s["n"]))
        out[method] = store_entry(method_store(cfg, method), method, thresholds, cfg.synthesis.storage_options)
    return out


def store_entry(url: str, method: str, thresholds: Sequence[float],
                storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A complete store of ``method`` as trials read it: URL, fingerprint, its own threshold and
    ``keep_rejected``, and how many samples each of ``thresholds`` selects."""
    from engine.synthesis.store import open_store, select_samples, store_attrs, store_exists

    if not store_exists(url, storage_options):
        raise ValueError(f"{url}: no store of method {method!r}; make it first (`lgesynth synthesize` for the "
                         "run's own method, `lgesynth evaluate` for the others)")
    group = open_store(url, "r", storage_options)
    attrs = store_attrs(group)
    if not attrs.get("complete"):
        raise ValueError(f"{url}: the store of method {method!r} is incomplete; re-run the command that makes it")
    # stores of the generator written before methods existed record none
    made_by = attrs.get("content", {}).get("synthesis", {}).get("method", "lgesynthnet")
    if made_by != method:
        raise ValueError(f"{url}: the store was made by method {made_by!r}, the sweep asks for {method!r} "
                         "(synthesis.method names the run's own store's method)")
    return {"url": url, "fingerprint": attrs.get("fingerprint"),
            "threshold": attrs.get("config", {}).get("threshold"),
            "keep_rejected": bool(attrs.get("config", {}).get("keep_rejected", False)),
            "available": {_threshold_key(t): int(len(select_samples(group, t, url))) for t in thresholds}}


def absolute_paths(cfg):
    """``cfg`` with every local path absolute (URLs kept): Tune runs each trial in its own working
    directory, and the Train workers anywhere."""

    def local(path: str) -> str:
        return path if not path or "://" in str(path) else os.path.abspath(path)

    syn, ds = cfg.synthesis, cfg.downstream
    syn_paths = {name: local(getattr(syn, name)) for name in ("store", "generator", "reward", "spade", "controlnet") if hasattr(syn, name)}
    return dataclasses.replace(
        cfg, run_dir=local(cfg.run_dir), cohort=dataclasses.replace(cfg.cohort, root=local(cfg.cohort.root)),
        synthesis=dataclasses.replace(syn, **syn_paths),
        vae=dataclasses.replace(cfg.vae, pretrained=local(cfg.vae.pretrained)),
        downstream=dataclasses.replace(ds, synthetic=local(ds.synthetic),
                                       ray=dataclasses.replace(ds.ray, storage_path=local(ds.ray.storage_path))),
        evaluation=dataclasses.replace(cfg.evaluation, report_dir=local(cfg.evaluation.report_dir),
                                       test_cohort=local(cfg.evaluation.test_cohort)),
    )


def trial_resources(sweep: SweepConfig, train=None) -> dict[str, float]:
    """What each trial reserves (``tune.with_resources``); zero entries are dropped by Tune. When the
    downstream model trains in the trial's own process (``train.num_workers`` 0), the trial holds
    that worker's resources too."""
    resources = {"cpu": float(sweep.trial_cpus), "memory": float(sweep.trial_memory_mb) * 1024**2}
    if train is not None and not train.num_workers:
        resources["cpu"] = max(resources["cpu"], float(train.cpus_per_worker))
        if train.use_gpu:
            resources["gpu"] = float(train.gpus_per_worker)
    return resources


def max_concurrent_trials(train, sweep: SweepConfig, nodes: Sequence[Mapping[str, float]]) -> int:
    """Trials that can train at once: worker slots of ``train`` (a RayTrainConfig) over the nodes'
    resources, divided by the workers a trial needs; a trial driver holding CPUs may cost a slot on
    its node, so it counts as that many workers more.

    Raises:
        InsufficientResourcesError: not even one trial fits (unless ``train.check_resources`` is off,
            an autoscaling cluster: then 1).
    """
    from engine.training.distributed import InsufficientResourcesError

    need = train.resources_per_worker
    slots = sum(min(math.floor(node.get(key, 0.0) / amount + 1e-9) for key, amount in need.items()) for node in nodes)
    driver = math.ceil(sweep.trial_cpus / train.cpus_per_worker - 1e-9) if sweep.trial_cpus > 0 else 0
    # a trial that trains in its own process (num_workers 0) is one worker, whatever its driver holds
    count = slots // (train.num_workers + driver) if train.num_workers else slots
    if count >= 1:
        return int(count)
    if not train.check_resources:
        return 1
    wanted = ", ".join(f"{key} {amount:g}" for key, amount in need.items())
    raise InsufficientResourcesError(
        f"the Ray cluster cannot hold one sweep trial: {train.num_workers} downstream worker(s) of {{{wanted}}} "
        f"plus a driver of {sweep.trial_cpus:g} CPU, and its nodes have {slots} worker slot(s); lower "
        "downstream.ray.num_workers / cpus_per_worker or sweep.trial_cpus, or add nodes")


def _mlflow_callbacks(sweep: SweepConfig) -> list:
    if not sweep.mlflow:
        return []
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ValueError(f"sweep.mlflow is set ({sweep.mlflow}) but mlflow is not installed: pip install mlflow, "
                         "or leave sweep.mlflow empty") from None
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=sweep.mlflow, experiment_name=sweep.name, save_artifact=False)]


# ---------------------------------------------------------------------------------------------------
# one trial (runs on a Tune worker)


def run_trial(cfg, parts: Mapping[str, Any], stores: Mapping[str, Mapping[str, Any]],
              setting: Mapping[str, Any], seed: int, score_on: str = "val") -> dict[str, Any]:
    """Train and score the downstream model of one setting and seed; its final metrics.

    ``score_on``: "val" (the sweep: the detection threshold calibrated on the real train patients,
    scored on the validation patients) or "test" (``lgesynth evaluate``: calibrated on the
    validation patients, scored on the test patients, which ``parts`` then holds).

    ``n_used`` is the count trained with: all that the threshold selects when fewer than asked
    (``short``); with none at all, nothing is trained and the metrics are NaN.
    """
    from engine.evaluation.gates import score_downstream
    from engine.evaluation.run import downstream_config
    from engine.training.downstream import train_downstream

    n = int(setting["n"])
    url, available = "", 0
    if n:
        store = stores[setting["method"]]
        url, available = store["url"], int(store["available"][_threshold_key(setting["threshold"])])
    n_used = min(n, available)
    out: dict[str, Any] = {"n_used": n_used, "n_available": available, "short": n_used < n}
    if n and not n_used:
        return {**out, **dict.fromkeys(RESULT_KEYS, float("nan")), "collapsed": False,
                **dict.fromkeys(("tn", "fp", "fn", "tp"), 0), "run": ""}
    name = run_name(setting, seed, n_used, store_tag(stores[setting["method"]]) if n_used else "")
    run_cfg = downstream_config(cfg, name, seed, url, n_used)
    if n_used:
        run_cfg = dataclasses.replace(run_cfg, downstream=dataclasses.replace(
            run_cfg.downstream, synthetic_min_dice=float(setting["threshold"])))
    start = time.perf_counter()
    train_downstream(run_cfg, parts=parts)
    scored, calibration = ("val", "train") if score_on == "val" else ("test", "val")
    score = score_downstream(Path(cfg.run_dir) / name, parts[scored], parts[calibration], cfg.evaluation.collapse_min_positive)
    # the per-patient records (the bootstrap's input) beside the model, not in Tune's results
    records = Path(cfg.run_dir) / name / PATIENTS_FILE.format(split=scored)
    records.write_text(json.dumps(score["patient_records"], sort_keys=True) + "\n")
    tn, fp, fn, tp = (int(x) for x in score["confusion"])
    return {**out, **{key: float(score[key]) for key in RESULT_KEYS}, "collapsed": bool(score["collapsed"]),
            "tn": tn, "fp": fp, "fn": fn, "tp": tp, "run": name, "scored_on": scored,
            f"{scored}_patients": int(score["patients"]), "detection_min_mm2": float(score["detection_min_mm2"]),
            f"detection_calibrated_on_{calibration}": bool(score["detection_calibrated_on_val"]),
            "seconds": round(time.perf_counter() - start, 1)}


def sweep_trial(config: Mapping[str, Any], cfg=None, parts=None, stores=None, call: str = "",
                score_on: str = "val") -> None:
    """The Tune function trainable: ``config`` holds the trial's ``setting`` and ``seed``; ``cfg``,
    ``parts`` (train and val slices; test too when ``score_on`` is "test"), ``stores`` and ``call``
    (the id of the call that ran the trial, so a restored experiment tells what it ran itself) come
    through ``tune.with_parameters``."""
    import ray.tune

    ray.tune.report({**run_trial(cfg, parts, stores, config["setting"], int(config["seed"]), score_on), "call": call})


# ---------------------------------------------------------------------------------------------------
# results


def _same_setting(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["method"] == b["method"] and a["threshold"] == b["threshold"] and int(a["n"]) == int(b["n"])


def summarize(trials: Sequence[Mapping[str, Any]], grid: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting of ``grid`` (in its order): mean and SD over the finished seeds of each
    metric, the counts used, and how many seeds were short of samples or collapsed."""
    from engine.evaluation.gates import mean_sd

    rows = []
    for setting in grid:
        runs = sorted((t for t in trials if _same_setting(t, setting)), key=lambda t: t["seed"])
        row: dict[str, Any] = {"method": setting["method"], "threshold": setting["threshold"], "n_synthetic": int(setting["n"]),
                               "seeds": [int(t["seed"]) for t in runs],
                               "n_used": sorted({int(t["n_used"]) for t in runs}),
                               "short": sum(bool(t["short"]) for t in runs),
                               "collapsed": sum(bool(t["collapsed"]) for t in runs)}
        row.update({key: mean_sd([t[key] for t in runs]) for key in RESULT_KEYS})
        rows.append(row)
    return rows


def add_intervals(rows: list[dict[str, Any]], trials: Sequence[Mapping[str, Any]], run_dir: str | Path,
                  split: str = "val", resamples: int = 2000, seed: int = 0) -> None:
    """Each row's metrics get their 95% patient-level bootstrap interval (``ci95``) over the
    patients its trials were scored on (:func:`engine.evaluation.stats.summary`; seeds averaged
    inside each resample), in place. Rows with no trained run keep none."""
    from engine.evaluation.run import patient_scores
    from engine.evaluation.stats import summary

    for row in rows:
        runs = [{"run": t["run"], "seed": int(t["seed"])} for t in trials
                if t.get("run") and _same_setting(t, {**row, "n": row["n_synthetic"]})]
        if not runs:
            continue
        scores = patient_scores(run_dir, runs, split)
        for key, stat in summary(scores, RESULT_KEYS, n_resamples=resamples, seed=seed).items():
            row[key]["ci95"] = stat["ci95"]


def best_setting(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The row of highest mean validation balanced accuracy; ties go to fewer samples (used, then
    asked for), then to the earlier row. None when no row has a finite mean."""
    scored = [r for r in rows if math.isfinite(r["balanced_accuracy"]["mean"])]
    if not scored:
        return None

    def key(row):
        used = max(row["n_used"]) if row["n_used"] else row["n_synthetic"]
        return (-round(row["balanced_accuracy"]["mean"], 9), used, row["n_synthetic"])

    return dict(min(scored, key=key))


def _collect(result_grid) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished trials, errored trials) of a ResultGrid, each with its setting and seed."""
    trials, errors = [], []
    for result in result_grid:
        setting, seed = dict(result.config["setting"]), int(result.config["seed"])
        metrics = result.metrics or {}
        if result.error is not None or "balanced_accuracy" not in metrics:
            message = str(result.error).strip().splitlines()[-1] if result.error is not None else "no metrics reported"
            errors.append({**setting, "seed": seed, "error": message, "path": result.path})
            continue
        trials.append({**setting, "seed": seed, **{key: metrics.get(key) for key in TRIAL_KEYS},
                       "timestamp": metrics.get("timestamp"), "path": result.path})
    return trials, errors


def _threshold_text(threshold: float | None) -> str:
    return "" if threshold is None else f"{threshold:g}"


def _used_text(row: Mapping[str, Any]) -> str:
    used = "/".join(str(n) for n in row["n_used"]) or "-"
    return used + (f" (short in {row['short']})" if row["short"] else "")


def markdown(result: Mapping[str, Any]) -> str:
    from engine.evaluation.report import _fmt

    sw = result["sweep"]
    out = [f"# Sweep `{sw['name']}`: synthetic sample count x filter threshold", "",
           "Downstream models trained on the real train patients plus N synthetic samples with Dice > threshold, "
           f"scored on the validation patients (mean ± SD over seeds {sw['seeds']} [95% interval from a bootstrap of "
           "the validation patients, seeds averaged inside each resample]); the patient-level detection "
           "threshold is calibrated on the real train patients. The test patients are not used.", "",
           "| method | Dice > | n synthetic | n used | balanced accuracy | AUROC | Dice | myocardium Dice | accuracy | seeds | collapsed |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        method = "real only" if row["method"] == REAL else row["method"]
        out.append(f"| {method} | {_threshold_text(row['threshold'])} | {row['n_synthetic']} | {_used_text(row)} | "
                   f"{_fmt(row['balanced_accuracy'])} | {_fmt(row.get('auroc'))} | {_fmt(row['dice'])} | "
                   f"{_fmt(row.get('myocardium_dice'))} | {_fmt(row['accuracy'])} | {len(row['seeds'])} | {row['collapsed']} |")
    out += ["", f"Best setting: {best_text(result['best'])}", ""]
    if result["errors"]:
        out += ["## Errored trials (retried when the sweep is run again)", ""]
        out += [f"- {setting_label(e)} seed {e['seed']}: {e['error']}" for e in result["errors"]] + [""]
    out += [f"Figure: roi.png. Experiment: {result['experiment']}.", ""]
    return "\n".join(out)


def best_text(best: Mapping[str, Any] | None) -> str:
    if best is None:
        return "none (no finished trial)"
    what = "real only" if best["method"] == REAL else (
        f"{best['method']}, Dice > {best['threshold']:g}, n = {best['n_synthetic']}")
    ba = best["balanced_accuracy"]
    lo, hi = ba.get("ci95") or (None, None)
    interval = f", 95% interval [{lo:.3f}, {hi:.3f}] over the validation patients" if lo is not None else ""
    return f"{what}: validation balanced accuracy {ba['mean']:.3f} ± {ba['sd']:.3f}{interval}"


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    columns = ["method", "threshold", "n_synthetic", "n_used", "seeds", "short", "collapsed"]
    columns += [f"{key}_{stat}" for key in RESULT_KEYS for stat in ("mean", "sd", "ci95_lo", "ci95_hi")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            values = {}
            for key in RESULT_KEYS:
                lo, hi = row[key].get("ci95") or (None, None)
                values.update({f"{key}_mean": row[key]["mean"], f"{key}_sd": row[key]["sd"], f"{key}_ci95_lo": lo,
                               f"{key}_ci95_hi": hi})
            writer.writerow({"method": row["method"], "threshold": _threshold_text(row["threshold"]),
                             "n_synthetic": row["n_synthetic"], "n_used": "/".join(map(str, row["n_used"])),
                             "seeds": len(row["seeds"]), "short": row["short"], "collapsed": row["collapsed"],
                             **values})


def roi_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Validation balanced accuracy vs synthetic sample count: one line per (method, threshold),
    starting from the real-only baseline at 0 samples, error bars = SD over seeds, hollow markers
    where fewer samples were available than asked; the baseline also as a horizontal line with its
    SD as a band."""
    from engine.evaluation.report import _figure

    fig = _figure(1, 1, size=4.5)
    ax = fig.subplots()
    real = next((r for r in rows if r["method"] == REAL and math.isfinite(r["balanced_accuracy"]["mean"])), None)
    lines: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["method"] != REAL:
            lines.setdefault((row["method"], row["threshold"]), []).append(row)
    methods = list(dict.fromkeys(m for m, _ in lines))
    if real is not None:
        mean, sd = real["balanced_accuracy"]["mean"], real["balanced_accuracy"]["sd"]
        ax.axhline(mean, color="k", linestyle="--", linewidth=1, label="real only")
        if sd > 0:
            ax.axhspan(mean - sd, mean + sd, color="k", alpha=0.08)
    for i, ((method, threshold), points) in enumerate(lines.items()):
        points = ([real] if real is not None else []) + sorted(points, key=lambda r: r["n_synthetic"])
        x = np.asarray([r["n_synthetic"] for r in points], float)
        y = np.asarray([r["balanced_accuracy"]["mean"] for r in points], float)
        sd = np.asarray([r["balanced_accuracy"]["sd"] for r in points], float)
        short = np.asarray([bool(r["short"]) for r in points])
        color = f"C{i}"
        label = f"Dice > {threshold:g}" if len(methods) == 1 else f"{method}, Dice > {threshold:g}"
        ax.errorbar(x, y, yerr=sd, color=color, capsize=3, linewidth=1.5, label=label)
        ax.scatter(x[~short], y[~short], color=color, zorder=3)
        ax.scatter(x[short], y[short], facecolors="white", edgecolors=color, zorder=3)
    ax.set_xlabel("synthetic samples added")
    ax.set_ylabel("balanced accuracy (validation patients)")
    ax.set_title(f"{', '.join(methods) or 'real only'}: return on synthetic samples"
                 + ("\n(hollow: fewer available than asked)" if any(r["short"] for r in rows) else ""), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """``results.csv``, ``results.md``, ``roi.png`` and ``sweep.json`` in ``out_dir``; their paths."""
    from engine.evaluation.run import dumps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "results.csv", "markdown": out_dir / "results.md", "roi": out_dir / "roi.png",
             "json": out_dir / "sweep.json"}
    result["outputs"] = {key: str(path) for key, path in paths.items()}
    write_csv(result["rows"], paths["csv"])
    paths["markdown"].write_text(markdown(result))
    roi_figure(result["rows"], paths["roi"])
    paths["json"].write_text(dumps(result) + "\n")
    return result["outputs"]


# ---------------------------------------------------------------------------------------------------
# the experiment


def sweep_settings(cfg, grid: Sequence[Mapping[str, Any]], stores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What the trials' results depend on (a restored experiment must match it)."""
    from engine.config import to_dict

    downstream = to_dict(cfg.downstream)
    for key in ("name", "synthetic", "n_synthetic", "synthetic_min_dice"):  # set per trial
        downstream.pop(key, None)
    downstream["ray"].pop("address", None)
    settings = {"grid": list(grid), "seeds": list(cfg.sweep.seeds), "downstream": downstream, "data": to_dict(cfg.data),
                "split": to_dict(cfg.split), "cohort": cfg.cohort.root,
                "collapse_min_positive": cfg.evaluation.collapse_min_positive,
                "stores": {m: {k: s[k] for k in ("url", "fingerprint", "available")} for m, s in stores.items()}}
    return json.loads(json.dumps(settings))


def _check_restorable(out_dir: Path, settings: Mapping[str, Any]) -> None:
    path = out_dir / SETTINGS_FILE
    stored = json.loads(path.read_text()) if path.is_file() else None
    changes = ["no record of its settings"] if stored is None else config_changes(stored, dict(settings))
    if changes:
        raise ValueError(f"{out_dir}: the sweep was started with other settings ({'; '.join(changes[:4])}); "
                         "choose another sweep.name, or delete that folder to start over")


_LOCKED: set[str] = set()  # experiment folders this process holds (a sweep's run_trials is inside its sweep's lock)


@contextlib.contextmanager
def experiment_lock(out_dir: Path):
    """Hold ``out_dir`` (a sweep's, an evaluation's or a loop's folder) for this process: two Tune
    experiments restoring and writing one folder overwrite each other's trial state and results.
    An exclusive ``flock`` of ``out_dir/.lock``, refused at once (naming the holder's pid) when
    another process holds it; the kernel drops it when the holder exits, killed or not, so nothing
    stale is left behind. Re-entrant within a process. (A lock on the driver's file system: two
    drivers on different machines sharing the folder over a network file system are not covered.)"""
    import fcntl

    key = str(Path(out_dir).absolute())
    if key in _LOCKED:
        yield
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(out_dir) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(f"{out_dir}: another sweep, evaluation or loop (pid {holder}) is running in this folder; "
                           "wait for it to finish, or choose another name") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _LOCKED.add(key)
        yield
    finally:
        _LOCKED.discard(key)
        os.close(fd)  # releases the lock


def run_trials(cfg, parts: Mapping[str, Any], stores: Mapping[str, Mapping[str, Any]],
               grid: Sequence[Mapping[str, Any]], seeds: Sequence[int], out_dir: Path, *, call: str,
               score_on: str = "val", callbacks: Sequence[Any] = (), log: Callable[[str], None] = print,
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every (setting, seed) of ``grid`` x ``seeds`` as a Tune trial (:func:`sweep_trial`) in the
    experiment folder ``out_dir``, restoring it when it exists (finished trials kept, unfinished
    and errored ones run again); (finished trials, errored trials). ``cfg`` must have absolute paths
    (:func:`absolute_paths`). Trials that can train at once: ``cfg.sweep.max_concurrent_trials`` or
    as many as the cluster's nodes hold ``cfg.downstream.ray`` workers for."""
    from ray import tune

    from engine.training.distributed import connect

    sw: SweepConfig = cfg.sweep
    trained = trained_settings(grid, stores)
    connect(cfg.downstream.ray.address)
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, cfg=cfg, parts=parts, stores=stores, call=call,
                                                         score_on=score_on),
                                       trial_resources(sw, cfg.downstream.ray))
    with experiment_lock(out_dir):
        return _run_tuner(cfg, trainable, trained, grid, stores, seeds, out_dir, callbacks, log)


def _run_tuner(cfg, trainable, trained, grid, stores, seeds, out_dir: Path, callbacks, log):
    import ray
    from ray import tune

    sw: SweepConfig = cfg.sweep
    if tune.Tuner.can_restore(str(out_dir)):
        tuner = tune.Tuner.restore(str(out_dir), trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        concurrent = sw.max_concurrent_trials or max_concurrent_trials(cfg.downstream.ray, sw, nodes)
        log(f"{out_dir.name}: {len(grid)} setting(s) ({len(trained)} trained) x {len(seeds)} seed(s), "
            f"{concurrent} at a time, in {out_dir}")
        tuner = tune.Tuner(
            trainable,
            param_space={"setting": tune.grid_search(trained), "seed": tune.grid_search(list(seeds))},
            # reuse_actors: a trial's driver process (torch, MONAI, the engine imported) serves the next trial
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_dirname_creator=trial_dirname,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=out_dir.name, storage_path=str(out_dir.parent), callbacks=list(callbacks),
                                      verbose=1),
        )
    with _credentials_hidden(), _ctrl_c_raises():
        results = tuner.fit()
    trials, errors = _collect(results)
    return expand_trials(trials, grid, stores), expand_trials(errors, grid, stores)


# What Ray Tune copies from the driver's environment into every trial actor's runtime_env
# (ray/tune/execution/class_cache.py), where Ray's runtime-env agent logs it in plain text.
TUNE_FORWARDED_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def _ctrl_c_raises():
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in ``Tuner.fit`` as anywhere else. Ray Tune's own
    handler stops the running trials, records them as finished (TERMINATED, without their result)
    and returns: the sweep would read them as failed and a restore would never run them again. With
    it off, the experiment state on disk is Tune's last periodic one, where those trials are still
    running: the same command restores them and runs them again."""
    saved = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved


@contextlib.contextmanager
def _credentials_hidden():
    """The driver's object-storage credentials out of ``os.environ`` while Tune starts its trials,
    so that none reaches a trial's runtime_env and Ray's logs; the trials take theirs from the
    nodes' environment or the cloud's provider chain, as every Ray worker does."""
    saved = {name: os.environ.pop(name) for name in TUNE_FORWARDED_CREDENTIALS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _used(setting: Mapping[str, Any], stores: Mapping[str, Mapping[str, Any]]) -> int:
    if not setting["n"]:
        return 0
    return min(int(setting["n"]), int(stores[setting["method"]]["available"][_threshold_key(setting["threshold"])]))


def trained_settings(grid: Sequence[Mapping[str, Any]], stores: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The settings of ``grid`` that train different models: a setting asking for more samples than
    its threshold selects trains on all of them, like one asking for exactly that many, so they are
    one trial (two trials must never train the same run at once). Counts become the counts used;
    a setting with no sample available stays as it is (it trains nothing)."""
    out: list[dict[str, Any]] = []
    for setting in grid:
        used = _used(setting, stores)
        effective = {**setting, "n": used} if used else dict(setting)
        if effective not in out:
            out.append(effective)
    return out


def expand_trials(trials: Sequence[Mapping[str, Any]], grid: Sequence[Mapping[str, Any]],
                  stores: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The trials of :func:`trained_settings` back on every setting of ``grid`` they stand for (with
    that setting's count, and ``short`` when it asked for more than were used)."""
    out = []
    for setting in grid:
        used = _used(setting, stores)
        effective = {**setting, "n": used} if used else dict(setting)
        for trial in trials:
            if _same_setting(trial, effective):
                row = {**trial, "n": setting["n"]}
                if "short" in trial:
                    row["short"] = int(trial.get("n_used") or 0) < int(setting["n"])
                out.append(row)
    return out


def check_sweep_thresholds(cfg) -> None:
    """Refuse, before anything is made, sweep thresholds the run's stores could not serve: below
    ``synthesis.threshold`` a store holds the images of rejected candidates only with
    ``synthesis.keep_rejected``.

    Raises:
        ValueError: naming the thresholds and the two ways out.
    """
    below = [t for t in cfg.sweep.thresholds if t < cfg.synthesis.threshold]
    if below and not cfg.synthesis.keep_rejected:
        raise ValueError(f"sweep.thresholds {below} lie below synthesis.threshold {cfg.synthesis.threshold}: the "
                         "stores keep no image of a candidate that failed the filter, so the sweep could not draw "
                         "them; set synthesis.keep_rejected: true, or drop those thresholds")


def sweep(cfg, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep of ``cfg.sweep`` on Ray Tune; the result dict, also written as
    ``<run_dir>/sweeps/<name>/`` (see the module docstring).

    Returns:
        ``sweep`` (its config), ``grid``, ``stores`` (URL and selectable counts per threshold),
        ``trials`` (one per finished trial), ``rows`` (per setting, over seeds), ``best``,
        ``errors``, ``trials_run`` (trials that ran in this call, 0 when everything was restored),
        ``restored``, ``experiment``, ``outputs``, ``seconds``.
    """
    from engine.training.prepare import prepare_arrays

    if "://" in str(cfg.run_dir):
        raise ValueError(f"run_dir {cfg.run_dir}: the sweep needs a local run folder (its downstream models and report go there)")
    check_sweep_thresholds(cfg)
    cfg = absolute_paths(cfg)
    sw: SweepConfig = cfg.sweep
    callbacks = _mlflow_callbacks(sw)
    started, call = time.perf_counter(), uuid.uuid4().hex
    grid = sweep_grid(sw)
    parts, _ = prepare_arrays(cfg)
    for split in ("train", "val"):
        if not len(parts[split]):
            raise ValueError(f"{cfg.cohort.root}: the {split} split has no slices; the sweep trains on the train "
                             "patients and scores on the validation patients")
    parts = {"train": parts["train"], "val": parts["val"]}  # the test patients go no further
    stores = store_selection(cfg, grid)
    for method, store in stores.items():
        counts = ", ".join(f"{n} with Dice > {t}" for t, n in store["available"].items())
        log(f"sweep: {method}: {store['url']}: {counts}")
    out_dir = Path(cfg.run_dir) / "sweeps" / sw.name
    with experiment_lock(out_dir):
        return _sweep_in(cfg, out_dir, grid, stores, parts, callbacks, call, started, log)


def _sweep_in(cfg, out_dir: Path, grid, stores, parts, callbacks, call: str, started: float,
              log: Callable[[str], None]) -> dict[str, Any]:
    from ray import tune

    from engine.config import to_dict

    sw: SweepConfig = cfg.sweep
    settings = sweep_settings(cfg, grid, stores)
    restored = tune.Tuner.can_restore(str(out_dir))
    if restored:
        _check_restorable(out_dir, settings)
        log(f"sweep: resuming {out_dir} (finished trials are kept, errored ones run again)")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    trials, errors = run_trials(cfg, parts, stores, grid, list(sw.seeds), out_dir, call=call, score_on="val",
                                callbacks=callbacks, log=log)
    rows = summarize(trials, grid)
    add_intervals(rows, trials, cfg.run_dir, "val", cfg.evaluation.bootstrap_resamples, cfg.evaluation.bootstrap_seed)
    result: dict[str, Any] = {
        "sweep": to_dict(sw), "grid": grid, "stores": stores, "trials": trials, "rows": rows, "best": best_setting(rows),
        "errors": errors, "restored": restored, "experiment": str(out_dir),
        "trials_run": sum(t["call"] == call for t in trials) + len(errors),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_outputs(result, out_dir)
    log(f"sweep: best setting: {best_text(result['best'])}")
    for error in errors:
        log(f"sweep: trial {setting_label(error)} seed {error['seed']} failed: {error['error']} ({error['path']})")
    log(f"sweep: results in {out_dir} ({result['seconds']:.0f} s)")
    return result
