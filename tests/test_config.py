"""engine.config: typed configs from YAML and key=value overrides, with errors naming the dotted key."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from engine.config import ConfigError, apply_overrides, dump_config, from_dict, load_config, parse_override, to_dict


@dataclass
class SamplerConfig:
    levels: tuple[str, ...] = ("basal", "mid")
    transmurality: tuple[float, float] = (0.2, 1.0)


@dataclass
class CohortConfig:
    root: str = "data/emidec"
    reference_angle: float = 120.0
    mirrored: bool = False
    max_patients: Optional[int] = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        if not 0.0 <= self.reference_angle < 360.0:
            raise ValueError(f"reference_angle must be in [0, 360), got {self.reference_angle}")


@dataclass
class RunConfig:
    name: str
    cohort: CohortConfig = field(default_factory=CohortConfig)
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    checkpoint: Path | None = None
    batch_sizes: dict[str, int] = field(default_factory=lambda: {"reward": 8})
    folds: list[int] = field(default_factory=lambda: [0, 1])


def test_defaults():
    config = from_dict(RunConfig, {"name": "demo"})
    assert config == RunConfig(name="demo")
    assert config.cohort.sampler.levels == ("basal", "mid")


def test_full_tree_and_round_trip(tmp_path):
    data = {
        "name": "paper", "seed": 7, "device": "cuda", "checkpoint": "runs/a/reward",
        "batch_sizes": {"reward": 16, "generator": 4}, "folds": [0, 1, 2],
        "cohort": {"root": "s3://bucket/emidec", "reference_angle": 110, "mirrored": True, "max_patients": 20,
                   "sampler": {"levels": ["apical"], "transmurality": [0.5, 0.75]}},
    }
    config = from_dict(RunConfig, data)
    assert config.checkpoint == Path("runs/a/reward")
    assert config.cohort.reference_angle == 110.0 and isinstance(config.cohort.reference_angle, float)
    assert config.cohort.sampler == SamplerConfig(levels=("apical",), transmurality=(0.5, 0.75))
    plain = to_dict(config)
    assert json.loads(json.dumps(plain)) == plain  # tuples became lists, paths strings
    assert plain["cohort"]["sampler"]["levels"] == ["apical"]
    assert from_dict(RunConfig, plain) == config
    dump_config(config, tmp_path / "sub" / "run.yaml")
    assert load_config(RunConfig, tmp_path / "sub" / "run.yaml") == config


@pytest.mark.parametrize(
    "overrides, check",
    [
        (["seed=3"], lambda c: c.seed == 3),
        (["cohort.reference_angle=90"], lambda c: c.cohort.reference_angle == 90.0),
        (["cohort.mirrored=true"], lambda c: c.cohort.mirrored is True),
        (["cohort.sampler.levels=[apical,mid]"], lambda c: c.cohort.sampler.levels == ("apical", "mid")),
        (["cohort.max_patients=null"], lambda c: c.cohort.max_patients is None),
        (["name=hello"], lambda c: c.name == "hello"),
        # a dict field's default is replaced, not merged: overrides act on the raw YAML data
        (["batch_sizes.generator=2"], lambda c: c.batch_sizes == {"generator": 2}),
        (["cohort.reference_angle=1e2"], lambda c: c.cohort.reference_angle == 100.0),
        (["seed=1", "seed=2"], lambda c: c.seed == 2),
        (["cohort={root: x}"], lambda c: c.cohort == CohortConfig(root="x")),
    ],
)
def test_overrides(tmp_path, overrides, check):
    path = tmp_path / "run.yaml"
    path.write_text("name: demo\ncohort:\n  max_patients: 5\n")
    assert check(load_config(RunConfig, path, overrides))


def test_apply_overrides_leaves_input_alone():
    data = {"cohort": {"root": "a"}}
    assert apply_overrides(data, ["cohort.sampler.levels=[mid]", "seed=3"]) == {
        "cohort": {"root": "a", "sampler": {"levels": ["mid"]}}, "seed": 3}
    assert data == {"cohort": {"root": "a"}}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.b=3", ("a.b", 3)),
        ("x=true", ("x", True)),
        ("names=[a,b]", ("names", ["a", "b"])),
        ("s=hello", ("s", "hello")),
        ("s=a=b", ("s", "a=b")),
        ("lr=1e-4", ("lr", 1e-4)),
        ("x=", ("x", None)),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["seed", "=3", "a..b=1", ".a=1", "a.=1", "x=[1,"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="malformed override") as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_override_through_a_scalar():
    with pytest.raises(ConfigError, match=r"'seed' holds int 0, not a mapping"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


@pytest.mark.parametrize(
    "data, fragments",
    [
        # unknown keys, with suggestions
        ({"name": "a", "sed": 1}, ["unknown key 'sed'", "did you mean 'seed'?"]),
        ({"name": "a", "cohort": {"refrence_angle": 1}},
         ["unknown key 'cohort.refrence_angle'", "did you mean 'reference_angle'?"]),
        ({"name": "a", "cohort": {"sampler": {"level": ["mid"]}}},
         ["unknown key 'cohort.sampler.level'", "did you mean 'levels'?"]),
        ({"name": "a", "zzz": 1}, ["unknown key 'zzz'", "valid keys: name, cohort"]),
        # wrong types
        ({"name": "a", "seed": "3"}, ["seed: expected int, got str '3'"]),
        ({"name": "a", "seed": 1.5}, ["seed: expected int, got float 1.5"]),
        ({"name": "a", "seed": True}, ["seed: expected int, got bool True"]),
        ({"name": "a", "cohort": {"reference_angle": "abc"}},
         ["cohort.reference_angle: expected float, got str 'abc'"]),
        ({"name": "a", "cohort": {"reference_angle": False}}, ["cohort.reference_angle: expected float, got bool"]),
        ({"name": "a", "cohort": {"mirrored": "yes"}}, ["cohort.mirrored: expected bool, got str 'yes'"]),
        ({"name": "a", "cohort": {"mirrored": 1}}, ["cohort.mirrored: expected bool, got int 1"]),
        ({"name": 5}, ["name: expected str, got int 5"]),
        ({"name": None}, ["name: expected str, got None"]),
        ({"name": "a", "device": "tpu"}, ["device: expected one of 'cpu', 'cuda', got str 'tpu'"]),
        ({"name": "a", "cohort": {"sampler": {"transmurality": [0.1, 0.2, 0.3]}}},
         ["cohort.sampler.transmurality: expected tuple[float, float] (2 items), got 3 items"]),
        ({"name": "a", "cohort": {"sampler": {"transmurality": [0.1, "x"]}}},
         ["cohort.sampler.transmurality[1]: expected float, got str 'x'"]),
        ({"name": "a", "cohort": {"sampler": {"levels": "mid"}}}, ["cohort.sampler.levels: expected tuple[str, ...]"]),
        ({"name": "a", "folds": [0, "1"]}, ["folds[1]: expected int, got str '1'"]),
        ({"name": "a", "batch_sizes": {"reward": 2.5}}, ["batch_sizes.reward: expected int, got float 2.5"]),
        ({"name": "a", "batch_sizes": {1: 2}}, ["batch_sizes.1 (key): expected str, got int 1"]),
        ({"name": "a", "cohort": {"max_patients": "all"}}, ["cohort.max_patients: expected int | None"]),
        ({"name": "a", "cohort": [1, 2]}, ["cohort: expected a mapping for CohortConfig, got list"]),
        ({"name": "a", "checkpoint": 3}, ["checkpoint: expected Path | None, got int 3"]),
        # missing required, __post_init__
        ({}, ["missing required key 'name'"]),
        ({"name": "a", "cohort": {"reference_angle": 400}},
         ["cohort: reference_angle must be in [0, 360), got 400.0"]),
    ],
)
def test_invalid_data_names_the_key(data, fragments):
    with pytest.raises(ConfigError) as info:
        from_dict(RunConfig, data)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_int_accepted_for_float():
    config = from_dict(CohortConfig, {"reference_angle": 90})
    assert config.reference_angle == 90.0 and type(config.reference_angle) is float


def test_path_prefix_and_source():
    with pytest.raises(ConfigError) as info:
        from_dict(CohortConfig, {"mirrored": "no"}, path="cohort", source="configs/demo.yaml")
    assert str(info.value) == "configs/demo.yaml: cohort.mirrored: expected bool, got str 'no'"
    assert info.value.key == "cohort.mirrored" and info.value.source == "configs/demo.yaml"


@pytest.mark.parametrize(
    "content, overrides, fragments",
    [
        (None, [], ["config file not found"]),
        ("name: [a\n", [], ["invalid YAML"]),
        ("name: a\nname: b\n", [], ["invalid YAML", "duplicate key 'name'"]),
        ("- a\n- b\n", [], ["top level must be a mapping", "got list"]),
        ("name: a\ncohort:\n  reference_angle: abc\n", [], ["cohort.reference_angle: expected float, got str 'abc'"]),
        ("name: a\n", ["cohort.refrence_angle=3"],
         ["(override 'cohort.refrence_angle=3')", "unknown key 'cohort.refrence_angle'", "did you mean"]),
        ("name: a\n", ["seed=abc"], ["(override 'seed=abc')", "seed: expected int, got str 'abc'"]),
        ("name: a\n", ["cohort.reference_angle=-1"], ["cohort: reference_angle must be in [0, 360)"]),
    ],
)
def test_load_config_errors_name_the_file(tmp_path, content, overrides, fragments):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, path, overrides)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "cohort.yaml"
    path.write_text("# all defaults\n")
    assert load_config(CohortConfig, path) == CohortConfig()


def test_dumped_yaml_is_plain(tmp_path):
    config = RunConfig(name="demo", checkpoint=Path("runs/x"), cohort=CohortConfig(reference_angle=1e-4))
    dump_config(config, tmp_path / "run.yaml")
    text = (tmp_path / "run.yaml").read_text()
    assert "!!" not in text  # no python/tuple tags
    assert yaml.safe_load(text)["cohort"]["sampler"]["transmurality"] == [0.2, 1.0]
    assert load_config(RunConfig, tmp_path / "run.yaml") == config


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(TypeError, match="dataclass"):
        from_dict(dict, {})


@pytest.mark.parametrize("name", ["demo.yaml", "phantom.yaml", "paper.yaml", "study.yaml"])
def test_every_shipped_config_is_accepted(name):
    from pathlib import Path

    from engine.config import load_config
    from engine.settings import EngineConfig

    from engine.evaluation.sweep import check_sweep_thresholds

    check_sweep_thresholds(load_config(EngineConfig, Path(__file__).parents[1] / "configs" / name))


def test_a_sweep_threshold_below_the_filter_needs_the_rejected_candidates_kept():
    from engine.config import apply_overrides, from_dict
    from engine.evaluation.sweep import check_sweep_thresholds
    from engine.settings import EngineConfig

    base = ["cohort.root=c", "run_dir=r"]
    cfg = from_dict(EngineConfig, apply_overrides({}, [*base, "sweep.thresholds=[0.5,0.7]", "synthesis.threshold=0.6"]))
    with pytest.raises(ValueError, match=r"sweep.thresholds \[0.5\] lie below synthesis.threshold 0.6.*keep_rejected"):
        check_sweep_thresholds(cfg)
    check_sweep_thresholds(from_dict(EngineConfig, apply_overrides({}, [*base, "sweep.thresholds=[0.5]",
                                                                           "synthesis.keep_rejected=true"])))
