"""``lgesynth demo``: the whole loop on the embedded phantom cohort, step after step, timed.

phantom -> validate -> train reward, VAE, generator and the SPADE baselines named in
``evaluation.methods`` -> synthesize -> evaluate (real only vs + each method, paste included; three
gates; several seeds) -> a small Ray Tune sweep (``sweep`` section; validation patients) ->
``<run_dir>/reports/demo.md``.

Every step is resumable: a re-run finds the cohort, the finished trainings (their checkpoints),
the complete stores and the finished downstream runs, and does only what is missing. The peak
resident memory of the driver and every process it started (Ray's included) is sampled each second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class DemoConfig:
    """Args:
        patients: phantom patients written when the cohort folder does not exist yet.
        phantom_seed: the phantom cohort's seed.
        sweep: end with the ``sweep`` section's Ray Tune sweep.
        test_patients: > 0: the demo also writes an external test phantom of this many patients,
            ``<run_dir>/test_cohort`` (another seed, cases numbered from ``test_first_case``), and
            makes it ``evaluation.test_cohort`` (the run's cohort then trains and validates only);
            0: the test patients are the run cohort's test split.
        test_phantom_seed: the test phantom's seed (another draw than the training cohort's).
        test_first_case: the test phantom's first case number (ids apart from the training cohort's).
        test_negative_fraction: the test phantom's share of patients without scar (the training
            cohort's is ``phantom.negative_fraction``; a balanced test set measures balanced
            accuracy with the narrowest interval).
    """

    patients: int = 100
    phantom_seed: int = 0
    sweep: bool = True
    test_patients: int = 0
    test_phantom_seed: int = 1
    test_first_case: int = 1001
    test_negative_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.patients < 4:
            raise ValueError(f"patients must be >= 4 (train, val and test need patients), got {self.patients}")
        for name in ("phantom_seed", "test_patients", "test_phantom_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.test_first_case <= self.patients:
            raise ValueError(f"test_first_case {self.test_first_case} must be above patients ({self.patients}): the test "
                             "phantom's case numbers must not collide with the training cohort's")
        if not 0.0 < self.test_negative_fraction < 1.0:
            raise ValueError(f"test_negative_fraction must be in (0, 1), got {self.test_negative_fraction}")


class PeakMemory:
    """Peak summed RSS (bytes) of this process and all its descendants, sampled every ``every_s``."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self.peak = self.sample()  # fails here, loudly, if it cannot measure (not silently in the thread)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def demo_config(cfg, out: str | Path | None):
    """``cfg`` with run_dir ``out`` and the cohort in ``out/cohort`` (unchanged without ``out``), and
    with ``demo.test_patients``, ``evaluation.test_cohort`` in ``<run_dir>/test_cohort``."""
    if out is not None:
        cohort = dataclasses.replace(cfg.cohort, root=str(Path(out) / "cohort"))
        cfg = dataclasses.replace(cfg, run_dir=str(out), cohort=cohort)
    if cfg.demo.test_patients:
        made = str(Path(cfg.run_dir) / "test_cohort")
        if cfg.evaluation.test_cohort and cfg.evaluation.test_cohort != made:
            raise ValueError(f"demo.test_patients {cfg.demo.test_patients} makes the test phantom {made}, but "
                             f"evaluation.test_cohort is {cfg.evaluation.test_cohort}: set one of the two")
        cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, test_cohort=made))
    return cfg


def run_demo(cfg, *, sequential: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step of the demo on ``cfg`` (see the module docstring); the summary.

    Args:
        sequential: synthesize without Ray Data (tests); training always runs on Ray Train.
    """
    from engine.evaluation.run import evaluate
    from engine.evaluation.sweep import sweep, best_text
    from engine.models.spade import CONTEXTS
    from engine.synthesis.pipeline import synthesize
    from engine.training.generator import train_generator
    from engine.training.reward import train_reward
    from engine.training.spade import train_spade
    from engine.training.vae import train_vae

    if cfg.demo.sweep:
        from engine.evaluation.sweep import check_sweep_thresholds

        check_sweep_thresholds(cfg)  # before anything trains
    cfg = demo_config(cfg, None)
    cohort = Path(cfg.cohort.root)
    steps: list[dict[str, Any]] = []
    result: dict[str, Any] = {"run_dir": str(cfg.run_dir), "cohort": str(cohort), "steps": steps, "metrics": {}}

    def phantom() -> str:
        return make_phantoms(cfg)

    def validate() -> str:
        return validate_phantoms(cfg)

    def metrics(values: dict[str, Any], keys: tuple[str, ...]) -> str:
        return ", ".join(f"{k} {values[k]:.3f}" for k in keys if isinstance(values.get(k), (int, float)))

    def train(stage: str, fn, keys: tuple[str, ...]) -> Callable[[], str]:
        def step() -> str:
            result["metrics"][stage] = fn(cfg)
            return metrics(result["metrics"][stage], keys)
        return step

    def evaluation() -> str:
        result["evaluation"] = evaluate(cfg, sequential=sequential, log=log)
        return f"report {result['evaluation']['report']['markdown']}"

    def tune_sweep() -> str:
        result["sweep"] = sweep(cfg, log=log)
        return f"{len(result['sweep']['trials'])} trials; best {best_text(result['sweep']['best'])}"

    spade = [(f"train {method}", train(method, lambda c, context=CONTEXTS[method]: train_spade(c, context),
                                       ("val_l1", "val_ssim")))
             for method in cfg.evaluation.methods if method in CONTEXTS]

    plan = [
        ("phantom", phantom),
        ("validate", validate),
        ("train reward", train("reward", train_reward, ("val_scar_dice", "val_pass_rate"))),
        ("train vae", train("vae", train_vae, ("val_l1", "val_ssim"))),
        ("train generator", train("generator", train_generator, ("val_positive_pass_rate", "val_negative_pass_rate"))),
        *spade,
        ("synthesize", lambda: "pass rate {pass_rate:.1%} ({kept} of {made})".format(
            **synthesize(cfg, sequential=sequential, log=log))),
        ("evaluate", evaluation),
        *([("sweep", tune_sweep)] if cfg.demo.sweep else []),
    ]
    started = time.perf_counter()
    with PeakMemory() as memory:
        for name, step in plan:
            t0 = time.perf_counter()
            log(f"demo: {name} ...")
            outcome = step()
            steps.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "outcome": outcome})
            log(f"demo: {name}: {outcome} ({steps[-1]['seconds']:.0f} s)")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mib"] = round(memory.peak / 2**20, 1)
    result["report"] = write_demo_report(result, Path(cfg.run_dir) / "reports")
    log(f"demo: done in {result['seconds']:.0f} s, peak memory {result['peak_rss_mib']:.0f} MiB; {result['report']}")
    return result


def _cohorts(cfg) -> list[tuple[Path, int, int, int, Any]]:
    """(root, patients, seed, first case, phantom config) of the demo's cohorts: the run's, and the
    external test phantom with ``demo.test_patients``."""
    demo = cfg.demo
    out = [(Path(cfg.cohort.root), demo.patients, demo.phantom_seed, 1, cfg.phantom)]
    if demo.test_patients:
        out.append((Path(cfg.evaluation.test_cohort), demo.test_patients, demo.test_phantom_seed, demo.test_first_case,
                    dataclasses.replace(cfg.phantom, negative_fraction=demo.test_negative_fraction)))
    return out


def make_phantoms(cfg) -> str:
    """Write the demo's phantom cohorts that do not exist yet (:func:`demo_config` first); what was done."""
    from engine.phantom import write_phantom_cohort

    made = []
    for root, n, seed, first, phantom_cfg in _cohorts(cfg):
        if (root / "manifest.json").is_file():
            made.append(f"{root}: exists, reused")
            continue
        manifest = write_phantom_cohort(root, n, seed=seed, cfg=phantom_cfg, first_case=first)
        made.append(f"{root.name}: {len(manifest)} patients, {sum(bool(m['positive']) for m in manifest)} positive")
    return "; ".join(made)


def validate_phantoms(cfg) -> str:
    """Validate the demo's cohorts (:func:`engine.io.validation.validate_cohort`); any problem stops the demo."""
    from engine.io.validation import validate_cohort

    checked = 0
    for root, *_ in _cohorts(cfg):
        report = validate_cohort(root)
        if not report.ok:
            raise ValueError(f"{root}: {len(report.problems)} problem(s): " + "; ".join(report.lines()[:3]))
        checked += report.checked
    return f"{checked} cases, clean"


def budget_text(evaluation: dict[str, Any] | None) -> str:
    """What a run of this size can show, from its own real-only interval."""
    text = ("Every model here trained for minutes on a few dozen phantom patients: the figures show that each "
            "part of the engine runs and what it reports, not what the method is worth.")
    util = ((evaluation or {}).get("real_only") or {}).get("utility") or {}
    lo, hi = (util.get("balanced_accuracy") or {}).get("ci95") or (None, None)
    study = ("`lgesynth demo --config configs/study.yaml` is the study with the power to tell (an external test "
             "phantom of 300 patients); benchmarks/RESULTS.md holds its figures.")
    if lo is None:
        return f"{text} {study}"
    runs = len(util.get("runs") or []) or "?"
    if util.get("collapsed"):
        return (f"{text} {util['collapsed']} of {runs} real-only downstream runs collapsed (called every test patient "
                f"the same), so its balanced accuracy of {util['balanced_accuracy'].get('mean', 0.5):.3f} and "
                f"interval [{lo:.3f}, {hi:.3f}] describe a model that detects nothing, not the spread a method would "
                f"have to beat: with this budget expect every verdict to read \"not shown\". {study}")
    return (f"{text} With {util.get('patients', '?')} test patients the real-only balanced accuracy's 95% interval "
            f"is [{lo:.3f}, {hi:.3f}], {hi - lo:.2f} wide: a method would have to move it by about that much to show "
            f"anything here, so expect every verdict to read \"not shown\". {study}")


def write_demo_report(result: dict[str, Any], out_dir: Path) -> str:
    """``demo.md`` (steps, times, peak memory, then the evaluation report) and ``demo.json``."""
    from engine.evaluation.run import json_ready

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# lgesynth demo", "", f"Run: `{result['run_dir']}`; cohort `{result['cohort']}`; wall time "
             f"{result['seconds']:.0f} s; peak memory (driver and every process it started) {result['peak_rss_mib']:.0f} MiB.",
             "", "| step | seconds | outcome |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['seconds']:.0f} | {s['outcome']} |" for s in result["steps"]]
    evaluation = result.get("evaluation")
    lines += ["", budget_text(evaluation), ""]
    if evaluation:
        lines += [Path(evaluation["report"]["markdown"]).read_text(), ""]
    swept = result.get("sweep")
    if swept:
        roi = os.path.relpath(swept["outputs"]["roi"], out_dir)
        lines += ["## Sweep (validation patients)", "", Path(swept["outputs"]["markdown"]).read_text(), "",
                  f"![balanced accuracy vs synthetic samples]({roi})", ""]
    summary = {k: v for k, v in result.items() if k not in ("evaluation", "sweep")}
    if swept:
        summary["sweep"] = {k: swept[k] for k in ("rows", "best", "experiment", "outputs", "seconds")}
    (out_dir / "demo.json").write_text(json.dumps(json_ready(summary), indent=1, sort_keys=True) + "\n")
    path = out_dir / "demo.md"
    path.write_text("\n".join(lines))
    return str(path)
