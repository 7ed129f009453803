"""engine.evaluation.stats: weighted metrics against scikit-learn, bootstrap intervals against
scipy.stats.bootstrap, the stratified resampling and the seed averaging by hand."""

import numpy as np
import pytest

from engine.evaluation.stats import (
    METRICS,
    PatientScores,
    excludes_zero,
    metric_values,
    paired_difference,
    resample_weights,
    summary,
)


def _runs(seed: int, n_pos: int = 14, n_neg: int = 22, seeds=(0, 1, 2), skill: float = 1.0) -> list[dict]:
    """Synthetic per-patient records: scores separate the classes by ``skill``; each positive
    patient has 2-5 positive slices with Dice in [0, 1]."""
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    positive = np.arange(n) < n_pos
    slices = rng.integers(2, 6, n) * positive
    runs = []
    for s in seeds:
        score = rng.normal(size=n) + skill * positive
        dice = rng.uniform(0, 1, (n, 5))
        found = rng.uniform(size=(n, 5)) < 0.8
        records = {}
        for i in range(n):
            k = int(slices[i])
            records[f"p{i:03d}"] = {
                "positive": bool(positive[i]), "score": float(score[i]), "called": bool(score[i] > 0.5 * skill),
                "scar_dice_sum": float(dice[i, :k].sum()), "scar_slices": k,
                "scar_tp_dice_sum": float(dice[i, :k][found[i, :k]].sum()), "scar_tp_slices": int(found[i, :k].sum()),
                "myocardium_dice_sum": float(rng.uniform(3, 6)), "myocardium_slices": 6}
        runs.append({"seed": s, "patients": records})
    return runs


def test_weighted_metrics_equal_scikit_learn_with_sample_weights():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score, roc_auc_score

    scores = PatientScores.from_runs(_runs(0))
    weights = resample_weights(scores.positive, 5, seed=3, stratified=False)
    y = scores.positive
    for metric, reference in [
        ("balanced_accuracy", lambda k, w: balanced_accuracy_score(y, scores.called[k], sample_weight=w)),
        ("accuracy", lambda k, w: accuracy_score(y, scores.called[k], sample_weight=w)),
        ("sensitivity", lambda k, w: recall_score(y, scores.called[k], sample_weight=w)),
        ("specificity", lambda k, w: recall_score(~y, ~scores.called[k], sample_weight=w)),
        ("auroc", lambda k, w: roc_auc_score(y, scores.score[k], sample_weight=w)),
    ]:
        got = metric_values(scores, metric, weights)
        for b in range(len(weights)):
            for k in range(len(scores.seeds)):
                assert got[b, k] == pytest.approx(reference(k, weights[b]), abs=1e-12), (metric, b, k)


def test_pooled_dice_of_a_resample_is_the_mean_over_its_patients_slices():
    """A patient drawn twice brings its slices twice: the pooled mean over the repeated slices."""
    runs = _runs(1, seeds=(0,))
    scores = PatientScores.from_runs(runs)
    weights = resample_weights(scores.positive, 3, seed=0)
    got = metric_values(scores, "dice", weights)[:, 0]
    records = runs[0]["patients"]
    for b, row in enumerate(weights):
        sums = sum(c * records[p]["scar_dice_sum"] for c, p in zip(row, scores.patients))
        count = sum(c * records[p]["scar_slices"] for c, p in zip(row, scores.patients))
        assert got[b] == pytest.approx(sums / count)


def _statistic(scores: PatientScores, metric: str, reference: PatientScores | None = None):
    """scipy's view: a function of the resampled patient indices (one seed)."""
    def statistic(index):
        w = np.bincount(index, minlength=len(scores.patients))[None, :]
        value = metric_values(scores, metric, w)[0, 0]
        return value - metric_values(reference, metric, w)[0, 0] if reference is not None else value
    return statistic


@pytest.mark.parametrize("metric", ["accuracy", "dice", "auroc"])
def test_unstratified_interval_matches_scipy_percentile_bootstrap(metric):
    from scipy.stats import bootstrap

    scores = PatientScores.from_runs(_runs(2, seeds=(0,)))
    ours = summary(scores, [metric], n_resamples=4000, seed=1, stratified=False)[metric]
    index = np.arange(len(scores.patients))
    theirs = bootstrap((index,), _statistic(scores, metric), vectorized=False, n_resamples=4000, method="percentile",
                       random_state=np.random.default_rng(5)).confidence_interval
    assert ours["ci95"][0] == pytest.approx(theirs.low, abs=0.02)
    assert ours["ci95"][1] == pytest.approx(theirs.high, abs=0.02)
    assert ours["ci95"][0] < ours["mean"] < ours["ci95"][1]


def test_paired_difference_matches_scipy_paired_bootstrap_and_is_narrower_than_unpaired():
    """Two arms on the same patients, the second a noisy copy of the first: the paired interval of
    the difference equals scipy's (one index resample for both) and is far narrower than what two
    independent intervals would suggest."""
    from scipy.stats import bootstrap

    runs = _runs(3, seeds=(0,))
    noisy = [{"seed": r["seed"], "patients": {p: {**rec, "score": rec["score"] + 0.3 * np.sin(i)}
                                              for i, (p, rec) in enumerate(r["patients"].items())}} for r in runs]
    a, b = PatientScores.from_runs(noisy), PatientScores.from_runs(runs)
    ours = paired_difference(a, b, ["auroc"], n_resamples=4000, seed=2, stratified=False)["auroc"]
    index = np.arange(len(a.patients))
    theirs = bootstrap((index,), _statistic(a, "auroc", b), vectorized=False, n_resamples=4000, method="percentile",
                       random_state=np.random.default_rng(7)).confidence_interval
    assert ours["ci95"] == pytest.approx([theirs.low, theirs.high], abs=0.02)
    single = summary(b, ["auroc"], n_resamples=4000, stratified=False)["auroc"]["ci95"]
    assert ours["ci95"][1] - ours["ci95"][0] < 0.5 * (single[1] - single[0])


def test_stratified_resamples_keep_each_class_count_and_sensitivity_spread_is_binomial():
    scores = PatientScores.from_runs(_runs(4, n_pos=40, n_neg=60, seeds=(0,)))
    weights = resample_weights(scores.positive, 4000, seed=0)
    assert (weights[:, scores.positive].sum(1) == 40).all() and (weights[:, ~scores.positive].sum(1) == 60).all()
    sens = metric_values(scores, "sensitivity", weights)[:, 0]
    p = metric_values(scores, "sensitivity")[0, 0]
    assert sens.std() == pytest.approx(np.sqrt(p * (1 - p) / 40), rel=0.1)  # Binomial(40, p) / 40


def test_seeds_are_averaged_inside_each_resample_and_resampled_themselves():
    """Two seeds that call every patient oppositely: with the seeds held fixed, each resample's seed
    mean of sensitivity, specificity and balanced accuracy is exactly 0.5, so the interval is
    [0.5, 0.5], which hides that the two trainings disagree completely; resampling the seeds too
    draws (right, right) a quarter of the time and (wrong, wrong) a quarter: [0, 1]."""
    runs = _runs(5, seeds=(0, 1))
    for run, right in zip(runs, (True, False)):
        for record in run["patients"].values():
            record["called"] = record["positive"] == right
    scores = PatientScores.from_runs(runs)
    metrics = ["sensitivity", "specificity", "balanced_accuracy"]
    fixed = summary(scores, metrics, n_resamples=500, resample_seeds=False)
    both = summary(scores, metrics, n_resamples=500)
    for metric in metrics:
        entry = fixed[metric]
        assert entry["mean"] == 0.5 and entry["sd"] == pytest.approx(np.sqrt(0.5)) and entry["n"] == 2, metric
        assert entry["ci95"] == [0.5, 0.5], metric
        assert both[metric]["mean"] == 0.5 and both[metric]["ci95"] == [0.0, 1.0], metric


def test_seed_level_interval_matches_scipy_when_patients_do_not_vary():
    """Every patient alike within a seed (the patients' resampling then changes nothing): the
    two-level interval is the percentile bootstrap of the seeds' values, as scipy computes it."""
    from scipy.stats import bootstrap

    seeds = tuple(range(8))
    runs = _runs(9, n_pos=6, n_neg=6, seeds=seeds)
    values = np.random.default_rng(0).uniform(0.2, 0.9, len(seeds))
    for run, value in zip(runs, values):
        for record in run["patients"].values():
            record["scar_dice_sum"], record["scar_slices"] = (value, 1) if record["positive"] else (0.0, 0)
    got = summary(PatientScores.from_runs(runs), ["dice"], n_resamples=20000)["dice"]
    ref = bootstrap((values,), np.mean, n_resamples=20000, method="percentile", random_state=1).confidence_interval
    assert got["mean"] == pytest.approx(values.mean())
    assert got["ci95"] == pytest.approx([ref.low, ref.high], abs=0.01)
    assert got["ci95"][1] - got["ci95"][0] > 0.1  # a spread the fixed seeds would not show
    assert summary(PatientScores.from_runs(runs), ["dice"], resample_seeds=False)["dice"]["ci95"] == pytest.approx(
        [values.mean()] * 2)


def test_paired_seeds_are_drawn_together():
    """Two arms whose every seed is the other's plus 0.1 in Dice: with the seeds drawn together
    the difference is 0.1 in every resample, however much the seeds differ among themselves."""
    runs = _runs(10, seeds=(0, 1, 2, 3))
    shifted = _runs(10, seeds=(0, 1, 2, 3))
    for k, (run, other) in enumerate(zip(runs, shifted)):
        for pid, record in run["patients"].items():
            record["scar_dice_sum"] = 0.2 * k * record["scar_slices"]
            other["patients"][pid]["scar_dice_sum"] = (0.2 * k + 0.1) * record["scar_slices"]
    diff = paired_difference(PatientScores.from_runs(shifted), PatientScores.from_runs(runs), ["dice"],
                             n_resamples=500)["dice"]
    assert diff["diff"] == pytest.approx(0.1) and diff["ci95"] == pytest.approx([0.1, 0.1])


def test_summary_has_every_metric_with_an_interval_around_its_mean():
    got = summary(PatientScores.from_runs(_runs(6)), n_resamples=300)
    assert set(got) == set(METRICS)
    for metric, entry in got.items():
        lo, hi = entry["ci95"]
        assert lo <= entry["mean"] <= hi and entry["resamples"] == 300 and entry["n"] == 3, metric


def test_identical_arms_differ_by_exactly_zero():
    scores = PatientScores.from_runs(_runs(7))
    diff = paired_difference(scores, scores, n_resamples=200)
    assert all(d["diff"] == 0 and d["ci95"] == [0.0, 0.0] for d in diff.values())
    assert [excludes_zero(diff["auroc"]), excludes_zero({"ci95": [0.01, 0.2]}), excludes_zero({"ci95": [-0.3, -0.1]}),
            excludes_zero({"ci95": [None, None]}), excludes_zero(None)] == [0, 1, -1, 0, 0]


def test_runs_over_other_patients_are_refused_by_name():
    runs = _runs(8, seeds=(0, 1))
    del runs[1]["patients"]["p003"]
    with pytest.raises(ValueError, match=r"seed 1: scored on other patients than seed 0 \(differing: \['p003'\]\)"):
        PatientScores.from_runs(runs)
    a = PatientScores.from_runs(_runs(8, seeds=(0,)))
    b = PatientScores.from_runs(_runs(8, n_pos=13, seeds=(0,)))
    with pytest.raises(ValueError, match="lgesynthnet vs real only: not tested on the same patients"):
        paired_difference(a, b, what="lgesynthnet vs real only")
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        metric_values(a, "f1")
