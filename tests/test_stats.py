"""Patient-bootstrap intervals, paired comparisons (bootstrap and DeLong) and the evaluation's use
of them, on small synthetic score sets."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from sparsegan import stats
from sparsegan.evaluate import compare_to_reference, evaluate_row, seed_metrics
from sparsegan.params import Params
from sparsegan.metrics import detection_metrics
from sparsegan.stats import (METRICS, bootstrap_distribution, delong_test, paired_bootstrap,
                             patient_bootstrap, patient_codes, resample_indices, weighted_metrics)


def make_set(n_patients: int, scans: int = 4, seed: int = 0, shift: float = 1.2,
             patient_sd: float = 0.5, round_to: int | None = 1):
    """Labels per patient (about 60% diseased), scores = patient effect + scan noise + shift for
    diseased; rounded so that there are ties. Patients are strings, scans shuffled."""
    rng = np.random.default_rng(seed)
    pat = np.repeat(np.arange(n_patients), scans)
    lab = (rng.random(n_patients) < 0.6).astype(int)
    lab[:2] = [0, 1]
    effect = rng.normal(0, patient_sd, n_patients)
    scores = effect[pat] + rng.normal(0, 1, len(pat)) + shift * lab[pat]
    if round_to is not None:
        scores = np.round(scores, round_to)
    perm = rng.permutation(len(pat))
    return lab[pat][perm], scores[perm], np.array([f"P{p:04d}" for p in pat[perm]])


# ------------------------------------------------------------------------- weighted metrics

def test_point_estimates_equal_detection_metrics_and_sklearn():
    labels, scores, _ = make_set(30)
    phi = float(np.median(scores))
    point = {k: v[0] for k, v in weighted_metrics(labels, scores, np.ones((1, len(labels))),
                                                  phi).items()}
    assert point == pytest.approx(detection_metrics(labels, scores, phi))
    assert point["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert point["average_precision"] == pytest.approx(average_precision_score(labels, scores))


def test_each_resample_equals_sklearn_on_its_explicit_scan_set():
    labels, scores, patients = make_set(25, seed=1)
    phi = 0.4
    dist = bootstrap_distribution(labels, scores, patients, phi, n_boot=20, seed=7)
    for b, idx in enumerate(resample_indices(patients, n_boot=20, seed=7)):
        y, s = labels[idx], scores[idx]
        if y.min() == y.max():
            assert np.isnan(dist["auc"][b])
            continue
        expected = detection_metrics(y, s, phi)
        got = {k: dist[k][b] for k in METRICS}
        assert got == pytest.approx(expected)


# ------------------------------------------------------------------------- patient resampling

def test_every_resample_is_a_union_of_whole_patients():
    labels, scores, patients = make_set(12, scans=3, seed=2)
    patients = patients.copy()
    patients[patients == "P0005"] = "P0004"  # one patient with 6 scans: sizes differ
    codes, n_patients = patient_codes(patients)
    sizes = np.bincount(codes)
    for idx in resample_indices(patients, n_boot=50, seed=0):
        per_scan = np.bincount(idx, minlength=len(codes))  # times each scan was drawn
        draws = 0
        for p in range(n_patients):
            mine = per_scan[codes == p]
            assert (mine == mine[0]).all()  # all of a patient's scans, or none, equally often
            draws += mine[0]
        assert draws == n_patients  # P patients drawn with replacement
        assert len(idx) == (per_scan[np.unique(codes, return_index=True)[1]] * sizes).sum()


def test_bootstrap_draws_patients_through_the_hook(monkeypatch):
    labels, scores, patients = make_set(20, scans=5, seed=3)
    calls = []
    real = stats.draw_patients

    def spy(n_patients, n_boot, rng):
        draws = real(n_patients, n_boot, rng)
        calls.append(draws)
        return draws

    monkeypatch.setattr(stats, "draw_patients", spy)
    patient_bootstrap(labels, scores, patients, phi=0.5, n_boot=30, seed=0)
    assert len(calls) == 1 and calls[0].shape == (30, 20)  # 20 patients drawn, not 100 scans
    # the weights derived from the draws are per patient: equal within a patient
    codes, _ = patient_codes(patients)
    weights = stats.draw_counts(calls[0], 20)[:, codes]
    for p in range(20):
        assert (weights[:, codes == p] == weights[:, codes == p][:, :1]).all()


def test_patient_intervals_are_wider_than_scan_intervals_for_clustered_scans():
    # scans of a patient nearly identical: the effective sample is the patients
    labels, scores, patients = make_set(40, scans=8, seed=4, patient_sd=2.0, shift=1.5,
                                        round_to=None)
    by_patient = patient_bootstrap(labels, scores, patients, 1.0, n_boot=500, seed=0)
    by_scan = patient_bootstrap(labels, scores, np.arange(len(labels)), 1.0, n_boot=500, seed=0)
    width = lambda r: r["auc"][1] - r["auc"][0]  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_scan)


def test_missing_patient_ids_are_patients_of_their_own():
    codes, n = patient_codes(["a", "", "a", "nan", None, "b"])
    assert n == 5
    assert codes[0] == codes[2] and len({codes[1], codes[3], codes[4]}) == 3


# ------------------------------------------------------------------------- intervals

def test_intervals_contain_the_point_estimate_and_shrink_with_more_patients():
    small = make_set(40, seed=5)
    large = make_set(160, seed=5)
    widths = []
    for labels, scores, patients in (small, large):
        phi = float(np.quantile(scores, 0.4))
        r = patient_bootstrap(labels, scores, patients, phi, n_boot=1000, seed=0)
        assert set(r) == set(METRICS) and r.n_boot == 1000
        point = detection_metrics(labels, scores, phi)
        assert r.point == pytest.approx(point)
        for k in METRICS:
            lo, hi = r[k]
            assert lo <= point[k] <= hi, k
            assert 0 <= lo < hi <= 1, k
        widths.append({k: r[k][1] - r[k][0] for k in METRICS})
    # 4x the patients -> about half the width (1/sqrt(4); 0.53 on average over 20 data seeds,
    # at most 0.64); require clearly narrower
    assert widths[1]["auc"] < 0.75 * widths[0]["auc"]
    for k in METRICS:
        assert widths[1][k] < widths[0][k], k


def test_same_seed_same_intervals_other_seed_differs():
    labels, scores, patients = make_set(30, seed=6)
    a = patient_bootstrap(labels, scores, patients, 0.5, n_boot=200, seed=1)
    b = patient_bootstrap(labels, scores, patients, 0.5, n_boot=200, seed=1)
    c = patient_bootstrap(labels, scores, patients, 0.5, n_boot=200, seed=2)
    assert dict(a) == dict(b) and dict(a) != dict(c)


def test_single_class_resamples_are_skipped_and_counted():
    # 3 patients, one diseased: (2/3)^3 of the resamples miss it, 1/27 hold only it
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.3, 0.2, 0.4, 0.9, 0.35])
    patients = np.array(["a", "a", "b", "b", "c", "c"])
    r = patient_bootstrap(labels, scores, patients, phi=0.32, n_boot=300, seed=0)
    expected = sum(labels[idx].min() == labels[idx].max()
                   for idx in resample_indices(patients, n_boot=300, seed=0))
    assert r.n_skipped == expected
    assert 0.2 * 300 < r.n_skipped < 0.45 * 300  # about 1/3 expected
    assert np.isfinite(r["auc"]).all()


def test_1000_resamples_of_400_scans_take_well_under_a_second():
    labels, scores, patients = make_set(100, scans=4, seed=7)
    patient_bootstrap(labels, scores, patients, 0.5, n_boot=50)  # warm-up
    tic = time.perf_counter()
    patient_bootstrap(labels, scores, patients, 0.5, n_boot=1000, seed=0)
    paired_bootstrap(labels, scores, scores[::-1], patients, n_boot=1000, seed=0)
    assert time.perf_counter() - tic < 2.0


# ------------------------------------------------------------------------- paired tests

def test_paired_bootstrap_identical_scores_gives_zero_delta_and_p_one():
    labels, scores, patients = make_set(40, seed=8)
    r = paired_bootstrap(labels, scores, scores.copy(), patients, n_boot=500, seed=0)
    assert r["delta_auc"] == 0.0 and r["ci"] == (0.0, 0.0) and r["p_value"] == 1.0


def test_paired_bootstrap_clearly_better_variant_excludes_zero():
    labels, scores, patients = make_set(60, seed=9, shift=2.5, round_to=None)
    rng = np.random.default_rng(0)
    worse = scores + rng.normal(0, 3, len(scores))  # the same signal drowned in noise
    r = paired_bootstrap(labels, scores, worse, patients, n_boot=1000, seed=0)
    assert r["delta_auc"] == pytest.approx(roc_auc_score(labels, scores)
                                           - roc_auc_score(labels, worse))
    assert r["delta_auc"] > 0.1
    assert 0 < r["ci"][0] <= r["delta_auc"] <= r["ci"][1]
    assert r["p_value"] < 0.01
    flipped = paired_bootstrap(labels, worse, scores, patients, n_boot=1000, seed=0)
    assert flipped["delta_auc"] == pytest.approx(-r["delta_auc"])
    assert flipped["ci"][1] < 0 and flipped["p_value"] == r["p_value"]


def _delong_bruteforce(labels, a, b):
    """DeLong et al. 1988 straight from the definition: psi(x, y) = 1, 1/2, 0."""
    comps10, comps01, aucs = [], [], []
    for s in (a, b):
        x, y = s[labels == 1], s[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        aucs.append(psi.mean())
        comps10.append(psi.mean(1))
        comps01.append(psi.mean(0))
    m, n = (labels == 1).sum(), (labels == 0).sum()
    cov = np.cov(comps10) / m + np.cov(comps01) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return aucs[0] - aucs[1], var


def test_delong_matches_its_definition():
    labels, scores, _ = make_set(30, seed=10)  # rounded: ties included
    other = np.round(scores + np.random.default_rng(1).normal(0, 1, len(scores)), 1)
    r = delong_test(labels, scores, other)
    delta, var = _delong_bruteforce(labels, scores, other)
    assert r["delta_auc"] == pytest.approx(delta)
    assert r["z"] == pytest.approx(delta / np.sqrt(var))
    from scipy.stats import norm
    assert r["p_value"] == pytest.approx(2 * norm.sf(abs(delta / np.sqrt(var))))
    assert r["ci"][1] - r["ci"][0] == pytest.approx(2 * 1.959964 * np.sqrt(var), rel=1e-5)
    same = delong_test(labels, scores, scores)
    assert same["delta_auc"] == 0 and same["p_value"] == 1.0


def test_paired_bootstrap_over_seeds():
    """(seeds, N) scores: one seed per side is the plain paired bootstrap; identical sides give
    0 and p 1; the point estimate is the difference of the seed-mean AUCs; resampling the seeds
    widens the interval when the seeds disagree."""
    labels, scores, patients = make_set(60, seed=9, shift=2.5, round_to=None)
    rng = np.random.default_rng(0)
    worse = scores + rng.normal(0, 3, len(scores))
    flat = paired_bootstrap(labels, scores, worse, patients, n_boot=400, seed=0)
    one = paired_bootstrap(labels, scores[None], worse[None], patients, n_boot=400, seed=0)
    assert one == flat
    two_a = np.stack([scores, scores + rng.normal(0, 1, len(scores))])
    two_b = np.stack([worse, worse + rng.normal(0, 1, len(scores))])
    same = paired_bootstrap(labels, two_a, two_a.copy(), patients, n_boot=300, seed=0)
    assert same["delta_auc"] == 0.0 and same["p_value"] == 1.0
    r = paired_bootstrap(labels, two_a, two_b, patients, n_boot=400, seed=0)
    mean_a = np.mean([roc_auc_score(labels, x) for x in two_a])
    mean_b = np.mean([roc_auc_score(labels, x) for x in two_b])
    assert r["delta_auc"] == pytest.approx(mean_a - mean_b)
    assert r["auc_a"] == pytest.approx(mean_a) and r["auc_b"] == pytest.approx(mean_b)
    # seeds that disagree a lot: drawing them with replacement widens the interval
    far = np.stack([worse, scores])
    wide = paired_bootstrap(labels, np.stack([scores, scores]), far, patients, n_boot=400, seed=0)
    narrow = paired_bootstrap(labels, scores, (worse + scores) / 2, patients, n_boot=400, seed=0)
    assert wide["ci"][1] - wide["ci"][0] > narrow["ci"][1] - narrow["ci"][0]


def test_paired_bootstrap_over_seeds_shapes_and_repeated_seeds():
    """Each side may have its own number of seeds; seeds that gave the very same scores change
    nothing (the resampled seed means equal that one row); the same call gives the same result;
    a seed row of another length than the labels is refused."""
    labels, scores, patients = make_set(50, seed=14, shift=2.0, round_to=None)
    rng = np.random.default_rng(3)
    other = scores + rng.normal(0, 2, len(scores))
    flat = paired_bootstrap(labels, scores, other, patients, n_boot=300, seed=1)
    repeated = paired_bootstrap(labels, np.stack([scores] * 3), np.stack([other] * 2), patients,
                                n_boot=300, seed=1)
    assert repeated["delta_auc"] == pytest.approx(flat["delta_auc"])
    assert repeated["ci"] == pytest.approx(flat["ci"]) and repeated["p_value"] == flat["p_value"]
    three = np.stack([scores, scores + rng.normal(0, 1, len(scores)), scores[::-1]])
    r = paired_bootstrap(labels, three, other, patients, n_boot=200, seed=1)
    assert r["auc_a"] == pytest.approx(np.mean([roc_auc_score(labels, x) for x in three]))
    assert r["auc_b"] == pytest.approx(roc_auc_score(labels, other))
    assert r["n_boot"] == 200 and r == paired_bootstrap(labels, three, other, patients,
                                                        n_boot=200, seed=1)
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap(labels, np.stack([scores, scores]), np.stack([other, other])[:, 1:],
                         patients, n_boot=10)


# ------------------------------------------------------------------------- evaluation

def write_scores(root, model, score, seed, labels, scores, patients, classes):
    d = root / "scores" / model / f"s{seed}" / score
    d.mkdir(parents=True)
    frame = pd.DataFrame({"path": [f"data/raw/{i}.jpeg" for i in range(len(labels))],
                          "label": labels, "class": classes, "patient": patients,
                          "mask": "", "score": scores})
    frame.to_csv(d / "test.csv", index=False)
    frame.to_csv(d / "val.csv", index=False)
    return d


def _calibration(phi=0.5, val_auc=0.8):
    return {"phi": phi, "criterion": "accuracy", "validation": {"auc": val_auc}}


def _classes(labels, seed=0):
    rng = np.random.default_rng(seed)
    return np.where(labels == 1, rng.choice(["CNV", "DME", "DRUSEN"], len(labels)), "NORMAL")


def test_seed_metrics_per_class_auc_ap_and_intervals(tmp_path):
    labels, scores, patients = make_set(50, seed=11)
    classes = _classes(labels)
    scores = scores + (classes == "CNV") * 1.0  # CNV easier than the others
    scores_dir = write_scores(tmp_path, "sparse_gan", "latent", 0, labels, scores, patients,
                              classes)
    m, roc = seed_metrics(scores_dir, _calibration(phi=0.6), None, n_boot=300)
    for cls in ("CNV", "DME", "DRUSEN"):
        subset = np.isin(classes, ["NORMAL", cls])
        assert m[f"test_auc_{cls}"] == pytest.approx(roc_auc_score(labels[subset], scores[subset]))
    assert m["test_auc_CNV"] > m["test_auc_DME"]
    assert m["test_average_precision"] == pytest.approx(average_precision_score(labels, scores))
    assert m["test_auc"] == pytest.approx(roc_auc_score(labels, scores))
    r = patient_bootstrap(labels, scores, patients, 0.6, n_boot=300, seed=0)
    for k in METRICS:
        assert (m[f"test_{k}_ci_low"], m[f"test_{k}_ci_high"]) == pytest.approx(r[k])
        assert m[f"test_{k}_ci_low"] <= m[f"test_{k}"] <= m[f"test_{k}_ci_high"]
    assert m["test_bootstrap_resamples"] == 300 and m["test_bootstrap_skipped"] == 0
    assert m["test_patients"] == 50
    assert m["phi"] == 0.6 and m["val_auc"] == 0.8 and "test_images_per_s" not in m
    assert all(isinstance(v, (int, float)) for k, v in m.items() if k != "criterion")
    assert set(roc.columns) >= {"fpr", "tpr", "threshold"}


def test_evaluate_row_writes_mean_spread_and_each_seed(tmp_path):
    labels, scores, patients = make_set(50, seed=13)
    classes = _classes(labels)
    rng = np.random.default_rng(1)
    params = Params(seeds=(3, 5), rows={"pix2pix_image": ("pix2pix", "image")})
    row_dir = tmp_path / "reports" / "rows" / "pix2pix_image"
    (row_dir / "calibration").mkdir(parents=True)
    per_seed = {}
    for seed, phi in ((3, 0.4), (5, 0.7)):
        s = scores + rng.normal(0, 0.5, len(scores))
        write_scores(tmp_path, "pix2pix", "image", seed, labels, s, patients, classes)
        (row_dir / "calibration" / f"s{seed}.json").write_text(json.dumps(_calibration(phi)))
        per_seed[seed] = roc_auc_score(labels, s)
    summary = evaluate_row("pix2pix_image", params, tmp_path / "processed", tmp_path / "scores",
                           tmp_path / "models", row_dir, log_mlflow=False, n_boot=50)
    saved = json.loads((row_dir / "metrics.json").read_text())
    assert json.dumps(saved, sort_keys=True) == json.dumps(summary, sort_keys=True)
    assert summary["n_seeds"] == 2 and sorted(summary["seeds"]) == ["3", "5"]
    a, b = per_seed[3], per_seed[5]
    assert summary["seeds"]["3"]["test_auc"] == pytest.approx(a)
    assert summary["test_auc"] == pytest.approx((a + b) / 2)
    assert summary["spread"]["test_auc"]["sd"] == pytest.approx(abs(a - b) / np.sqrt(2))
    assert summary["spread"]["phi"] == {"sd": pytest.approx(0.3 / np.sqrt(2)), "min": 0.4,
                                        "max": 0.7}
    assert summary["criterion"] == "accuracy"
    roc = pd.read_csv(row_dir / "roc.csv")
    assert set(roc["seed"]) == {3, 5} and set(roc["row"]) == {"pix2pix_image"}


def test_compare_to_reference_pairs_every_row(tmp_path):
    labels, scores, patients = make_set(60, seed=12, shift=2.5, round_to=None)
    classes = _classes(labels)
    noisy = scores + np.random.default_rng(0).normal(0, 3, len(scores))
    write_scores(tmp_path, "sparse_gan", "latent", 0, labels, scores, patients, classes)
    write_scores(tmp_path, "autoencoder", "image", 0, labels, noisy, patients, classes)
    write_scores(tmp_path, "pix2pix", "latent", 0, labels, scores, patients, classes)
    root = tmp_path / "scores"
    rows = {"autoencoder": ("autoencoder", "image"), "pix2pix_latent": ("pix2pix", "latent"),
            "sparse_gan": ("sparse_gan", "latent")}
    params = Params(seeds=(0,), rows=rows)
    out = compare_to_reference(params, root, n_boot=500)
    assert set(out) == {"autoencoder", "pix2pix_latent"}
    ae = out["autoencoder"]
    boot = paired_bootstrap(labels, scores, noisy, patients, n_boot=500, seed=0)
    assert ae["delta_auc"] == pytest.approx(boot["delta_auc"])
    assert (ae["delta_auc_ci_low"], ae["delta_auc_ci_high"]) == pytest.approx(boot["ci"])
    assert ae["delta_auc_ci_low"] > 0 and ae["p_value"] < 0.01 and ae["p_value_delong"] < 0.01
    assert ae["auc_reference"] == pytest.approx(roc_auc_score(labels, scores))
    assert ae["seeds_won"] == 1
    same = out["pix2pix_latent"]
    assert same["delta_auc"] == 0 and same["p_value"] == 1.0 and same["p_value_delong"] == 1.0
    assert all(isinstance(v, (int, float)) for v in ae.values())
    assert compare_to_reference(Params(rows={"autoencoder": ("autoencoder", "image")}),
                                root) == {}

    # rows in another order: refused
    test_csv = root / "autoencoder" / "s0" / "image" / "test.csv"
    pd.read_csv(test_csv).iloc[::-1].to_csv(test_csv, index=False)
    with pytest.raises(ValueError, match="same test scans"):
        compare_to_reference(params, root, n_boot=10)


def test_over_seeds_mean_sd_min_max():
    from sparsegan.stats import over_seeds
    out = over_seeds({0: {"auc": 0.7, "acc": 0.6}, 1: {"auc": 0.8, "acc": 0.6},
                      2: {"auc": 0.9, "acc": float("nan")}})
    assert out["auc"]["mean"] == pytest.approx(0.8) and out["auc"]["sd"] == pytest.approx(0.1)
    assert (out["auc"]["min"], out["auc"]["max"], out["auc"]["n"]) == (0.7, 0.9, 3)
    assert out["acc"] == {"mean": 0.6, "sd": 0.0, "min": 0.6, "max": 0.6, "n": 2}  # nan left out
    assert over_seeds({5: {"auc": 0.5}})["auc"]["sd"] == 0.0


def test_paired_over_seeds_uses_common_seeds_only():
    from sparsegan.stats import paired_over_seeds
    out = paired_over_seeds({0: 0.80, 1: 0.70, 2: 0.90, 3: 0.5}, {0: 0.75, 1: 0.72, 2: 0.80})
    assert out["n"] == 3 and out["wins"] == 2
    assert out["per_seed"] == pytest.approx({"0": 0.05, "1": -0.02, "2": 0.10})
    assert out["mean"] == pytest.approx(0.13 / 3)
    sd = np.std([0.05, -0.02, 0.10], ddof=1)
    assert out["sd"] == pytest.approx(sd) and out["t"] == pytest.approx(out["mean"] / (sd / np.sqrt(3)))
    assert (out["min"], out["max"]) == pytest.approx((-0.02, 0.10))


def test_paired_bootstrap_same_trainings_pairs_the_seed_draws():
    """Two scores of one model: seed i of both sides is one training, drawn together. Identical
    sides then give every resampled difference 0 (p exactly 1, a zero-width interval), and a
    score that is better by the same margin in every training gets a narrower interval than the
    independent draws of two separately trained models would give it."""
    labels, scores, patients = make_set(60, seed=5, shift=2.0, round_to=None)
    rng = np.random.default_rng(1)
    trainings = np.stack([scores + rng.normal(0, 2.5, len(scores)) for _ in range(5)])
    same = paired_bootstrap(labels, trainings, trainings.copy(), patients, n_boot=300, seed=0,
                            same_trainings=True)
    assert same["delta_auc"] == 0.0 and same["p_value"] == 1.0 and same["ci"] == (0.0, 0.0)
    apart = paired_bootstrap(labels, trainings, trainings.copy(), patients, n_boot=300, seed=0)
    assert apart["ci"][0] < 0 < apart["ci"][1]  # independent seed draws: the seeds' spread
    better = (trainings + scores) / 2  # each training's score moved toward the clean one
    paired = paired_bootstrap(labels, better, trainings, patients, n_boot=400, seed=0,
                              same_trainings=True)
    unpaired = paired_bootstrap(labels, better, trainings, patients, n_boot=400, seed=0)
    assert paired["delta_auc"] == pytest.approx(unpaired["delta_auc"]) and paired["delta_auc"] > 0
    assert paired["ci"][1] - paired["ci"][0] < unpaired["ci"][1] - unpaired["ci"][0]
    with pytest.raises(ValueError, match="one score row per training on both sides, got 5 and 2"):
        paired_bootstrap(labels, trainings, trainings[:2], patients, n_boot=10,
                         same_trainings=True)
