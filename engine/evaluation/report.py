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
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def verdict(result: dict[str, Any]) -> list[str]:
    """One line per method against the paste control (realism: LV-crop SSIM; utility: balanced
    accuracy), and one per collapsed downstream run. A method that does not beat paste on both has
    shown nothing on this cohort, and the line says so."""
    lines = []
    methods = result["methods"]
    paste = methods.get("paste")
    for name, entry in methods.items():
        if name == "paste":
            continue
        if paste is None:
            lines.append(f"{name}: no paste control in this report; nothing can be concluded about what the model adds.")
            continue
        ssim = (entry.get("realism") or {}).get("ssim_crop", {}).get("mean", math.nan)
        ssim_p = (paste.get("realism") or {}).get("ssim_crop", {}).get("mean", math.nan)
        bacc = ((entry.get("utility") or {}).get("balanced_accuracy") or {})
        bacc_p = ((paste.get("utility") or {}).get("balanced_accuracy") or {})
        beats_realism = math.isfinite(ssim) and math.isfinite(ssim_p) and ssim > ssim_p
        m, mp = bacc.get("mean", math.nan), bacc_p.get("mean", math.nan)
        beats_utility = math.isfinite(m) and math.isfinite(mp) and m > mp
        spread = max(bacc.get("sd", 0.0) or 0.0, bacc_p.get("sd", 0.0) or 0.0)
        parts = [f"realism (LV-crop SSIM {_num(ssim)} vs paste {_num(ssim_p)}): {'beats' if beats_realism else 'does not beat'} paste",
                 f"utility (balanced accuracy {_num(m)} vs paste {_num(mp)}): {'beats' if beats_utility else 'does not beat'} paste"]
        if beats_utility and math.isfinite(m - mp) and m - mp <= spread:
            parts[-1] += f" by {m - mp:.3f}, within one SD over seeds ({spread:.3f}): not evidence"
        conclusion = ("it beats the model-free control on both gates" if beats_realism and beats_utility else
                      "it does not beat the model-free control on both gates: on this cohort it has shown nothing")
        lines.append(f"{name}: {'; '.join(parts)}; {conclusion}.")
    for name, entry in [("real only", result.get("real_only", {})), *methods.items()]:
        util = entry.get("utility") or {}
        if util.get("collapsed"):
            seeds = [r["seed"] for r in util["runs"] if r["collapsed"]]
            lines.append(f"{name}: {util['collapsed']} of {len(util['runs'])} downstream runs collapsed "
                         f"(seeds {seeds}: no test patient, or every one, called positive); they are in the means.")
    return lines


def markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    out = ["# Evaluation: realism, alignment, utility", "",
           f"Filter threshold: Dice > {result['threshold']}; seeds {result['seeds']}; realism on the real "
           f"{result['realism_split']} positives; utility tested on the real test patients (mean ± SD over seeds), the "
           "patient-level detection threshold (predicted scar pixels per patient) calibrated on the validation "
           "patients of each run.", "",
           "## Image quality and alignment (the paper's Table 1)", "",
           "| method | SSIM whole | SSIM LV crop | RMSE whole | RMSE LV crop | candidates | pass rate | Dice-TP |",
           "|---|---|---|---|---|---|---|---|",
           f"| real positives (reward model reference) | | | | | {ref['slices']} slices | {_pct(ref['pass_rate'])} | {_num(ref['dice_tp'])} |"]
    for name, entry in result["methods"].items():
        rea, ali = entry.get("realism") or {}, entry["alignment"]
        out.append(f"| {name} | {_fmt(rea.get('ssim_whole'))} | {_fmt(rea.get('ssim_crop'))} | {_fmt(rea.get('rmse_whole'))} | "
                   f"{_fmt(rea.get('rmse_crop'))} | {ali['made']} | {_pct(ali['pass_rate'])} | {_num(ali['dice_tp'])} |")
    out += ["", "## Downstream utility (the paper's downstream table)", "",
            "| training | n synthetic | Dice | Dice-TP | accuracy | balanced accuracy | [TN, FP, FN, TP] per seed | collapsed |",
            "|---|---|---|---|---|---|---|---|"]
    rows = [("real only", result["real_only"])] + [(f"+ {n}", e) for n, e in result["methods"].items()]
    for name, entry in rows:
        util = entry.get("utility")
        if not util:
            out.append(f"| {name} | 0 | n/a | n/a | n/a | n/a | {entry.get('utility_note', '')} | |")
            continue
        n = util["runs"][0]["n_synthetic"]
        conf = "; ".join(f"s{r['seed']}: {r['confusion']}" for r in util["runs"])
        out.append(f"| {name} | {n} | {_fmt(util['dice'])} | {_fmt(util['dice_tp'])} | {_fmt(util['accuracy'])} | "
                   f"{_fmt(util['balanced_accuracy'])} | {conf} | {util['collapsed']} of {len(util['runs'])} |")
    notes = [f"- {n}: {e['utility_note']}" for n, e in result["methods"].items() if e.get("utility_note")]
    out += ["", "## Verdict against the paste control", "", *[f"- {line}" for line in verdict(result)]]
    if notes:
        out += ["", "## Notes", "", *notes]
    out += ["", f"Figures: realism.png, samples.png, dice_hist.png. Wall time {result.get('seconds', 0):.0f} s.", ""]
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
                 realism_scars: np.ndarray | None = None) -> dict[str, str]:
    """Write JSON, markdown and figures to ``out_dir``; their paths."""
    from engine.evaluation.run import dumps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "evaluation.json", "markdown": out_dir / "evaluation.md", "realism": out_dir / "realism.png",
             "samples": out_dir / "samples.png", "dice_hist": out_dir / "dice_hist.png"}
    result = {**result, "verdict": result.get("verdict") or verdict(result)}
    paths["json"].write_text(dumps(result) + "\n")
    paths["markdown"].write_text(markdown(result))
    realism_figure(result, realism_real, realism_scars, paths["realism"])
    samples_figure(result, paths["samples"], storage_options)
    dice_histogram(result, paths["dice_hist"])
    return {k: str(v) for k, v in paths.items() if v.exists()}
