"""``lgesynth loop``: failure-targeted synthesis. Each round synthesizes with the scar sampler's
current weights, trains the downstream model on the real train patients plus ``n_synthetic`` kept
samples (every seed), measures on the validation patients where it misses scar, per AHA segment and
per transmurality class, and moves the sampler's weights toward what it misses; the next round
synthesizes with the new weights.

Miss rate of a segment: of the true scar pixels in that segment (validation positives, all seeds'
models pooled), the fraction the model does not predict as scar. Of a transmurality class: the same
over the segments whose scar extent falls in that class (DOMAIN.md section 2's scale). New weights:
``w * (miss + 0.05) ** strength``, normalized, then mixed with ``floor`` of the uniform weights so
that no configuration disappears; a segment or class without any validation scar keeps its weight
(no evidence). Territory weights (ischemic scar) follow their segments' mean weight.

Round 0 samples uniformly (the run's ``scar_sampler`` as configured): it is the uniform arm of the
comparison at equal sample count. The final report scores the uniform arm, the last round's
targeted arm and real only on the test patients (the rounds see only validation patients), mean and
SD over seeds, and draws the segment weights of every round as AHA bull's-eyes.

Round 0's store is the run's own store of the method (``lgesynth synthesize`` / ``evaluate``
make the same one), the targeted rounds' and the rest live in ``<run_dir>/loop/<name>/``:
``round-<r>.zarr``, Tune's bookkeeping, ``loop.json``, ``loop.md`` and ``weights.png``. The
downstream models are runs of the run folder named by their store's content (engine.evaluation.sweep),
so a re-run, and the evaluation before it, share complete stores and finished models.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engine.anatomy.aha import TERRITORIES
from engine.anatomy.masks import TRANSMURALITY_BINS

SEGMENTS = tuple(str(s) for s in range(1, 17))
CLASSES = tuple(TRANSMURALITY_BINS)
MISS_OFFSET = 0.05  # a segment the model never misses keeps some weight before the floor
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class LoopConfig:
    """``lgesynth loop``.

    Args:
        rounds: synthesis -> training -> error measurement rounds (round 0 samples uniformly; at
            least 2 so that one round is targeted).
        n_synthetic: kept samples added to the real train slices in every round (0:
            ``evaluation.n_synthetic``); the same count in every round, so rounds compare weights only.
        seeds: downstream training seeds (mean and SD over them; errors pooled over their models).
        strength: exponent of the miss rate in the reweighting (0: weights never change).
        floor: share of the uniform weights mixed into every new weighting, in [0, 1).
        method: the synthesis method whose sampler is steered.
        name: the loop's folder, ``<run_dir>/loop/<name>``.
    """

    rounds: int = 3
    n_synthetic: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    strength: float = 1.0
    floor: float = 0.2
    method: str = "lgesynthnet"
    name: str = "loop"

    def __post_init__(self) -> None:
        from engine.synthesis.methods import METHODS

        if self.rounds < 2:
            raise ValueError(f"rounds must be >= 2 (round 0 is the uniform one), got {self.rounds}")
        if self.n_synthetic < 0:
            raise ValueError(f"n_synthetic must be >= 0 (0: evaluation.n_synthetic), got {self.n_synthetic}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"floor must be in [0, 1), got {self.floor}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name must be a folder name (letters, digits, '.', '_', '-'), got {self.name!r}")


# ---------------------------------------------------------------------------------------------------
# where the model misses


def miss_counts(models: Sequence[Any], arrays, reference_angle: float = 120.0, batch_size: int = 32) -> dict[str, Any]:
    """True scar pixels and those the models miss (predicted scar probability <= 0.5), pooled over
    ``models`` and the positive basal/mid/apical slices of ``arrays``: ``{"segment": {"1": [missed,
    total], ...}, "transmurality": {"26-50%": [missed, total], ...}}`` (only keys with scar)."""
    import torch

    from engine.anatomy.aha import aha_segments
    from engine.anatomy.labels import scar_region
    from engine.anatomy.transmurality import segment_transmurality, transmurality_class
    from engine.models.downstream import predict

    rows = [i for i in range(len(arrays)) if arrays.positive[i] and arrays.level[i] in ("basal", "mid", "apical")]
    segment: dict[str, list[int]] = {}
    transmurality: dict[str, list[int]] = {}
    if not rows:
        return {"segment": segment, "transmurality": transmurality}
    truth = scar_region(arrays.label[rows])
    regions = np.stack([aha_segments(arrays.label[i], arrays.level[i], reference_angle) for i in rows])
    classes = []
    for i in rows:
        extents = segment_transmurality(arrays.label[i], arrays.level[i], reference_angle)
        classes.append({int(s): transmurality_class(min(max(e, 0.0), 1.0)) for s, e in extents.items() if e > 0})
    images = torch.as_tensor(arrays.image[rows])
    for model in models:
        model.eval()
        with torch.no_grad():
            predicted = np.concatenate([predict(model, images[start:start + batch_size])["scar"].numpy()
                                        for start in range(0, len(rows), batch_size)])
        missed = truth & ~predicted
        for k in range(len(rows)):
            for s in np.unique(regions[k][truth[k]]):
                if s == 0:
                    continue
                inside = truth[k] & (regions[k] == s)
                counts = [int((missed[k] & inside).sum()), int(inside.sum())]
                for table, key in ((segment, str(int(s))), (transmurality, classes[k].get(int(s)))):
                    if key is not None:
                        table.setdefault(key, [0, 0])
                        table[key][0] += counts[0]
                        table[key][1] += counts[1]
    return {"segment": segment, "transmurality": transmurality}


def reweight(weights: Mapping[str, float], counts: Mapping[str, Sequence[int]], keys: Sequence[str],
             strength: float, floor: float) -> dict[str, float]:
    """New weights over ``keys`` (mean 1): ``w * (miss + MISS_OFFSET) ** strength`` where a key has
    scar in ``counts`` (``[missed, total]``), ``w`` unchanged where it has none, normalized, then
    ``floor`` of the uniform weights mixed in."""
    old = np.array([float(weights.get(k, 1.0)) for k in keys], np.float64)
    old = old / old.mean()
    miss = np.array([counts[k][0] / counts[k][1] if k in counts and counts[k][1] else np.nan for k in keys])
    seen = np.isfinite(miss)
    new = old.copy()
    if seen.any():
        factor = (miss[seen] + MISS_OFFSET) ** strength
        new[seen] = old[seen] * factor / factor.mean()  # unseen keys keep theirs; seen ones share their total
    new = new / new.mean()
    new = (1.0 - floor) * new + floor
    return {k: round(float(w), 6) for k, w in zip(keys, new / new.mean(), strict=True)}


def territory_weights(base: Mapping[str, float], segment_weights: Mapping[str, float]) -> dict[str, float]:
    """The configured territory weights, each scaled by the mean weight of its segments that are
    reweighted (``SEGMENTS``, 1-16: the apex, 17, in LAD, is never drawn, so its 1.0 would pull LAD
    toward uniform)."""
    return {t: float(base.get(t, 0.0)) * float(np.mean([segment_weights.get(str(s), 1.0) for s in TERRITORIES[t]
                                                        if str(s) in SEGMENTS]))
            for t in base}


# ---------------------------------------------------------------------------------------------------
# the rounds


def round_config(cfg, out_dir: Path, r: int, weights: Mapping[str, Any]):
    """``cfg`` with the loop's method, round ``r``'s store and the sampler's weights. Round 0 (the
    configured sampler) is the method's store of the run, the one ``lgesynth synthesize`` or
    ``evaluate`` makes: the same samples, so its downstream models are theirs too; the targeted
    rounds write ``<out_dir>/round-<r>.zarr``."""
    from engine.evaluation.run import method_config

    lp = cfg.loop
    own = method_config(cfg, lp.method)
    if r == 0:
        return own
    sampler = dataclasses.replace(cfg.scar_sampler, segment_weights=dict(weights.get("segment", {})),
                                  transmurality_weights=dict(weights.get("transmurality", {})),
                                  territory_weights=dict(weights.get("territory") or cfg.scar_sampler.territory_weights))
    syn = dataclasses.replace(own.synthesis, store=str(out_dir / f"round-{r}.zarr"))
    return dataclasses.replace(own, scar_sampler=sampler, synthesis=syn)


def _trained(cfg, parts, store: Mapping[str, Any], n: int, with_real: bool, out_dir: Path,
             log) -> list[dict[str, Any]]:
    """The downstream runs of real + ``n`` samples of ``store`` (and real only) for every loop seed,
    as Tune trials: trained unless finished earlier, scored on the validation patients."""
    import shutil

    from engine.evaluation.sweep import REAL, run_trials

    method = cfg.loop.method
    grid = [{"method": method, "threshold": float(cfg.synthesis.threshold), "n": int(n)}]
    if with_real:
        grid.insert(0, {"method": REAL, "threshold": None, "n": 0})
    shutil.rmtree(out_dir, ignore_errors=True)  # Tune's bookkeeping only: the models are runs of their own
    trials, errors = run_trials(cfg, parts, {method: store}, grid, list(cfg.loop.seeds), out_dir,
                                call=uuid.uuid4().hex, score_on="val", log=log)
    if errors:
        raise RuntimeError("loop: downstream run(s) failed: " + "; ".join(
            f"{e['method']} seed {e['seed']}: {e['error']} ({e['path']})" for e in errors))
    return trials


def _scored_on_test(cfg, parts, trial: Mapping[str, Any]) -> dict[str, Any]:
    """A round's finished downstream model on the test patients, its detection threshold calibrated
    on the validation patients (:func:`engine.evaluation.gates.score_downstream`)."""
    from engine.evaluation.gates import score_downstream

    score = score_downstream(Path(cfg.run_dir) / trial["run"], parts["test"], parts["val"],
                             cfg.evaluation.collapse_min_positive)
    return {**{k: trial[k] for k in ("seed", "run", "n_used")}, "balanced_accuracy": float(score["balanced_accuracy"]),
            "auroc": float(score["auroc"]), "dice": float(score["dice"]), "collapsed": bool(score["collapsed"]),
            "patients": score["patient_records"]}


def _test_comparison(cfg, arms: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Each test arm's metrics with their patient-level bootstrap intervals, and the paired
    differences targeted - uniform and targeted - real only (engine.evaluation.stats)."""
    from engine.evaluation.stats import PatientScores, paired_difference, summary

    ev = cfg.evaluation
    scores = {arm: PatientScores.from_runs([{"seed": r["seed"], "patients": r["patients"]} for r in runs])
              for arm, runs in arms.items()}
    out: dict[str, Any] = {}
    for arm, runs in arms.items():
        out[arm] = {**summary(scores[arm], ("balanced_accuracy", "auroc", "dice"), ev.bootstrap_resamples,
                              ev.bootstrap_seed),
                    "collapsed": sum(bool(r["collapsed"]) for r in runs),
                    "runs": [{k: r[k] for k in ("seed", "run", "balanced_accuracy", "auroc", "dice", "collapsed", "n_used")}
                             for r in runs]}
    for other in ("uniform", "real_only"):
        out[f"targeted_vs_{other}"] = paired_difference(scores["targeted"], scores[other], ("balanced_accuracy", "auroc"),
                                                        ev.bootstrap_resamples, ev.bootstrap_seed,
                                                        what=f"targeted vs {other}")
    return out


def _summary(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    from engine.evaluation.gates import mean_sd

    return {"balanced_accuracy": mean_sd([t["balanced_accuracy"] for t in trials]),
            "dice": mean_sd([t["dice"] for t in trials]), "collapsed": sum(bool(t["collapsed"]) for t in trials),
            "runs": [{k: t[k] for k in ("seed", "run", "balanced_accuracy", "dice", "collapsed", "n_used")} for t in trials]}


def run_loop(cfg, rounds: int | None = None, *, sequential: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the loop of ``cfg.loop`` (``rounds`` overrides ``loop.rounds``); the
    result dict, also written to ``<run_dir>/loop/<name>/`` (see the module docstring).
    ``sequential`` makes the round stores without Ray Data (tests, debugging)."""
    from engine.evaluation.sweep import absolute_paths, experiment_lock

    if rounds is not None:
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, rounds=int(rounds)))
    cfg = absolute_paths(cfg)
    with experiment_lock(Path(cfg.run_dir) / "loop" / cfg.loop.name):  # one loop at a time in its folder
        return _run_loop(cfg, sequential, log)


def _run_loop(cfg, sequential: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from engine.evaluation.sweep import REAL, store_entry
    from engine.synthesis.pipeline import synthesize
    from engine.training.downstream import load_downstream
    from engine.training.prepare import prepare_arrays

    lp = cfg.loop
    n = lp.n_synthetic or cfg.evaluation.n_synthetic
    started = time.perf_counter()
    all_parts, _ = prepare_arrays(cfg)
    for split in ("train", "val", "test"):
        if not len(all_parts[split]):
            raise ValueError(f"{cfg.cohort.root}: the {split} split has no slices; the loop trains on train, "
                             "targets on validation and reports on test patients")
    parts = {"train": all_parts["train"], "val": all_parts["val"]}  # the rounds never see the test patients
    out_dir = Path(cfg.run_dir) / "loop" / lp.name
    out_dir.mkdir(parents=True, exist_ok=True)
    weights: dict[str, Any] = {"segment": {}, "transmurality": {}, "territory": {}}
    history: list[dict[str, Any]] = []
    round_runs: list[list[dict[str, Any]]] = []
    real_runs: list[dict[str, Any]] = []
    stores: list[dict[str, Any]] = []
    for r in range(lp.rounds):
        rcfg = round_config(cfg, out_dir, r, weights)
        url = rcfg.synthesis.store_url(rcfg.run_dir)
        log(f"loop: round {r}: synthesizing into {url}" + (" (the configured sampler)" if r == 0 else ""))
        made = synthesize(rcfg, sequential=sequential, parts=all_parts, log=log)
        store = store_entry(url, lp.method, [rcfg.synthesis.threshold], rcfg.synthesis.storage_options)
        stores.append(store)
        trials = _trained(rcfg, parts, store, n, r == 0, out_dir / "tune" / f"round-{r}", log)
        mine = [t for t in trials if t["method"] != REAL]
        round_runs.append(mine)
        real_runs += [t for t in trials if t["method"] == REAL]
        counts = miss_counts([load_downstream(Path(cfg.run_dir) / t["run"])[0] for t in mine], parts["val"],
                             cfg.cohort.reference_angle)
        entry = {"round": r, "weights": json.loads(json.dumps(weights)), "store": store["url"],
                 "pass_rate": made.get("pass_rate"), "kept": made.get("kept"), "misses": counts,
                 "val": _summary(mine)}
        if r == 0:
            entry["val_real_only"] = _summary([t for t in trials if t["method"] == REAL])
        history.append(entry)
        log(f"loop: round {r}: val balanced accuracy {entry['val']['balanced_accuracy']['mean']:.3f} "
            f"± {entry['val']['balanced_accuracy']['sd']:.3f} over {len(mine)} seed(s)")
        segment = reweight(weights["segment"], counts["segment"], SEGMENTS, lp.strength, lp.floor)
        weights = {"segment": segment,
                   "transmurality": reweight(weights["transmurality"], counts["transmurality"], CLASSES,
                                             lp.strength, lp.floor),
                   "territory": territory_weights(cfg.scar_sampler.territory_weights, segment)}
    # the comparison at equal sample count: when the last round's store kept fewer than asked, a
    # uniform arm of that count is trained too; the finished models are scored on the test patients
    uniform, n_final = round_runs[0], min(int(t["n_used"]) for t in round_runs[-1])
    if any(int(t["n_used"]) != n_final for t in uniform):
        log(f"loop: the last round kept {n_final} samples: training the uniform arm with {n_final} too")
        uniform = [t for t in _trained(round_config(cfg, out_dir, 0, {}), parts, stores[0], n_final, False,
                                       out_dir / "tune" / "uniform-equal-n", log) if t["method"] != REAL]
    test = _test_comparison(cfg, {arm: [_scored_on_test(cfg, all_parts, run) for run in runs]
                                  for arm, runs in (("real_only", real_runs), ("uniform", uniform),
                                                    ("targeted", round_runs[-1]))})
    result = {"loop": dataclasses.asdict(lp), "n_synthetic": n, "rounds": history, "test": test,
              "final_weights": weights, "seconds": round(time.perf_counter() - started, 1)}
    result["outputs"] = write_outputs(result, out_dir)
    log(f"loop: test balanced accuracy uniform {test['uniform']['balanced_accuracy']['mean']:.3f}, targeted "
        f"{test['targeted']['balanced_accuracy']['mean']:.3f}, real only {test['real_only']['balanced_accuracy']['mean']:.3f}; "
        f"report in {out_dir} ({result['seconds']:.0f} s)")
    return result


# ---------------------------------------------------------------------------------------------------
# outputs


def _ms(value: Mapping[str, Any]) -> str:
    if not value["n"]:
        return "n/a"
    lo, hi = value.get("ci95") or (None, None)
    return f"{value['mean']:.3f} ± {value['sd']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def markdown(result: Mapping[str, Any]) -> str:
    lp, test = result["loop"], result["test"]
    lines = [f"# Failure-targeted synthesis: {lp['name']}", "",
             f"{lp['rounds']} rounds of {lp['method']}, {result['n_synthetic']} kept samples added per round, "
             f"seeds {lp['seeds']}; round 0 samples uniformly. Validation patients steer the sampler; the test "
             "patients only score the final comparison.", "",
             "| round | pass rate | kept | val balanced accuracy | val Dice | collapsed | most weighted segments |",
             "|---|---|---|---|---|---|---|"]
    for entry in result["rounds"]:
        seg = entry["weights"].get("segment") or {}
        top = ", ".join(f"{k} ({v:.2f})" for k, v in sorted(seg.items(), key=lambda kv: -kv[1])[:3]) or "uniform"
        rate = entry["pass_rate"]
        lines.append(f"| {entry['round']} | {'' if rate is None else f'{rate:.1%}'} | {entry['kept']} | "
                     f"{_ms(entry['val']['balanced_accuracy'])} | {_ms(entry['val']['dice'])} | "
                     f"{entry['val']['collapsed']} | {top} |")
    lines += ["", "Test patients (detection threshold calibrated on validation), mean ± SD over seeds [95% interval "
              "from a bootstrap of the test patients, seeds averaged inside each resample]:", "",
              "| training | balanced accuracy | AUROC | Dice | collapsed |", "|---|---|---|---|---|"]
    def used(arm: str) -> str:
        return "/".join(str(n) for n in sorted({int(r["n_used"]) for r in test[arm]["runs"]})) or "0"

    for arm, label in (("real_only", "real only"), ("uniform", f"+ {used('uniform')} uniform (the configured sampler)"),
                       ("targeted", f"+ {used('targeted')} targeted (round {lp['rounds'] - 1})")):
        lines.append(f"| {label} | {_ms(test[arm]['balanced_accuracy'])} | {_ms(test[arm]['auroc'])} | "
                     f"{_ms(test[arm]['dice'])} | {test[arm]['collapsed']} of {len(test[arm]['runs'])} |")
    lines += ["", f"Verdict: {loop_verdict(test)}.", "", "Segment weights per round: `weights.png` (AHA bull's-eye)."]
    return "\n".join(lines) + "\n"


def loop_verdict(test: Mapping[str, Any]) -> str:
    """Targeted vs uniform on the test patients: a win only where the paired interval of the
    difference in balanced accuracy or AUROC excludes zero without a significant loss on the other
    (:func:`engine.evaluation.report.shown_better`), else "not shown" with the intervals."""
    from engine.evaluation.report import _diff, shown_better

    diff = test.get("targeted_vs_uniform") or {}
    text = ", ".join(f"{name} {_diff(diff.get(key))}" for key, name in (("balanced_accuracy", "balanced accuracy"),
                                                                        ("auroc", "AUROC")))
    if shown_better(diff):
        return f"targeted vs uniform: {text} (paired 95% intervals): targeting helps here"
    flipped = {k: {"ci95": [-v["ci95"][1], -v["ci95"][0]]} for k, v in diff.items()
               if (v.get("ci95") or [None])[0] is not None}
    if shown_better(flipped):
        return f"targeted vs uniform: {text} (paired 95% intervals): uniform is better here"
    return f"targeted vs uniform: {text} (paired 95% intervals): no difference shown"


# bull's-eye layout (the AHA's display convention: anterior up, septum left): ring of each level,
# first segment's start angle (degrees, counter-clockwise from 3 o'clock) and segment count
_RINGS = {"basal": (1, 60.0, 6, (2.0, 3.0)), "mid": (7, 60.0, 6, (1.0, 2.0)), "apical": (13, 45.0, 4, (0.0, 1.0))}


def bullseye(ax, weights: Mapping[str, float], vmax: float, title: str) -> Any:
    """Draw ``weights`` (segment "1".."16" -> weight; missing: 1) as an AHA 16-segment bull's-eye."""
    import matplotlib
    from matplotlib.patches import Wedge

    cmap = matplotlib.colormaps["magma"]
    for first, start, count, (r0, r1) in _RINGS.values():
        for k in range(count):
            segment = first + k
            a0 = start + k * 360.0 / count
            value = float(weights.get(str(segment), 1.0))
            ax.add_patch(Wedge((0, 0), r1, a0, a0 + 360.0 / count, width=r1 - r0, facecolor=cmap(value / vmax),
                               edgecolor="white", linewidth=1))
            mid = np.deg2rad(a0 + 180.0 / count)
            radius = (r0 + r1) / 2 if r0 else 0.55
            ax.text(radius * np.cos(mid), radius * np.sin(mid), f"{segment}\n{value:.2f}", ha="center", va="center",
                    fontsize=6, color="white" if value / vmax < 0.6 else "black")
    ax.set_xlim(-3.1, 3.1)
    ax.set_ylim(-3.1, 3.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    return ax


def weights_figure(rounds: Sequence[Mapping[str, Any]], final: Mapping[str, Any], path: Path) -> None:
    """One bull's-eye per round's sampling weights (and the weights the next round would use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"round {e['round']}", e["weights"].get("segment") or {}) for e in rounds]
    panels.append((f"after round {len(rounds) - 1}", final.get("segment") or {}))
    vmax = max([1.0] + [float(v) for _, w in panels for v in w.values()])
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6))
    for ax, (title, seg) in zip(np.atleast_1d(axes), panels, strict=True):
        bullseye(ax, seg, vmax, title)
    fig.suptitle("scar sampler: AHA segment weights (1 = uniform)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    from engine.evaluation.run import dumps

    outputs = {"json": str(out_dir / "loop.json"), "markdown": str(out_dir / "loop.md"),
               "weights": str(out_dir / "weights.png")}
    Path(outputs["json"]).write_text(dumps(dict(result)) + "\n")
    Path(outputs["markdown"]).write_text(markdown(result))
    weights_figure(result["rounds"], result["final_weights"], Path(outputs["weights"]))
    return outputs
