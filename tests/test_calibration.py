"""phi (eq. 5) for each calibration criterion equals the value worked out by hand, and
calibrate_row saves, per seed, phi, the criterion and the validation operating point."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sklearn.metrics import roc_auc_score

from sparsegan.metrics import (aggregate_patients, calibrate_phi, calibrate_row, calibrate_scores,
                               candidate_thresholds, detection_metrics)
from sparsegan.params import CalibrateParams, Params

# 11 validation scans, sorted by score; 4 diseased (label 1), 7 normal. A threshold phi between
# neighbours k and k+1 calls the scans above it diseased. Worked out by hand (tp, fp of the
# decision score > phi; Acc = (tp + 7 - fp) / 11, J = tp/4 - fp/7, F1 = 2tp / (2tp + fp + 4 - tp)):
#
#   phi    tp fp   Acc    J      F1
#  -0.90   4  7   4/11  0      8/15 = .533
#   0.15   4  6   5/11  .143   8/14 = .571
#   0.25   4  5   6/11  .286   8/13 = .615  <- F1 max
#   0.375  3  5   5/11  .036   6/12 = .500
#   0.475  3  4   6/11  .179   6/11 = .545
#   0.60   3  3   7/11  .321   6/10 = .600  <- Youden max; highest phi with sensitivity >= .75
#   0.75   2  3   6/11  .071   4/9  = .444
#   0.90   2  2   7/11  .214   4/8  = .500  <- highest phi with sensitivity >= .5
#   1.05   1  2   6/11 -.036   2/7  = .286
#   1.25   1  1   7/11  .107   2/5  = .400
#   1.70   1  0   8/11  .250   2/5  = .400  <- accuracy max
#   2.00   0  0   7/11  0      0
SCORES = np.array([0.10, 0.20, 0.30, 0.45, 0.50, 0.70, 0.80, 1.00, 1.10, 1.40, 2.00])
LABELS = np.array([0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1])

EXPECTED = [("accuracy", 0.95, 1.70), ("youden", 0.95, 0.60), ("f1", 0.95, 0.25),
            ("sensitivity", 0.5, 0.90), ("sensitivity", 0.75, 0.60),
            ("sensitivity", 1.0, 0.25)]


def shuffled(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(SCORES))
    return LABELS[perm], SCORES[perm]


def test_candidate_thresholds_are_below_all_midpoints_and_top():
    expected = [-0.90, 0.15, 0.25, 0.375, 0.475, 0.60, 0.75, 0.90, 1.05, 1.25, 1.70, 2.00]
    np.testing.assert_allclose(candidate_thresholds(SCORES), expected)


@pytest.mark.parametrize("criterion,target,phi", EXPECTED)
def test_phi_of_each_criterion_matches_hand_computation(criterion, target, phi):
    labels, scores = shuffled()  # input order must not matter
    assert calibrate_phi(labels, scores, criterion, target) == pytest.approx(phi)


def test_the_four_criteria_pick_four_different_thresholds():
    labels, scores = shuffled()
    phis = {c: calibrate_phi(labels, scores, c, 0.5)
            for c in ("accuracy", "youden", "f1", "sensitivity")}
    assert len(set(phis.values())) == 4


def test_operating_points_at_hand_phis():
    labels, scores = shuffled()
    acc = detection_metrics(labels, scores, 1.70)
    assert acc["accuracy"] == pytest.approx(8 / 11)
    assert acc["sensitivity"] == pytest.approx(0.25) and acc["specificity"] == 1.0
    you = detection_metrics(labels, scores, 0.60)
    assert you["sensitivity"] - (1 - you["specificity"]) == pytest.approx(0.75 - 3 / 7)
    assert detection_metrics(labels, scores, 0.25)["f1"] == pytest.approx(8 / 13)


def test_ties_go_to_the_lowest_threshold():
    # accuracy 3/4 at phi 1.5 (tp 2, fp 1) and at phi 3.5 (tp 1, fp 0): the lower one wins
    assert calibrate_phi(np.array([0, 1, 0, 1]), np.array([1.0, 2.0, 3.0, 4.0])) == 1.5


def test_tied_scores_share_one_decision():
    # scores 2.0 of a normal and a diseased scan cannot be split; candidates -1, 1.5, 2.5, 3;
    # accuracy 3/4 at 1.5 (tp 2, fp 1) and at 2.5 (tp 1, fp 0) -> 1.5
    labels, scores = np.array([0, 0, 1, 1]), np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(candidate_thresholds(scores), [0.0, 1.5, 2.5, 3.0])
    assert calibrate_phi(labels, scores, "accuracy") == 1.5
    assert calibrate_phi(labels, scores, "sensitivity", 1.0) == 1.5


def test_rejects_one_class_unknown_criterion_and_nan():
    with pytest.raises(ValueError, match="both normal and diseased"):
        calibrate_phi(np.zeros(4, int), np.arange(4.0))
    with pytest.raises(ValueError, match="allowed accuracy"):
        calibrate_phi(LABELS, SCORES, "auc")
    with pytest.raises(ValueError, match="finite"):
        calibrate_phi(LABELS, np.where(LABELS == 1, np.nan, SCORES))


@pytest.mark.parametrize("criterion,target,phi", [("accuracy", 0.95, 1.70), ("youden", 0.95, 0.60),
                                                  ("sensitivity", 0.5, 0.90)])
def test_calibrate_row_saves_phi_criterion_and_validation_point(tmp_path, criterion, target,
                                                                phi):
    labels, scores = shuffled()
    scores_dir = tmp_path / "scores" / "pix2pix" / "s4" / "image"  # row pix2pix_image, seed 4
    scores_dir.mkdir(parents=True)
    pd.DataFrame({"path": [f"s{i}.jpeg" for i in range(len(labels))], "label": labels,
                  "class": np.where(labels == 1, "CNV", "NORMAL"),
                  "patient": np.arange(len(labels)), "score": scores}).to_csv(
        scores_dir / "val.csv", index=False)
    # a test.csv that would pick another phi must be ignored
    pd.DataFrame({"path": ["t0", "t1"], "label": [1, 0], "class": ["CNV", "NORMAL"],
                  "patient": [0, 1], "score": [0.0, 9.0]}).to_csv(scores_dir / "test.csv",
                                                                  index=False)
    params = Params(seeds=(4,),
                    calibrate=CalibrateParams(criterion=criterion, target_sensitivity=target))
    out = tmp_path / "reports" / "calibration"
    result = calibrate_row("pix2pix_image", params, tmp_path / "scores", out)
    saved = json.loads((out / "s4.json").read_text())
    assert saved == result[4] and sorted(p.name for p in out.iterdir()) == ["s4.json"]
    # what predict needs to rebuild the row: its trained model, score and seed (the scoring
    # knobs come from the score stage's settings.json, not from a copy here)
    assert (saved["row"], saved["model"], saved["score"], saved["seed"]) == (
        "pix2pix_image", "pix2pix", "image", 4)
    assert "score_params" not in saved
    assert saved["phi"] == pytest.approx(phi)
    assert saved["criterion"] == criterion
    expected_point = detection_metrics(labels, scores, phi)
    assert saved["validation"] == pytest.approx(expected_point)
    assert set(saved["validation"]) == {"auc", "average_precision", "accuracy", "sensitivity",
                                        "specificity", "f1"}
    assert ("target_sensitivity" in saved) == (criterion == "sensitivity")
    if criterion == "sensitivity":
        assert saved["target_sensitivity"] == target


def _val_csv(scores_dir, labels, scores) -> None:
    scores_dir.mkdir(parents=True)
    pd.DataFrame({"path": [f"s{i}.jpeg" for i in range(len(labels))], "label": labels,
                  "class": np.where(labels == 1, "CNV", "NORMAL"),
                  "patient": np.arange(len(labels)), "score": scores}).to_csv(
        scores_dir / "val.csv", index=False)


def test_calibrate_row_calibrates_each_seed_on_its_own_scores(tmp_path):
    """One file per seed of params.seeds, each phi from that seed's scores of the row's (model,
    score) only: the other score of the same model and a seed not in params.seeds are not read."""
    labels, scores = shuffled()
    root = tmp_path / "scores"
    _val_csv(root / "sparse_gan" / "s0" / "latent", labels, scores)
    _val_csv(root / "sparse_gan" / "s2" / "latent", labels, scores + 10.0)  # phi moves by 10
    _val_csv(root / "sparse_gan" / "s0" / "image", labels, -scores)  # the other score
    _val_csv(root / "sparse_gan" / "s1" / "latent", labels, scores * 0)  # not a seed of params
    params = Params(seeds=(2, 0), calibrate=CalibrateParams(criterion="accuracy"))
    out = tmp_path / "reports" / "rows" / "sparse_gan" / "calibration"
    result = calibrate_row("sparse_gan", params, root, out)
    assert list(result) == [2, 0]
    assert sorted(p.name for p in out.iterdir()) == ["s0.json", "s2.json"]
    for seed, phi in ((0, 1.70), (2, 11.70)):
        saved = json.loads((out / f"s{seed}.json").read_text())
        assert saved == result[seed]
        assert (saved["row"], saved["model"], saved["score"], saved["seed"]) == (
            "sparse_gan", "sparse_gan", "latent", seed)
        assert saved["phi"] == pytest.approx(phi)
    assert result[0]["validation"] == pytest.approx(result[2]["validation"])

    from sparsegan.params import ParamError
    with pytest.raises(ParamError, match="unknown row 'pix2pix_image'"):
        calibrate_row("pix2pix_image", Params(rows={"sparse_gan": ("sparse_gan", "latent")}),
                      root, tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(FileNotFoundError):  # a seed that was never scored: no silent skip
        calibrate_row("sparse_gan", Params(seeds=(0, 5)), root, tmp_path / "five")


def test_patients_aggregate_their_scans_and_unknown_scans_stand_alone():
    ids, y, s = aggregate_patients(["a", "a", "a", "a", "b", "", ""], [0, 1, 0, 0, 0, 1, 0],
                                   [1.0, 5.0, 2.0, 0.0, 3.0, 7.0, 4.0], "max")
    assert list(ids) == ["a", "b", "scan:5", "scan:6"]
    assert list(y) == [1, 0, 1, 0] and list(s) == [5.0, 3.0, 7.0, 4.0]
    _, _, mean = aggregate_patients(["a"] * 4, [0] * 4, [1.0, 5.0, 2.0, 0.0], "mean")
    _, _, top3 = aggregate_patients(["a"] * 4, [0] * 4, [1.0, 5.0, 2.0, 0.0], "top3_mean")
    assert mean[0] == pytest.approx(2.0) and top3[0] == pytest.approx(8.0 / 3)


def test_patient_rule_is_chosen_on_validation_and_applied_to_test_patients(tmp_path):
    """Diseased patients have one strongly abnormal scan among normal-looking ones: max beats
    mean on validation, so max is chosen, and test reports one decision per patient."""
    from sparsegan.evaluate import seed_metrics
    from sparsegan.metrics import calibrate_patients

    rng = np.random.default_rng(0)

    def patients(n, prefix):
        rows = []
        for k in range(n):
            sick = k % 2
            for j in range(4):
                spike = sick and j == 0
                rows.append({"path": f"{prefix}{k}_{j}", "label": sick,
                             "class": "CNV" if sick else "NORMAL", "patient": f"{prefix}{k}",
                             "score": rng.normal(3.0 if spike else 0.0, 0.5)})
        return pd.DataFrame(rows)

    val, test = patients(40, "v"), patients(30, "t")
    rule = calibrate_patients(val["patient"], val["label"], val["score"], 1.5)
    assert rule["aggregation"] == "max" and rule["n_patients"] == 40
    assert rule["val_auc_by_aggregation"]["max"] > rule["val_auc_by_aggregation"]["mean"]
    scores_dir = tmp_path / "scores"
    scores_dir.mkdir()
    val.to_csv(scores_dir / "val.csv", index=False)
    test.to_csv(scores_dir / "test.csv", index=False)
    calibration = calibrate_scores(Params(calibrate=CalibrateParams(criterion="youden")),
                                   scores_dir)
    assert calibration["patient"]["aggregation"] == "max"
    m, _ = seed_metrics(scores_dir, calibration, None, n_boot=50)
    assert m["patient_aggregation"] == "max" and m["test_patient_count"] == 30
    _, y, s = aggregate_patients(test["patient"], test["label"], test["score"], "max")
    assert m["test_patient_auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["test_patient_auc"] > m["test_auc"]  # the spike decides per patient, not per scan
    # one threshold: the patient decisions are at the scans' phi
    assert m["test_patient_accuracy"] == pytest.approx(
        detection_metrics(y, s, calibration["phi"])["accuracy"])


def test_a_patient_with_one_scan_gets_its_scans_decision():
    """A patient's score is the aggregation of its scans' scores, decided at the scans' phi: for
    a one-scan patient every aggregation is that scan's score, so the two decisions agree (the
    issue: scan phi 1.42 said disease, a patient phi of 1.71 said normal); with ``max`` a
    patient is diseased exactly when one of its scans is."""
    from sparsegan.metrics import PATIENT_AGGREGATIONS, calibrate_patients
    from sparsegan.screening import Screener

    patients = ["a", "a", "b", "b", "c", "d"]
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.2, 0.3, 1.0, 1.9, 0.1, 1.5])
    rule = calibrate_patients(patients, labels, scores, phi=1.42)
    assert set(rule) == {"aggregation", "val_auc_by_aggregation", "n_patients", "validation"}

    class Trained:
        seed, data = 0, {}

    for how in PATIENT_AGGREGATIONS:
        screener = Screener(Trained(), {"phi": 1.42, "patient": {"aggregation": how},
                                        "score_params": {}, "score": "latent"})
        scored = [("solo", 1.5), ("pair", 1.0), ("pair", 1.9), ("low", 0.3)]
        decided = {p: d for p, _, _, d in screener.patients(scored)}
        assert decided["solo"] == screener.decision(1.5) == "disease"
        assert decided["low"] == screener.decision(0.3) == "normal"
        if how == "max":
            assert decided["pair"] == "disease"  # one of its scans is


def test_the_map_shown_is_the_best_on_validation_masks(tmp_path):
    from sparsegan.metrics import choose_map

    assert choose_map({"aam": 0.3, "aam_residual": 0.8, "difference": 0.7}) == "aam_residual"
    assert choose_map({"aam": 0.9, "difference": float("nan")}) == "aam"
    assert choose_map({"difference": 0.6, "aam_residual": 0.6}) == "aam_residual"  # tie: order
    assert choose_map({}) is None
    scores_dir = tmp_path / "scores"
    scores_dir.mkdir()
    pd.DataFrame({"label": [0, 1, 0, 1], "score": [0.1, 0.9, 0.2, 0.8],
                  "patient": ["a", "b", "c", "d"]}).to_csv(scores_dir / "val.csv", index=False)
    (scores_dir / "val_localisation.json").write_text(json.dumps({"aam": 0.2, "difference": 0.7}))
    result = calibrate_scores(Params(), scores_dir)
    assert result["map"] == "difference" and result["val_pixel_auroc"]["aam"] == 0.2
