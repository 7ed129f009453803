"""The command line as a user runs it, on real files (the phantom cohort written to disk, corrupted
copies of it): the installed ``lgesynth`` script and the module in a subprocess where the process
matters (the console script, making the cohort), ``engine.cli.main`` in this process elsewhere (the
same argument parsing and exit codes, without paying each subprocess's imports on two cores)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import load_config
from engine.io.cohort import CohortConfig, load_cohort
from engine.io.splits import split_patients
from engine.settings import EngineConfig

REPO = Path(__file__).resolve().parents[1]
LGESYNTH = [sys.executable, "-m", "engine.cli"]


def run(*args, cwd=None):
    return subprocess.run([*LGESYNTH, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: ``engine.cli.main`` in this process; (exit code, stdout, stderr)."""
    from engine.cli import main

    def invoke(*args, entry=main):
        capsys.readouterr()
        try:
            code = entry([str(a) for a in args])
        except SystemExit as stop:  # argparse errors and --help
            code = stop.code
        out = capsys.readouterr()
        return int(code or 0), out.out, out.err

    return invoke


@pytest.fixture(scope="module")
def phantom40(tmp_path_factory):
    """The issue's acceptance cohort: 40 patients, seed 0, full size."""
    out = tmp_path_factory.mktemp("phantom") / "c"
    result = run("phantom", out, "--patients", 40, "--seed", 0, "--preview", out.parent / "preview.png")
    assert result.returncode == 0, result.stderr
    return out


def test_phantom_then_validate_exits_zero(phantom40):
    result = run("validate", phantom40)  # the module in its own process, as `lgesynth` runs it
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert "40 case(s) checked, clean" in result.stderr
    assert (phantom40.parent / "preview.png").stat().st_size > 10_000


def test_phantom_cohort_loads_into_records_and_splits_by_patient(phantom40):
    cohort = load_cohort(CohortConfig(root=str(phantom40)))
    manifest = json.loads((phantom40 / "manifest.json").read_text())
    assert {m["patient_id"]: m["positive"] for m in manifest} == cohort.patients
    assert 0.15 <= 1 - np.mean(list(cohort.patients.values())) <= 0.5
    for pid in cohort.patients:
        levels = [r.level for r in cohort.patient_records(pid)]
        order = {"basal": 0, "mid": 1, "apical": 2, "apex": 3}
        assert [order[x] for x in levels] == sorted(order[x] for x in levels), (pid, levels)
    splits = split_patients(cohort.patients, seed=0)
    seen = [p for part in splits.values() for p in part]
    assert sorted(seen) == sorted(cohort.patients) and len(seen) == len(set(seen))
    by_split = {p: name for name, part in splits.items() for p in part}
    for record in cohort.records:  # every slice lands on its patient's side only
        assert record.patient_id in by_split


def corrupt_truncate(root):
    path = root / "Case_P001" / "Images" / "Case_P001.nii.gz"
    if not path.exists():
        path = next(root.glob("Case_*/Images/*.nii.gz"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def corrupt_remove_label(root):
    path = next(root.glob("Case_*/Contours/*.nii.gz"))
    path.unlink()
    return path


def corrupt_nan(root):
    import nibabel as nib

    path = next(root.glob("Case_*/Images/*.nii.gz"))
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[10, 10, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return path


@pytest.mark.parametrize(
    "corrupt, phrase",
    [(corrupt_truncate, "unreadable or truncated"), (corrupt_remove_label, "missing label file"), (corrupt_nan, "NaN/Inf")],
)
def test_validate_bad_cohort_exits_one_with_file_and_reason(phantom40, tmp_path, corrupt, phrase, cli):
    root = tmp_path / "bad"
    shutil.copytree(phantom40, root)
    path = corrupt(root)
    code, out, _ = cli("validate", root, "--report", tmp_path / "report.json")
    assert code == 1
    lines = out.strip().splitlines()
    assert any(str(path) in line and phrase in line for line in lines), lines
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["problems"]


def test_validate_empty_cohort(tmp_path, cli):
    code, out, _ = cli("validate", tmp_path)
    assert code == 1 and "empty cohort" in out


def test_preview_of_any_cohort(phantom40, tmp_path, cli):
    code, _, err = cli("preview", phantom40, tmp_path / "p.png", "--count", 2)
    assert code == 0, err
    assert (tmp_path / "p.png").stat().st_size > 10_000
    code, _, err = cli("preview", phantom40, tmp_path / "q.png", "--patients", "Case_X999")
    assert code == 2 and "Case_X999" in err


def test_phantom_overrides_are_validated(tmp_path, cli):
    code, _, err = cli("phantom", tmp_path / "c", "--patients", 2, "image_sise=128")
    assert code == 2 and "image_sise" in err and "image_size" in err
    code, _, err = cli("phantom", tmp_path / "c", "--patients", 2, "image_size=abc")
    assert code == 2 and "phantom.image_size" in err


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(config):
    cfg = load_config(EngineConfig, config)
    assert cfg.cohort.root


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("cohort.refrence_angle=3", "did you mean 'reference_angle'"),
        ("split.seed=abc", "split.seed"),
        ("cohort.on_invalid=ignore", "cohort.on_invalid"),
        ("scar_sampler.angular_width=[50,10]", "angular_width"),
        ("nonsense", "nonsense"),
    ],
)
def test_config_command_names_the_bad_key(override, phrase, cli):
    code, _, err = cli("config", "--config", REPO / "configs" / "demo.yaml", override)
    assert code == 2
    assert phrase in err


def test_config_command_applies_overrides(cli):
    code, out, err = cli("config", "--config", REPO / "configs" / "demo.yaml", "split.seed=7", "cohort.mirrored=true")
    assert code == 0, err
    assert "seed: 7" in out and "mirrored: true" in out


def test_console_script_is_installed():
    exe = shutil.which("lgesynth")
    assert exe, "the console script `lgesynth` is not on PATH (pip install -e . installs it)"
    result = subprocess.run([exe, "validate", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "one line per" in result.stdout


def test_phantom_refuses_a_folder_holding_other_cases(tmp_path, cli):
    (tmp_path / "c" / "Case_P001" / "Images").mkdir(parents=True)
    code, _, err = cli("phantom", tmp_path / "c", "--patients", 2, "image_size=96")
    assert code == 2
    assert "did not make" in err and "Case_P001" in err
    assert (tmp_path / "c" / "Case_P001").is_dir()  # nothing of the user's was deleted


def _job_main(job: Path):
    spec = importlib.util.spec_from_file_location(f"lgesynth_job_{job.stem}", job)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_job_entrypoint_runs_as_a_script():
    job = REPO / "jobs" / "train_reward.py"
    result = subprocess.run([sys.executable, str(job), "--config", str(REPO / "configs" / "demo.yaml"), "reward.loop.epocs=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "reward.loop.epocs" in result.stderr


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_job_entrypoints_parse_and_validate(job, cli):
    code, out, _ = cli("--help", entry=_job_main(job))
    assert code == 0 and "--config" in out
    code, _, err = cli("--config", REPO / "configs" / "demo.yaml", "reward.loop.epocs=3", entry=_job_main(job))
    assert code == 2 and "reward.loop.epocs" in err


def test_ctrl_c_inside_a_c_extension_call_is_still_an_interrupt(monkeypatch, capsys):
    """A KeyboardInterrupt raised while a C extension runs (Ray's ``CoreWorker.wait`` in Tune's
    loop) reaches Python as a SystemError caused by it: exit 130 with one line all the same; any
    other SystemError is not swallowed."""
    import engine.cli as cli

    def interrupted_in_c(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from err

    monkeypatch.setattr(cli, "_sweep", interrupted_in_c)
    assert cli.main(["sweep", "--config", "configs/demo.yaml"]) == 130
    assert capsys.readouterr().err.strip() == (
        "lgesynth sweep: interrupted: the finished trials are kept; the same command resumes the sweep")

    def broken(args):
        raise SystemError("something else")

    monkeypatch.setattr(cli, "_sweep", broken)
    with pytest.raises(SystemError, match="something else"):
        cli.main(["sweep", "--config", "configs/demo.yaml"])
