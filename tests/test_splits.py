"""Patient-level, stratified, deterministic train/val/test splits."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from engine.io.splits import SPLITS, SplitConfig, split_patients, split_records


def cohort(n_pos: int, n_neg: int) -> dict[str, bool]:
    patients = {f"Case_P{i:03d}": True for i in range(1, n_pos + 1)}
    patients.update({f"Case_N{i:03d}": False for i in range(1, n_neg + 1)})
    return patients


@pytest.mark.parametrize("n_pos, n_neg", [(67, 33), (10, 5), (3, 3), (4, 0), (1, 1), (0, 7)])
@pytest.mark.parametrize("seed", [0, 1, 17])
def test_no_patient_crosses_splits(n_pos, n_neg, seed):
    patients = cohort(n_pos, n_neg)
    splits = split_patients(patients, seed=seed)
    assert set(splits) == set(SPLITS)
    for a, b in itertools.combinations(SPLITS, 2):
        assert not set(splits[a]) & set(splits[b]), (a, b)
    union = [pid for name in SPLITS for pid in splits[name]]
    assert sorted(union) == sorted(patients)  # every patient exactly once


@pytest.mark.parametrize(
    "n_pos, n_neg, fractions, expected",
    [
        # EMIDEC-sized: 67 positive, 33 negative; largest remainder per stratum
        (67, 33, (0.6, 0.2, 0.2), {"train": (40, 20), "val": (14, 7), "test": (13, 6)}),
        (10, 5, (0.6, 0.2, 0.2), {"train": (6, 3), "val": (2, 1), "test": (2, 1)}),
        (3, 3, (0.6, 0.2, 0.2), {"train": (1, 1), "val": (1, 1), "test": (1, 1)}),
        (20, 10, (0.5, 0.25, 0.25), {"train": (10, 5), "val": (5, 3), "test": (5, 2)}),
    ],
)
def test_stratified_proportions(n_pos, n_neg, fractions, expected):
    patients = cohort(n_pos, n_neg)
    splits = split_patients(patients, fractions=fractions, seed=3)
    counts = {name: (sum(patients[p] for p in ids), sum(not patients[p] for p in ids)) for name, ids in splits.items()}
    assert counts == expected


def test_each_split_non_empty_with_three_patients_in_a_stratum():
    for seed in range(5):
        splits = split_patients(cohort(3, 1), fractions=(0.8, 0.1, 0.1), seed=seed)
        assert all(splits[name] for name in SPLITS), splits


def test_deterministic_by_seed_and_sensitive_to_it():
    patients = cohort(30, 15)
    assert split_patients(patients, seed=5) == split_patients(patients, seed=5)
    assert split_patients(patients, seed=5) != split_patients(patients, seed=6)


def test_independent_of_dict_order():
    patients = cohort(25, 12)
    items = list(patients.items())
    random.Random(0).shuffle(items)
    assert split_patients(dict(items), seed=2) == split_patients(patients, seed=2)
    assert split_patients(dict(reversed(items)), seed=2) == split_patients(patients, seed=2)


def test_split_records_groups_by_patient_and_drops_nothing():
    patients = cohort(6, 3)
    splits = split_patients(patients, seed=0)
    records = [SimpleNamespace(patient_id=pid, source=f"{pid}/{k}") for pid in patients for k in range(4)]
    grouped = split_records(records, splits)
    assert sum(len(v) for v in grouped.values()) == len(records)
    for name, recs in grouped.items():
        assert {r.patient_id for r in recs} <= set(splits[name])
    with pytest.raises(ValueError, match="in no split"):
        split_records([SimpleNamespace(patient_id="Case_X999", source="Case_X999/0")], splits)
    with pytest.raises(ValueError, match="in both"):
        split_records(records, {"train": ["Case_P001"], "val": [], "test": ["Case_P001"]})


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"fractions": (0.5, 0.5)}, "three numbers"),
        ({"fractions": (0.6, 0.4, 0.0)}, "> 0"),
        ({"fractions": (0.6, 0.5, -0.1)}, "> 0"),
        ({"fractions": (0.6, 0.3, 0.3)}, "sum to 1"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_split_config_is_validated(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        SplitConfig(**kwargs)


def test_split_config_splits():
    patients = cohort(10, 5)
    assert SplitConfig(seed=4).split(patients) == split_patients(patients, seed=4)


def test_synthetic_samples_of_held_out_patients_never_train_the_downstream_model(tmp_path, caplog):
    """Samples made from a validation or test patient's slices are refused for training, whichever
    of ``parts`` and the run's split file names that patient; the training patients' pass."""
    import json

    from engine.training.downstream import held_out_patients, refuse_held_out_sources

    parts = {"train": SimpleNamespace(patient_id=["Case_P001", "Case_P001", "Case_N001"]),
             "val": SimpleNamespace(patient_id=["Case_P002"])}  # the test patients dropped, as the sweep does
    assert held_out_patients(tmp_path, parts) == {"Case_P002"}
    (tmp_path / "splits.json").write_text(json.dumps({"splits": {
        "train": ["Case_P001", "Case_N001"], "val": ["Case_P002"], "test": ["Case_P003", "Case_N002"]}}))
    held = held_out_patients(tmp_path, parts)
    assert held == {"Case_P002", "Case_P003", "Case_N002"}
    refuse_held_out_sources(["Case_P001/3", "Case_N001/0", "Case_P001/4"], held, "s3://b/train.zarr")
    with pytest.raises(ValueError, match=r"s3://b/v\.zarr: 2 of the 3 synthetic samples .* 2 validation or test "
                                         r"patient\(s\) of this run \(Case_N002, Case_P002\)"):
        refuse_held_out_sources(["Case_P002/1", "Case_P001/2", "Case_N002/0"], held, "s3://b/v.zarr")
    with caplog.at_level("WARNING", logger="engine.training.downstream"):
        refuse_held_out_sources(None, held, "own.zarr")  # a user's store without sources: said, not refused
    assert "own.zarr: the synthetic samples do not record their source slice" in caplog.text
