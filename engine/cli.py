"""The ``lgesynth`` command line: one console script, one subcommand per stage.

Heavy libraries are imported inside the handlers so that ``lgesynth --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROG = "lgesynth"


class UsageError(Exception):
    """A user error reported as one line and exit code 2 (bad config, bad path, bad override)."""


def _phantom(args: argparse.Namespace) -> int:
    from engine.config import apply_overrides, from_dict
    from engine.phantom import write_phantom_cohort
    from engine.phantom.config import PhantomConfig

    cfg = from_dict(PhantomConfig, apply_overrides({}, args.overrides), path="phantom")
    start = time.perf_counter()
    try:
        manifest = write_phantom_cohort(args.out, args.patients, seed=args.seed, cfg=cfg, first_case=args.first_case)
    except ValueError as err:  # e.g. an output folder holding someone else's cases
        raise UsageError(str(err)) from err
    positives = sum(bool(p["positive"]) for p in manifest)
    print(
        f"wrote {len(manifest)} patients ({positives} positive, {len(manifest) - positives} negative) to "
        f"{args.out} in {time.perf_counter() - start:.1f} s; manifest: {Path(args.out) / 'manifest.json'}",
        file=sys.stderr,
    )
    if args.preview:
        _write_preview(args.out, args.preview, patients=args.preview_patients)
    return 0


def _write_preview(root: str, png: str, patients: int | list[str] = 4, reference_angle: float = 120.0,
                   mirrored: bool = False, apex_first: bool = False) -> None:
    from engine.io.cohort import CohortConfig, load_cohort
    from engine.phantom.preview import render_preview

    cohort = load_cohort(CohortConfig(root=root, reference_angle=reference_angle, mirrored=mirrored,
                                      apex_first=apex_first, on_invalid="quarantine"))
    ids = sorted(cohort.patients) if isinstance(patients, int) else list(patients)
    unknown = [p for p in ids if p not in cohort.patients]
    if unknown:
        raise UsageError(f"{root}: no loadable case(s) {unknown}")
    if isinstance(patients, int):
        # show positives and negatives alike
        pos = [p for p in ids if cohort.patients[p]]
        neg = [p for p in ids if not cohort.patients[p]]
        ids = (pos[: (patients + 1) // 2] + neg[: patients // 2])[:patients] or ids[:patients]
    slices = [
        (r.image, r.label, r.level, f"{r.patient_id} k={r.slice_index} {r.level}")
        for pid in ids for r in cohort.patient_records(pid)
    ]
    render_preview(slices, png, reference_angle=reference_angle)
    print(f"preview of {len(ids)} patient(s): {png}", file=sys.stderr)


def _preview(args: argparse.Namespace) -> int:
    _write_preview(args.cohort, args.png, patients=args.patients or args.count, reference_angle=args.reference_angle,
                   mirrored=args.mirrored, apex_first=args.apex_first)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from engine.io.validation import validate_cohort

    report = validate_cohort(args.cohort)
    for line in report.lines():
        print(line)
    if args.report:
        report.write_report(args.report)
    status = "clean" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{args.cohort}: {report.checked} case(s) checked, {status}", file=sys.stderr)
    return 0 if report.ok else 1


def _config(args: argparse.Namespace) -> int:
    import yaml

    from engine.config import load_config, to_dict
    from engine.settings import EngineConfig

    cfg = load_config(EngineConfig, args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


STAGES = ("reward", "vae", "generator", "downstream", "spade-fc", "spade-lc", "controlnet")


def _train(args: argparse.Namespace) -> int:
    import json

    from engine.config import load_config
    from engine.settings import EngineConfig

    cfg = load_config(EngineConfig, args.config, args.overrides)
    if args.stage == "reward":
        from engine.training.reward import train_reward as train
    elif args.stage == "vae":
        from engine.training.vae import train_vae as train
    elif args.stage == "generator":
        from engine.training.generator import train_generator as train
    elif args.stage in ("spade-fc", "spade-lc"):
        import functools

        from engine.models.spade import CONTEXTS
        from engine.training.spade import train_spade

        train = functools.partial(train_spade, context=CONTEXTS[args.stage])
    elif args.stage == "controlnet":
        from engine.training.controlnet_baseline import train_controlnet_baseline as train
    else:
        from engine.training.downstream import train_downstream as train
    metrics = train(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, indent=1, sort_keys=True))
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    import json

    from engine.config import load_config
    from engine.settings import EngineConfig
    from engine.synthesis.pipeline import synthesize

    cfg = load_config(EngineConfig, args.config, args.overrides)
    summary = synthesize(cfg, sequential=args.sequential)
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.evaluation.run import evaluate
    from engine.settings import EngineConfig

    cfg = load_config(EngineConfig, args.config, args.overrides)
    result = evaluate(cfg, sequential=args.sequential)
    print(open(result["report"]["markdown"]).read())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.evaluation.sweep import best_text, sweep
    from engine.settings import EngineConfig

    cfg = load_config(EngineConfig, args.config, args.overrides)
    result = sweep(cfg)
    print(Path(result["outputs"]["markdown"]).read_text())
    print(f"best setting: {best_text(result['best'])}")
    return 1 if result["errors"] else 0


def _loop(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.evaluation.loop import run_loop
    from engine.settings import EngineConfig

    cfg = load_config(EngineConfig, args.config, args.overrides)
    result = run_loop(cfg, rounds=args.rounds, sequential=args.sequential)
    print(Path(result["outputs"]["markdown"]).read_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.demo import demo_config, run_demo
    from engine.settings import EngineConfig

    if not Path(args.config).is_file():
        raise UsageError(f"{args.config}: no such config (run from the repository root, or pass --config)")
    cfg = demo_config(load_config(EngineConfig, args.config, args.overrides), args.out)
    result = run_demo(cfg, sequential=args.sequential)
    print(Path(result["report"]).read_text())
    return 0


def _storage_options(pairs: list[str]) -> dict:
    import yaml

    from engine.synthesis.config import credential_keys

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option expects key=value, got {pair!r}")
        options[key] = yaml.safe_load(value)
    if credential_keys(options):
        raise UsageError(f"credentials do not go on the command line ({', '.join(credential_keys(options))}); "
                         "set them in the environment")
    return options


def _check_store(args: argparse.Namespace) -> int:
    import json

    from engine.config import ConfigError, refuse_url_credentials
    from engine.synthesis.check import check_store

    try:
        refuse_url_credentials(args.url, "check-store URL")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    summary, problems = check_store(args.url, _storage_options(args.storage_option))
    for problem in problems:
        print(f"{args.url}: {problem}")
    print(json.dumps({**summary, "problems": len(problems)}, sort_keys=True))
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Controlled synthesis of myocardial scar in LGE cardiac MRI and three-gate evaluation of its worth.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantom", help="write the embedded phantom LGE cohort (EMIDEC layout + manifest)",
                       description="Write a realistic phantom LGE cohort in the EMIDEC layout, with manifest.json/.csv.")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--patients", type=int, default=40, help="number of patients (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed; patient i depends only on (seed, i) (default 0)")
    p.add_argument("--first-case", type=int, default=1, metavar="N",
                   help="number of the first case (Case_P<N>...; default 1): number an external test cohort "
                        "apart from the training cohort, e.g. --first-case 1001")
    p.add_argument("--preview", metavar="PNG", help="also write a preview grid of slices to this PNG")
    p.add_argument("--preview-patients", type=int, default=4, help="patients shown in the preview (default 4)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="phantom settings, e.g. image_size=128 'scar_blood_ratio=[1.0,1.3]'")
    p.set_defaults(handler=_phantom)

    p = sub.add_parser("validate", help="check an EMIDEC-layout cohort; exit 1 with one line per problem",
                       description="Check a cohort. Exit 0 when clean; otherwise exit 1 and print one line per "
                                   "problem, naming the file and the reason.")
    p.add_argument("cohort", help="cohort root folder (Case_*/Images, Case_*/Contours)")
    p.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("preview", help="render slices of a cohort with label contours and AHA segments to a PNG")
    p.add_argument("cohort", help="cohort root folder")
    p.add_argument("png", help="output PNG")
    p.add_argument("--patients", nargs="+", metavar="ID", help="case ids to show (default: a few of each kind)")
    p.add_argument("--count", type=int, default=4, help="patients shown when --patients is not given (default 4)")
    p.add_argument("--reference-angle", type=float, default=120.0, help="AHA reference angle in degrees (default 120)")
    p.add_argument("--mirrored", action="store_true", help="the stacks are stored mirrored left-right")
    p.add_argument("--apex-first", action="store_true", help="the slice axis runs apex to base")
    p.set_defaults(handler=_preview)

    p = sub.add_parser("train", help="train a model of the method on Ray Train (resumes a run that has checkpoints)",
                       description="Train one model on Ray Train. Checkpoints go to <run_dir>/ray/<stage>; a re-run "
                                   "continues from the latest one; the final model is exported to <run_dir>/<stage>/.")
    p.add_argument("stage", choices=STAGES, help="which model")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. reward.loop.epochs=3")
    p.set_defaults(handler=_train)

    p = sub.add_parser("synthesize", help="stream candidates from negative slices into the Zarr store (Ray Data)",
                       description="Make the run's synthetic candidates: negative slices -> scar masks and captions -> "
                                   "diffusion actors -> filter actors -> Zarr store (synthesis.store, default "
                                   "<run_dir>/synthetic.zarr). A re-run makes only what is missing.")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--sequential", action="store_true",
                   help="one process, shard after shard, no Ray (reference and debugging)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. synthesis.candidates_per_slice=2")
    p.set_defaults(handler=_synthesize)

    p = sub.add_parser("evaluate", help="the three gates (realism, alignment, utility) for real-only and each method",
                       description="Realism (held-out real positives refilled), alignment (each method's candidates through "
                                   "the same filter) and utility (downstream models real-only vs + N synthetic over seeds, "
                                   "tested on the test patients) for evaluation.methods; the report (JSON, markdown, PNG) "
                                   "goes to evaluation.report_dir (default <run_dir>/reports). A re-run reuses what is done.")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--sequential", action="store_true", help="make the method stores without Ray Data (debugging)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. evaluation.seeds=[0,1,2]")
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("sweep", help="Ray Tune sweep: synthetic sample counts x filter thresholds -> validation utility",
                       description="One Ray Tune trial per (method, Dice threshold, sample count) and seed (sweep.*), "
                                   "each training the downstream model on Ray Train on the train patients + N stored "
                                   "samples with Dice > threshold and scoring it on the validation patients (never the "
                                   "test patients). Results table, roi.png and sweep.json go to <run_dir>/sweeps/<name>; "
                                   "running the same command again resumes (finished trials are not re-run). Exit 1 "
                                   "when a trial failed.")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. 'sweep.n_synthetic=[0,30,60]'")
    p.set_defaults(handler=_sweep)

    p = sub.add_parser("loop", help="failure-targeted synthesis: steer the scar sampler toward what the downstream model misses",
                       description="Round 0 synthesizes with the configured (uniform) scar sampler; every round trains "
                                   "the downstream model on the train patients + loop.n_synthetic kept samples (each of "
                                   "loop.seeds), measures its missed scar per AHA segment and transmurality class on the "
                                   "validation patients and reweights the sampler for the next round. Ends with uniform "
                                   "vs targeted vs real only on the test patients. loop.md, loop.json and weights.png "
                                   "(bull's-eyes) go to <run_dir>/loop/<name>; a re-run reuses stores and models.")
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: loop.rounds; at least 2)")
    p.add_argument("--sequential", action="store_true", help="make the round stores without Ray Data (debugging)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. loop.seeds=[0,1,2]")
    p.set_defaults(handler=_loop)

    p = sub.add_parser("demo", help="the whole loop on the embedded phantom: train, synthesize, evaluate, report",
                       description="phantom -> validate -> train reward, VAE, generator -> synthesize -> evaluate "
                                   "(real only vs + paste and + LGESynthNet, over seeds) -> <out>/reports/demo.md. "
                                   "A re-run reuses every finished step.")
    p.add_argument("--out", default=None, help="run folder (default: the config's run_dir); the cohort goes to OUT/cohort")
    p.add_argument("--config", default="configs/demo.yaml", help="run config (default configs/demo.yaml)")
    p.add_argument("--sequential", action="store_true", help="synthesize without Ray Data (debugging)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. demo.patients=40")
    p.set_defaults(handler=_demo)

    p = sub.add_parser("check-store", help="verify a synthetic store; exit 1 with one line per problem",
                       description="Verify a synthetic store: row count, unique ids, no NaN, valid labels, every "
                                   "shard complete and readable. Exit 0 when sound, 1 otherwise.")
    p.add_argument("url", help="the store: a path or fsspec URL (s3://bucket/run/synthetic.zarr)")
    p.add_argument("--storage-option", action="append", metavar="key=value",
                   help="fsspec option, e.g. endpoint_url=http://127.0.0.2:9000 (credentials come from the environment)")
    p.set_defaults(handler=_check_store)

    p = sub.add_parser("config", help="print a run config after overrides and validation",
                       description="Load a YAML run config, apply key=value overrides, validate and print it.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. split.seed=3")
    p.set_defaults(handler=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`phantom OUT --patients 4 image_size=128`), which
    # argparse cannot match to a trailing positional once options intervene: collect them here.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from engine.config import ConfigError
    from engine.io.cohort import CohortError
    from engine.synthesis import SynthesisIncomplete

    try:
        return int(args.handler(args))
    except (ConfigError, CohortError, UsageError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except SynthesisIncomplete as err:  # the run failed, what it made is kept: no traceback to read
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # bad input reported by a stage (missing artifacts, mismatched split)
        if args.command not in ("train", "synthesize", "sweep", "loop"):
            raise
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemError) as err:
        # Ctrl-C inside a C extension's call (Ray's wait, in Tune's loop) comes back as a SystemError
        # caused by the KeyboardInterrupt ("... returned a result with an exception set")
        interrupt = err if isinstance(err, KeyboardInterrupt) else err.__cause__
        if not isinstance(interrupt, KeyboardInterrupt):
            raise
        what = f" ({interrupt})" if str(interrupt) else ""
        print(f"{PROG} {args.command}: interrupted{what}{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


# what an interrupted command leaves behind, where it is worth saying
INTERRUPTED = {
    "synthesize": ": the shards already written stay complete; the same command makes only the rest",
    "sweep": ": the finished trials are kept; the same command resumes the sweep",
    "evaluate": ": the models already trained are kept; the same command scores them and trains the rest",
    "loop": ": the stores and models already made are kept; the same command reuses them",
    "train": ": the checkpoints saved so far are kept; the same command continues from the latest",
    "demo": ": the steps already done are kept; the same command does only what is missing",
}


if __name__ == "__main__":
    sys.exit(main())
