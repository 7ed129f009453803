"""evaluation.test_cohort: an external cohort as the test set, on phantom cohorts written to disk."""

import json

import pytest

from engine.phantom import write_phantom_cohort
from engine.phantom.config import PhantomConfig
from engine.training.prepare import prepare_arrays
from tests.synth_helpers import tiny_config


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """A training cohort of 6 patients and an external one of 4, numbered from 1001, another seed."""
    root = tmp_path_factory.mktemp("test_cohort")
    write_phantom_cohort(root / "cohort", 6, seed=3, cfg=PhantomConfig(image_size=128))
    write_phantom_cohort(root / "external", 4, seed=11, cfg=PhantomConfig(image_size=128), first_case=1001)
    return root


def test_first_case_numbers_a_cohort_apart_and_keeps_each_patient(cohorts, tmp_path):
    ids = sorted(e["patient_id"] for e in json.loads((cohorts / "external" / "manifest.json").read_text()))
    assert [i[-4:] for i in ids] == ["1001", "1002", "1003", "1004"]
    same = write_phantom_cohort(tmp_path / "plain", 4, seed=11, cfg=PhantomConfig(image_size=128))
    assert [e["pattern"] for e in same] == [e["pattern"] for e in json.loads((cohorts / "external" / "manifest.json").read_text())]
    with pytest.raises(ValueError, match="first_case must be an int >= 1"):
        write_phantom_cohort(tmp_path / "bad", 1, first_case=0)


def test_the_external_cohort_is_the_test_split_and_the_own_cohort_trains_and_validates(cohorts, tmp_path):
    cfg = tiny_config(cohorts, tmp_path, [f"evaluation.test_cohort={cohorts / 'external'}"])
    parts, splits = prepare_arrays(cfg)
    external = {e["patient_id"] for e in json.loads((cohorts / "external" / "manifest.json").read_text())}
    own = {e["patient_id"] for e in json.loads((cohorts / "cohort" / "manifest.json").read_text())}
    assert set(splits["test"]) == external == set(parts["test"].patient_id)
    assert set(splits["train"]) | set(splits["val"]) == own and not set(splits["train"]) & set(splits["val"])
    assert splits["val"] and splits["train"]
    stored = json.loads((tmp_path / "splits.json").read_text())
    assert stored["test_cohort"] == str(cohorts / "external") and stored["splits"] == splits
    # every later stage reads the same split back; a stage without the key is refused
    assert prepare_arrays(cfg)[1] == splits
    with pytest.raises(ValueError, match="external test cohort .* then, none now"):
        prepare_arrays(tiny_config(cohorts, tmp_path))


def test_a_bad_test_cohort_is_refused_before_anything_trains(cohorts, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="evaluation.test_cohort .*nowhere: no such folder"):
        prepare_arrays(tiny_config(cohorts, tmp_path / "a", [f"evaluation.test_cohort={tmp_path / 'nowhere'}"]))
    # the training cohort itself: every id shared
    with pytest.raises(ValueError, match=r"6 patient id\(s\) are also in the run's cohort .*--first-case 1001"):
        prepare_arrays(tiny_config(cohorts, tmp_path / "b", [f"evaluation.test_cohort={cohorts / 'cohort'}"]))
    broken = tmp_path / "broken"
    shutil.copytree(cohorts / "external", broken)
    case = sorted(p for p in broken.iterdir() if p.is_dir())[0]
    image = next((case / "Images").iterdir())
    image.write_bytes(image.read_bytes()[:200])  # a truncated NIfTI
    with pytest.raises(ValueError, match=r"evaluation.test_cohort .*broken is refused: it does not validate.*\n.*"
                                         + case.name):
        prepare_arrays(tiny_config(cohorts, tmp_path / "c", [f"evaluation.test_cohort={broken}"]))
    assert not (tmp_path / "c" / "splits.json").exists()


def test_the_demo_makes_its_own_test_phantom_and_points_the_evaluation_at_it(tmp_path):
    from engine.config import apply_overrides, from_dict
    from engine.demo import demo_config, make_phantoms, validate_phantoms
    from engine.settings import EngineConfig

    overrides = ["cohort.root=x", "run_dir=r", "phantom.image_size=128", "demo.patients=4", "demo.test_patients=4",
                 "demo.test_first_case=101", "demo.test_negative_fraction=0.5"]
    cfg = demo_config(from_dict(EngineConfig, apply_overrides({}, overrides)), tmp_path / "run")
    assert cfg.evaluation.test_cohort == str(tmp_path / "run" / "test_cohort")
    assert demo_config(cfg, None) == cfg  # applied twice: the same
    said = make_phantoms(cfg)
    assert "cohort: 4 patients" in said and "test_cohort: 4 patients" in said
    tests = json.loads((tmp_path / "run" / "test_cohort" / "manifest.json").read_text())
    assert sorted(int(e["patient_id"][-3:]) for e in tests) == [101, 102, 103, 104]
    assert validate_phantoms(cfg) == "8 cases, clean" and "exists, reused" in make_phantoms(cfg)
    with pytest.raises(ValueError, match="demo.test_patients 4 makes the test phantom .* set one of the two"):
        demo_config(from_dict(EngineConfig, apply_overrides({}, [*overrides, "evaluation.test_cohort=elsewhere"])), None)
    with pytest.raises(ValueError, match="test_first_case 3 must be above patients"):
        from_dict(EngineConfig, apply_overrides({}, [*overrides, "demo.test_first_case=3"]))


def test_the_demo_says_what_its_budget_can_show_from_its_own_interval():
    from engine.demo import budget_text

    def evaluation(ci95, collapsed=0, mean=0.6):
        return {"real_only": {"utility": {"patients": 10, "collapsed": collapsed, "runs": [{}, {}],
                                          "balanced_accuracy": {"mean": mean, "ci95": ci95}}}}

    wide = budget_text(evaluation([0.3, 0.9]))
    assert "[0.300, 0.900], 0.60 wide" in wide and "not shown" in wide and "configs/study.yaml" in wide
    # collapsed runs give a degenerate interval: it is not read as a spread a method must beat
    collapsed = budget_text(evaluation([0.5, 0.5], collapsed=2, mean=0.5))
    assert "2 of 2 real-only downstream runs collapsed" in collapsed and "0.00 wide" not in collapsed
    assert "detects nothing" in collapsed and "configs/study.yaml" in collapsed
    assert "configs/study.yaml" in budget_text(None) and "minutes" in budget_text(None)
