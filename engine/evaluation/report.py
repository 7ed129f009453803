"""The evaluation report: ``evaluation.json``, ``evaluation.md`` (the paper's two tables plus the
paste-control verdict) and PNG figures (realism grid, kept samples with their conditioning contour
and predicted scar, Dice histograms)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from engine.anatomy.labels import SCAR


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    """``mean ± SD`` over seeds, and the 95% interval where there is one."""
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "n/a"
    text = f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}" if stat.get("sd") is not None else f"{stat['mean']:.{digits}f}"
    lo, hi = stat.get("ci95") or (None, None)
    return text + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else "")


def _diff(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """A paired difference: ``+d [lo, hi]``."""
    if not entry or entry.get("diff") is None:
        return "n/a"
    lo, hi = entry.get("ci95") or (None, None)
    interval = f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" if lo is not None and hi is not None else ""
    return f"{entry['diff']:+.{digits}f}{interval}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _left_out_text(result: dict[str, Any]) -> str:
    """How many positive slices the realism gate left out for every method (no blood pool), if any."""
    counts = {(e.get("realism") or {}).get("left_out_no_blood_pool", 0) for e in result["methods"].values()}
    n = max(counts, default=0)
    return (f"; {n} positive slice(s) without a blood pool (apical) left out for every method, since the paste "
            "control measures its scar level on the blood pool") if n else ""


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


DETECTION_KEYS = ("balanced_accuracy", "auroc")  # what a method must improve to help (either, without losing on the other)
_NAMES = {"balanced_accuracy": "balanced accuracy", "auroc": "AUROC", "dice": "Dice"}


def shown_better(differences: dict[str, Any] | None) -> bool:
    """Whether paired differences show an improvement: the interval of balanced accuracy or of AUROC
    lies above zero, and neither lies below it (no significant loss on the other)."""
    from engine.evaluation.stats import excludes_zero

    signs = [excludes_zero((differences or {}).get(key)) for key in DETECTION_KEYS]
    return 1 in signs and -1 not in signs


def _not_shown_reason(differences: dict[str, Any]) -> str:
    """Why :func:`shown_better` is false: a significant loss (named), else every interval holds zero."""
    from engine.evaluation.stats import excludes_zero

    worse = [_NAMES[k] for k in DETECTION_KEYS if excludes_zero(differences.get(k)) == -1]
    if worse:
        return f"significantly worse in {' and '.join(worse)}"
    return "every detection interval holds zero"


def _differences_text(differences: dict[str, Any]) -> str:
    return ", ".join(f"{_NAMES[k]} {_diff(differences.get(k))}" for k in (*DETECTION_KEYS, "dice"))


def verdict(result: dict[str, Any]) -> list[str]:
    """One line per method: does it help a downstream model (against real only), and does it beat the
    model-free paste control? Each is claimed only when the paired patient-level bootstrap interval
    of the difference in balanced accuracy or AUROC excludes zero without a significant loss on the
    other (:func:`shown_better`); otherwise the line says "not shown" and gives the intervals.
    Realism is reported beside, never a condition: paste rewrites only the scar pixels, so it wins
    SSIM by construction, and the paper's SPADE-FC had the best SSIM and hurt detection. One more
    line per arm whose downstream runs collapsed."""
    lines = []
    methods = result["methods"]
    for name, entry in methods.items():
        util = entry.get("utility") or {}
        if not util:
            lines.append(f"{name}: no downstream model was trained ({entry.get('utility_note', 'no sample')}): "
                         "nothing shown.")
            continue
        vs_real = util.get("vs_real_only") or {}
        parts = [f"vs real only {_differences_text(vs_real)}: "
                 + ("helps" if shown_better(vs_real) else f"help not shown ({_not_shown_reason(vs_real)})")]
        if name != "paste":
            vs_paste = util.get("vs_paste")
            if vs_paste is None:
                parts.append("no paste control in this report: what the model adds over a model-free control is not shown")
            else:
                parts.append(f"vs paste {_differences_text(vs_paste)}: "
                             + ("beats the model-free control" if shown_better(vs_paste)
                                else f"beating paste not shown ({_not_shown_reason(vs_paste)})"))
        realism = entry.get("realism") or {}
        ssim = (realism.get("ssim_crop") or {}).get("mean")
        if ssim is not None:
            parts.append(f"realism, reported beside and not a condition: LV-crop SSIM {_num(ssim)}")
        lines.append(f"{name}: {'; '.join(parts)}.")
    for name, entry in [("real only", result.get("real_only", {})), *methods.items()]:
        util = entry.get("utility") or {}
        if util.get("collapsed"):
            seeds = [r["seed"] for r in util["runs"] if r["collapsed"]]
            lines.append(f"{name}: {util['collapsed']} of {len(util['runs'])} downstream runs collapsed "
                         f"(seeds {seeds}: no test patient, or every one, called positive); they are in the means.")
    return lines


def markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    boot = result.get("bootstrap") or {}
    out = ["# Evaluation: realism, alignment, utility", "",
           f"Filter threshold: Dice > {result['threshold']}; seeds {result['seeds']}; realism on the real "
           f"{result['realism_split']} positives; utility tested on the real test patients: mean ± SD over seeds "
           f"[95% interval from {boot.get('resamples', 'n/a')} bootstrap resamples of the test patients, stratified by "
           "truth, and of the seeds, averaged inside each resample]. A patient's score is its largest component of predicted scar "
           "inside the predicted myocardium (mm²); AUROC is threshold-free, the threshold of the other detection "
           "metrics is calibrated on the validation patients of each run.", "",
           "## Image quality and alignment (the paper's Table 1)", "",
           "Every method is scored over the same pixels: its refill kept inside the inpainting region (the real scar "
           "dilated), the real image outside it (paste rewrites only the scar, LGESynthNet the region, SPADE and "
           "ControlNet the whole crop). Mean ± SD over slices" + _left_out_text(result) + ".", "",
           "| method | SSIM whole | SSIM LV crop | SSIM region | RMSE whole | RMSE LV crop | RMSE region | candidates | pass rate | Dice-TP |",
           "|---|---|---|---|---|---|---|---|---|---|",
           f"| real positives (reward model reference) | | | | | | | {ref['slices']} slices | {_pct(ref['pass_rate'])} | {_num(ref['dice_tp'])} |"]
    for name, entry in result["methods"].items():
        rea, ali = entry.get("realism") or {}, entry["alignment"]
        out.append(f"| {name} | {_fmt(rea.get('ssim_whole'))} | {_fmt(rea.get('ssim_crop'))} | {_fmt(rea.get('ssim_region'))} | "
                   f"{_fmt(rea.get('rmse_whole'))} | {_fmt(rea.get('rmse_crop'))} | {_fmt(rea.get('rmse_region'))} | "
                   f"{ali['made']} | {_pct(ali['pass_rate'])} | {_num(ali['dice_tp'])} |")
    appearance = [("real positives", result.get("real_scar_appearance"))] + [
        (n, e.get("scar_appearance")) for n, e in result["methods"].items()]
    if any(a for _, a in appearance):
        out += ["", "## How the scar looks (kept samples against real positive slices)", "",
                "| | scar / blood pool: median [IQR] | distance to real | scar / remote myocardium: median [IQR] | distance to real | slices |",
                "|---|---|---|---|---|---|"]
        for name, entry in appearance:
            if not entry:
                continue
            cells = []
            for key in ("scar_blood", "scar_remote"):
                e = entry.get(key) or {}
                iqr = e.get("iqr") or [math.nan, math.nan]
                cells += [f"{_num(e.get('median'), 2)} [{_num(iqr[0], 2)}, {_num(iqr[1], 2)}]",
                          _num(e.get("wasserstein_to_real"), 3) if name != "real positives" else ""]
            out.append(f"| {name} | " + " | ".join(cells) + f" | {(entry.get('scar_blood') or {}).get('n', 0)} |")
        out += ["", "Distance: the 1-Wasserstein distance between the method's and the real ratios (0: the same "
                "distribution); figure ratios.png."]
    out += ["", "## Downstream utility (the paper's downstream table)", "",
            "| training | n synthetic | balanced accuracy | AUROC | Dice | Dice-TP | myocardium Dice | accuracy | "
            "[TN, FP, FN, TP] per seed | collapsed |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("real only", result["real_only"])] + [(f"+ {n}", e) for n, e in result["methods"].items()]
    for name, entry in rows:
        util = entry.get("utility")
        if not util:
            out.append(f"| {name} | 0 | n/a | n/a | n/a | n/a | n/a | n/a | {entry.get('utility_note', '')} | |")
            continue
        n = util["runs"][0]["n_synthetic"]
        conf = "; ".join(f"s{r['seed']}: {r['confusion']}" for r in util["runs"])
        out.append(f"| {name} | {n} | {_fmt(util.get('balanced_accuracy'))} | {_fmt(util.get('auroc'))} | "
                   f"{_fmt(util.get('dice'))} | {_fmt(util.get('dice_tp'))} | {_fmt(util.get('myocardium_dice'))} | "
                   f"{_fmt(util.get('accuracy'))} | {conf} | {util['collapsed']} of {len(util['runs'])} |")
    compared = [(n, e["utility"]) for n, e in result["methods"].items() if (e.get("utility") or {}).get("vs_real_only")]
    if compared:
        out += ["", "## Paired differences (95% bootstrap intervals over patients and seeds; the same test patients, seeds and real draws)",
                "", "| method | vs real only: balanced accuracy | AUROC | Dice | vs paste: balanced accuracy | AUROC | Dice |",
                "|---|---|---|---|---|---|---|"]
        for name, util in compared:
            real, paste = util["vs_real_only"], util.get("vs_paste") or {}
            out.append(f"| {name} | " + " | ".join(_diff(d.get(k)) for d in (real, paste) for k in ("balanced_accuracy", "auroc", "dice"))
                       + " |")
    notes = [f"- {n}: {e['utility_note']}" for n, e in result["methods"].items() if e.get("utility_note")]
    out += ["", "## Verdict", "", *[f"- {line}" for line in verdict(result)]]
    if notes:
        out += ["", "## Notes", "", *notes]
    out += ["", f"Figures: realism.png, samples.png, dice_hist.png, ratios.png. Wall time {result.get('seconds', 0):.0f} s.", ""]
    return "\n".join(out)


def _contour(ax, mask: np.ndarray, color: str) -> None:
    if np.asarray(mask).any():
        ax.contour(np.asarray(mask, float), levels=[0.5], colors=color, linewidths=0.8)


def _figure(rows: int, cols: int, size: float = 1.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * size, rows * size + 0.4))
    FigureCanvasAgg(fig)
    return fig


def realism_figure(result: dict[str, Any], items_real: np.ndarray | None, scars: np.ndarray | None, path: Path,
                   count: int = 4) -> None:
    """Rows: real positive slices; columns: the real image, then each method's refill (scar contour)."""
    methods = [m for m, e in result["methods"].items() if e.get("realism")]
    if items_real is None or not methods:
        return
    n = min(count, len(items_real))
    fig = _figure(n, 1 + len(methods))
    axes = fig.subplots(n, 1 + len(methods), squeeze=False)
    for r in range(n):
        panels = [("real", items_real[r])] + [(m, result["methods"][m]["realism"]["images"][r]) for m in methods]
        for c, (title, img) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            _contour(ax, scars[r], "tab:orange")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("realism: the real scar masked and refilled (orange: the scar region)", fontsize=9)
    fig.savefig(path, dpi=90)


def samples_figure(result: dict[str, Any], path: Path, storage_options=None, count: int = 6) -> None:
    """Per method, the first kept samples: image, conditioning contour (orange), predicted scar (cyan)."""
    from engine.synthesis.store import open_store, read_arrays

    methods = list(result["methods"])
    fig = _figure(len(methods), count)
    axes = fig.subplots(len(methods), count, squeeze=False)
    for r, method in enumerate(methods):
        group = open_store(result["methods"][method]["store"], "r", storage_options)
        kept = np.flatnonzero(np.asarray(read_arrays(group, ("passed",))["passed"], bool))[:count]
        for c in range(count):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(kept):
                i = int(kept[c])
                ax.imshow(group["image"][i], cmap="gray", vmin=0, vmax=1)
                _contour(ax, np.asarray(group["condition"][i]) > 0, "tab:orange")
                _contour(ax, np.asarray(group["label"][i]) == SCAR, "cyan")
                ax.set_title(f"{method} Dice {float(group['dice'][i]):.2f}", fontsize=7)
            elif c == 0:
                ax.text(0.5, 0.5, f"{method}: no kept sample", ha="center", va="center", fontsize=8)
    fig.suptitle("kept samples: conditioning edges (orange), the reward model's scar = label (cyan)", fontsize=9)
    fig.savefig(path, dpi=90)


def ratio_figure(ratios: dict[str, dict[str, np.ndarray]] | None, path: Path) -> None:
    """Histograms of scar / blood pool and scar / remote myocardium: real positives and each method's kept samples."""
    if not ratios or not any(len(r.get("scar_blood", [])) for r in ratios.values()):
        return
    fig = _figure(1, 2, size=4.0)
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("scar_blood", "scar_remote"), ("scar / blood pool", "scar / remote myocardium")):
        values = [v for r in ratios.values() for v in np.asarray(r.get(key, []))]
        if not values:
            continue
        bins = np.linspace(min(values), max(values), 25)
        for name, r in ratios.items():
            if len(r.get(key, [])):
                ax.hist(r[key], bins=bins, density=True, histtype="step", linewidth=2 if name == "real" else 1.2,
                        color="k" if name == "real" else None, label=f"{name} ({len(r[key])})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ratio of mean intensities")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def dice_histogram(result: dict[str, Any], path: Path) -> None:
    fig = _figure(1, 1, size=4.0)
    ax = fig.subplots()
    bins = np.linspace(0, 1, 21)
    for method, entry in result["methods"].items():
        ax.hist(entry["alignment"]["dice"], bins=bins, histtype="step", linewidth=1.5,
                label=f"{method} (pass {_pct(entry['alignment']['pass_rate'])})")
    ax.axvline(result["threshold"], color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("Dice(reward model's scar, conditioning scar)")
    ax.set_ylabel("candidates")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_report(result: dict[str, Any], out_dir: Path, *, storage_options=None, realism_real: np.ndarray | None = None,
                 realism_scars: np.ndarray | None = None, ratios: dict[str, Any] | None = None) -> dict[str, str]:
    """Write JSON, markdown and figures to ``out_dir``; their paths."""
    from engine.evaluation.run import dumps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md", "realism": out_dir / "realism.png",
             "samples": out_dir / "samples.png", "dice_hist": out_dir / "dice_hist.png", "ratios": out_dir / "ratios.png"}
    result = {**result, "verdict": result.get("verdict") or verdict(result)}
    paths["json"].write_text(dumps(result) + "\n")
    paths["markdown"].write_text(markdown(result))
    realism_figure(result, realism_real, realism_scars, paths["realism"])
    samples_figure(result, paths["samples"], storage_options)
    dice_histogram(result, paths["dice_hist"])
    ratio_figure(ratios, paths["ratios"])
    return {k: str(v) for k, v in paths.items() if v.exists()}
