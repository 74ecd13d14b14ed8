"""The studies' own arithmetic (sparsegan/studies): the rank agreement between data sets, the
multi-seed tables, the score comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checks():
    from sparsegan.studies import agreement
    return agreement


def _records(label, aucs_by_seed):
    """Baseline records as real_checks writes them: pix2pix #1 is a field of pix2pix's record."""
    out = []
    for seed, (ae, ano, fano, p1, p2, sg) in aucs_by_seed.items():
        for variant, auc, extra in (("autoencoder", ae, {}), ("anogan", ano, {}),
                                    ("fanogan", fano, {}),
                                    ("pix2pix_latent", p2, {"val_auc_pix2pix_image": p1}),
                                    ("sparse_gan", sg, {})):
            out.append({"data": label, "check": "baseline", "setting": "default",
                        "variant": variant, "seed": seed, "val_auc": auc, **extra})
    return out


def test_agreement_of_same_reversed_and_seed_averaged_rankings(checks):
    real = _records("r", {0: (0.8, 0.6, 0.5, 0.75, 0.7, 0.65), 1: (0.8, 0.6, 0.5, 0.75, 0.7, 0.45)})
    same = _records("s", {0: (0.9, 0.7, 0.6, 0.85, 0.8, 0.75)})
    reverse = _records("x", {0: (0.5, 0.7, 0.8, 0.55, 0.6, 0.65)})
    records = real + same + reverse + [{**real[0], "check": "epochs"}]  # other checks ignored
    r = checks.row_aucs(records, "r")
    assert r["pix2pix_image"] == {0: 0.75, 1: 0.75} and r["sparse_gan"] == {0: 0.65, 1: 0.45}
    g = checks.agreement(r, checks.row_aucs(records, "s"))
    assert g["seeds_a"] == [0, 1] and g["seeds_b"] == [0]
    assert g["spearman_seed_pairs"]["max"] == pytest.approx(1.0)  # seed 0 of r ranks as s
    assert g["spearman_seed_pairs"]["min"] < 1.0  # seed 1 puts sparse_gan below anogan
    # mean of r: sparse_gan 0.55 < anogan 0.60, one swapped neighbour pair of six rows
    assert g["spearman_of_means"] == pytest.approx(1 - 6 * 2 / (6 * 35))
    assert checks.agreement(r, checks.row_aucs(records, "x"))["kendall_of_means"] < -0.8
    result, md = checks.agreement_report([("r", "s")], records)
    assert "| r vs s | 0,1 / 0 |" in md and result["r vs s"]["rows"] == sorted(checks.ROWS)


def test_agreement_reads_a_pipeline_study_by_seed(checks, tmp_path):
    """``study:<name>``: per-seed val AUCs of studies/<name>/metrics.json (every row there,
    ablations ignored), against baseline records; the label keeps its colon in ``A:B``."""
    seeds = {"0": 0.0, "1": 0.1}
    metrics = {row: {"val_auc": 0.5, "seeds": {s: {"val_auc": base + d} for s, d in seeds.items()}}
               for row, base in zip(checks.ROWS, (0.8, 0.6, 0.5, 0.75, 0.7, 0.65))}
    metrics["sparse_gan_image"] = {"seeds": {"0": {"val_auc": 0.99}}}
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "metrics.json").write_text(json.dumps({"metrics": metrics}))
    got = checks.row_aucs([], "study:syn", studies_dir=tmp_path)
    assert set(got) == set(checks.ROWS)
    assert got["anogan"] == {0: 0.6, 1: pytest.approx(0.7)}
    real = checks.row_aucs(_records("r", {0: (0.8, 0.6, 0.5, 0.75, 0.7, 0.65)}), "r")
    assert checks.agreement(real, got)["spearman_of_means"] == pytest.approx(1.0)
    assert checks.parse_pair("real2:study:syn") == ("real2", "study:syn")
    assert checks.parse_pair("study:syn:real2") == ("study:syn", "real2")
    assert checks.parse_pair("real2:synthetic3") == ("real2", "synthetic3")
    with pytest.raises(SystemExit, match="missing.*metrics.json: not found"):
        checks.row_aucs([], "study:missing", studies_dir=tmp_path)


@pytest.fixture(scope="module")
def study():
    from sparsegan.studies import table
    return table


def test_study_tables_come_from_the_pipelines_multi_seed_metrics(study, tmp_path):
    from sparsegan.evaluate import summarize_seeds

    def seed(val, test):
        return {"val_auc": val, "test_auc": test, "test_auc_ci_low": test - 0.05,
                "test_auc_ci_high": test + 0.05, "test_accuracy": 0.7, "test_sensitivity": 0.8,
                "test_specificity": 0.6, "phi": 1.0, "criterion": "youden"}

    metrics = {"autoencoder": summarize_seeds({0: seed(0.80, 0.84), 1: seed(0.82, 0.86)}),
               "sparse_gan": summarize_seeds({0: seed(0.70, 0.74), 1: seed(0.71, 0.70)})}
    metrics["autoencoder"].update({"vs_sparse_gan_delta_auc": -0.13,
                                   "vs_sparse_gan_delta_auc_ci_low": -0.2,
                                   "vs_sparse_gan_delta_auc_ci_high": -0.06,
                                   "vs_sparse_gan_p_value": 0.002})
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "metrics.json").write_text(json.dumps({
        "seeds": [0, 1], "experiment": "s", "command": "dvc exp run -S seeds=[0,1]",
        "overrides": {"seeds": "[0,1]"}, "extra": [], "metrics": metrics}))
    result = study.collect("s", tmp_path)
    ae = result["summary"]["autoencoder"]["test_auc"]
    assert ae["mean"] == pytest.approx(0.85) and ae["sd"] == pytest.approx(0.02 / 2 ** 0.5)
    assert ae["min"] == 0.84 and ae["max"] == 0.86 and ae["n"] == 2
    # the paired per-seed difference: +0.10 and +0.16, both seeds won by the Auto-Encoder
    pair = result["paired_test_auc"]["autoencoder - sparse_gan"]
    assert pair["mean"] == pytest.approx(0.13) and pair["wins"] == 2 and pair["n"] == 2
    assert result["vs_sparse_gan"]["autoencoder"]["p_value"] == 0.002
    md = (tmp_path / "s" / "results.md").read_text()
    assert "`dvc exp run -S seeds=[0,1]`" in md
    assert "| Auto-Encoder | 0.810 ± 0.014 [0.800-0.820] | 0.850 ± 0.014 [0.840-0.860]" in md
    assert "| Auto-Encoder | -0.130 | [-0.200, -0.060] | 0.002 |" in md


def _scores_folder(folder, val_normal, val_sick, test_normal, patients, residual_rows):
    """A ``scores/<model>/s0/<score>/`` folder: val.csv, test.csv (log scores given) and
    test_maps.npz whose normal maps are 1 on ``residual_rows`` and 0 elsewhere."""
    import numpy as np

    folder.mkdir(parents=True)
    header = "path,label,class,patient,mask,score\n"
    val = [(0, p, s) for s, p in zip(val_normal, patients)] + [(1, "", s) for s in val_sick]
    for name, rows in (("val", val), ("test", [(0, "", s) for s in test_normal])):
        (folder / f"{name}.csv").write_text(header + "".join(
            f"{name}/{i}.png,{label},{'NORMAL' if label == 0 else 'CNV'},{p},,{float(np.exp(s))!r}\n"
            for i, (label, p, s) in enumerate(rows)))
    maps = np.zeros((len(test_normal), 1, 8, 8), np.float16)
    maps[:, 0, residual_rows] = 1
    np.savez_compressed(folder / "test_maps.npz", difference=maps)


def test_score_comparison_measures_spread_shift_patient_share_and_residual_depth(tmp_path):
    import numpy as np

    from sparsegan.studies import score_gap as module
    # synthetic: normals of 4 patients whose scans score alike (patient share near 1), lesions
    # 2 sd above, test normals 1 sd above validation; residuals in the top quarter only
    offsets = np.repeat([-1.5, -0.5, 0.5, 1.5], 5)
    wobble = np.tile([-0.01, 0.0, 0.01, 0.0, 0.0], 4)
    normal = offsets + wobble
    sd = normal.std(ddof=1)
    _scores_folder(tmp_path / "syn/autoencoder/s0/image", normal, np.median(normal) + 2 * sd
                   + np.zeros(3), np.median(normal) + sd + np.zeros(4),
                   [str(p) for p in np.repeat([1, 2, 3, 4], 5)], [0, 1])
    # real: the same scores with patients that do not explain them, residuals in the bottom half
    shuffled = normal.reshape(4, 5).T.ravel()  # each patient gets one scan of every offset
    _scores_folder(tmp_path / "real/autoencoder/s0/image", shuffled, np.median(normal)
                   + np.zeros(3), np.median(normal) + np.zeros(4),
                   [str(p) for p in np.repeat([1, 2, 3, 4], 5)], [4, 5, 6, 7])
    result = module.compare(tmp_path / "syn", tmp_path / "real", seed=0)
    row = result["autoencoder/image"]
    syn, real = row["synthetic"], row["real"]
    assert syn["normal_sd"] == pytest.approx(sd) == pytest.approx(real["normal_sd"])
    assert (syn["shift"], real["shift"]) == (pytest.approx(2.0, abs=1e-4), pytest.approx(0, abs=1e-4))
    assert syn["test_minus_val"] == pytest.approx(1.0, abs=1e-4)
    assert syn["patient_share"] > 0.99 and real["patient_share"] < 0
    assert syn["patient_share_named"] == syn["patient_share"]  # numeric IDs: named patients
    assert (syn["profile_top_quarter"], real["profile_bottom_quarter"]) == (1.0, 0.5)
    assert row["profile_r"] < 0
    with pytest.raises(SystemExit, match="no row"):
        module.compare(tmp_path / "syn", tmp_path / "real", seed=1)


def _arm(name, epochs, val, flops=1e13, models=("autoencoder", "pix2pix", "sparse_gan"),
         overrides=None):
    """An arm record as run_arm writes it: ``val`` row -> per-seed validation AUCs."""
    rows = {r: {"val_auc": {str(s): v for s, v in enumerate(aucs)}, "val_patient_auc": {},
                "val_auc_by_class": {str(s): {"DME": {"auc": v, "low": v - 0.1, "high": v + 0.1,
                                                      "n": 36, "n_normal": 300}}
                                     for s, v in enumerate(aucs)}}
            for r, aucs in val.items()}
    models = {m: {"train_s": {"0": 60.0, "1": 120.0}, "train_flops": flops}
              for m in models}
    return {"arm": name, "overrides": overrides or {"train.epochs": str(epochs)}, "seeds": [0, 1],
            "image_size": 64, "base_channels": 16, "epochs": epochs, "n_train": 10,
            "rows": rows, "models": models, "command": "dvc exp run ...", "commit": "abc",
            "wall_s": 600.0, "baselines": {"anogan_epochs": 30, "fanogan_epochs": 100,
                                           "variant": {m: "filled" if "filled" in str(overrides)
                                                       else "raw" for m in ("anogan", "fanogan")}}}


def test_scale_study_pairs_rows_by_seed_and_draws_the_trend(tmp_path):
    from sparsegan.studies import scale

    val = {"autoencoder": [0.80, 0.78], "pix2pix_image": [0.79, 0.77],
           "pix2pix_latent": [0.76, 0.75], "sparse_gan": [0.70, 0.73],
           "autoencoder_latent": [0.76, 0.77], "sparse_gan_image": [0.77, 0.76]}
    (tmp_path / "arms").mkdir()
    for name, epochs, shift, flops in (("e60", 60, 0.0, 1e13), ("e120", 120, 0.05, 2e13)):
        rec = _arm(name, epochs, {r: [v + (shift if r == "sparse_gan" else 0) for v in a]
                                  for r, a in val.items()}, flops)
        (tmp_path / "arms" / f"{name}.json").write_text(json.dumps(rec))
    result = scale.collect(tmp_path)
    assert list(result["arms"]) == ["e60", "e120"]  # ARMS order, not file order
    e60, e120 = result["arms"]["e60"], result["arms"]["e120"]
    d = e60["paired_val_auc"]["Sparse-GAN - pix2pix #2 (latent)"]
    assert d["per_seed"] == pytest.approx({"0": -0.06, "1": -0.02}) and d["wins"] == 0
    assert e120["paired_val_auc"]["Sparse-GAN - pix2pix #2 (latent)"]["mean"] == pytest.approx(
        0.01)  # overtakes at 120 epochs: +0.05 on each seed
    assert e60["paired_val_auc"]["Auto-Encoder latent - image"]["mean"] == pytest.approx(-0.025)
    assert e60["sparse_gan_train_tflops"] == pytest.approx(10.0)
    assert e60["train_cpu_minutes"]["sparse_gan"]["mean"] == pytest.approx(1.5)
    assert e60["val_auc_by_class"]["sparse_gan"]["DME"]["auc"] == pytest.approx(0.715)
    assert "| e120 | 120 | 64 | 16 | 20.0 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_baseline_arms_pair_against_corners_left_in_and_stay_out_of_the_trend(tmp_path):
    from sparsegan.studies import scale

    (tmp_path / "arms").mkdir()
    scan = {"autoencoder": [0.8, 0.8], "pix2pix_image": [0.79, 0.79],
            "pix2pix_latent": [0.76, 0.76], "sparse_gan": [0.7, 0.7]}
    (tmp_path / "arms" / "e60.json").write_text(json.dumps(_arm("e60", 60, scan)))
    for name, aucs, over in (("b_raw", [0.58, 0.60], {}),
                             ("b_filled", [0.70, 0.66], scale.BASELINES_FILLED)):
        rec = _arm(name, 30, {"anogan": aucs, "fanogan": [a + 0.01 for a in aucs]},
                   models=("anogan", "fanogan"), overrides=over)
        if name == "b_raw":  # a record of the earlier layout: one switch for every model
            rec["baselines"] = {"anogan_epochs": 30, "fanogan_epochs": 100, "fill_corners": False}
        (tmp_path / "arms" / f"{name}.json").write_text(json.dumps(rec))
    result = scale.collect(tmp_path)
    filled = result["arms"]["b_filled"]
    assert filled["sparse_gan_train_tflops"] is None
    d = filled["paired_val_auc"]["anogan: b_filled - b_raw"]
    assert d["per_seed"] == pytest.approx({"0": 0.12, "1": 0.06}) and d["wins"] == 2
    assert result["arms"]["b_raw"]["paired_val_auc"] == {}
    md = (tmp_path / "results.md").read_text()
    assert "| b_filled | filled / filled | 30 / 100 | 1.5 / 1.5 | 0.680 ± 0.028 | 0.690 ± 0.028 |" in md
    assert "| b_raw | raw | 30 / 100 |" in md
    assert "| b_raw | 30 |" not in md  # not a row of the scale table
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"


def test_scale_arms_train_the_baselines_only_where_their_input_changes(tmp_path):
    from sparsegan.studies.scale import arm_command

    for split, cls, n in (("train", "NORMAL", 20), ("train", "CNV", 3), ("test", "NORMAL", 2),
                          ("test", "CNV", 2)):
        (tmp_path / split / cls).mkdir(parents=True)
        for k in range(n):
            (tmp_path / split / cls / f"{cls}-{k}-1.jpeg").write_bytes(b"")  # counted, not read
    tree = tmp_path
    cmd = arm_command("e120", [0, 1, 2], tree, None)
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "scale-e120"] and "train.epochs=120" in cmd
    assert "calibrate@sparse_gan" in cmd and "calibrate@anogan" not in cmd
    assert "data.split.val_per_disease=all" in cmd and "data.split.val_normal=4" in cmd
    assert "calibrate@anogan" in arm_command("e60_s112", [0], tree, None)
    b = arm_command("b_filled", [0], tree, None)
    assert "preprocess.variant.anogan=filled" in b and "preprocess.variant.fanogan=filled" in b
    assert "calibrate@fanogan" in b
    assert "calibrate@sparse_gan" not in b


def test_an_arm_run_a_seed_at_a_time_is_one_record_paired_by_seed(tmp_path):
    from sparsegan.studies import scale

    val = {"pix2pix_latent": [0.76, 0.75, 0.74], "sparse_gan": [0.70, 0.73, 0.77]}

    def part(seeds, commit, wall):
        rec = _arm("e60_w32", 60, {r: [a[s] for s in seeds] for r, a in val.items()},
                   overrides={"train.epochs": "60", "model.base_channels": "32"})
        for e in rec["rows"].values():  # _arm numbers seeds 0..n-1: give them their own
            for k in ("val_auc", "val_auc_by_class"):
                e[k] = {str(s): v for s, v in zip(seeds, e[k].values())}
        for m in rec["models"].values():
            m["train_s"] = {str(s): 60.0 * (s + 1) for s in seeds}
        return rec | {"seeds": seeds, "commit": commit, "wall_s": wall, "command": f"run {seeds}"}

    merged = scale.merge_arm(part([0], "c1", 100.0), part([1, 2], "c2", 200.0))
    assert merged["seeds"] == [0, 1, 2] and merged["commit"] == "c1, c2"
    assert merged["wall_s"] == 300.0 and [r["seeds"] for r in merged["runs"]] == [[0], [1, 2]]
    assert merged["rows"]["sparse_gan"]["val_auc"] == {"0": 0.70, "1": 0.73, "2": 0.77}
    assert list(merged["rows"]) == list(val)  # the rows keep their order (results.md's)
    assert merged["models"]["sparse_gan"]["train_s"] == {"0": 60.0, "1": 120.0, "2": 180.0}
    d = scale.summarise_arm(merged)["paired_val_auc"]["Sparse-GAN - pix2pix #2 (latent)"]
    assert d["n"] == 3 and d["wins"] == 1 and d["mean"] == pytest.approx((-0.06 - 0.02 + 0.03) / 3)
    # a seed run again replaces its values and its run; other settings are refused
    again = scale.merge_arm(merged, part([1], "c3", 50.0) | {
        "rows": {"sparse_gan": {"val_auc": {"1": 0.80}, "val_patient_auc": {},
                                "val_auc_by_class": {}}}})
    assert again["rows"]["sparse_gan"]["val_auc"] == {"0": 0.70, "1": 0.80, "2": 0.77}
    assert [r["seeds"] for r in again["runs"]] == [[0], [1, 2], [1]]
    other = part([2], "c4", 10.0) | {"epochs": 120}
    with pytest.raises(SystemExit, match="another epochs"):
        scale.merge_arm(merged, other)


def test_the_real_data_recipe_is_checked_as_params_and_the_committed_one_parses(tmp_path):
    from sparsegan.studies.real import RECIPE, recipe_overrides

    committed = recipe_overrides(ROOT / RECIPE)
    assert committed["preprocess.variant.fanogan"] == "filled"
    assert committed["train.epochs"] == "240" and committed["srn.code_channels"] == "128"
    good = tmp_path / "good.yaml"
    good.write_text("train.epochs: 60\npreprocess.variant.anogan: filled\nseeds: [0, 1]\n")
    assert recipe_overrides(good) == {"train.epochs": "60", "preprocess.variant.anogan": "filled",
                                      "seeds": "[0, 1]"}
    for text, message in (("train.epochz: 60\n", "unknown key train.epochz"),
                          ("preprocess.variant.anogan: fill\n", "allowed values are raw, filled"),
                          ("- train.epochs\n", "must be a mapping of params keys"),
                          ("train: {epochs: [\n", "not valid YAML")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(SystemExit) as exc:
            recipe_overrides(bad)
        assert str(exc.value).startswith(f"error: {bad}: ") and message in str(exc.value)
        assert "\n" not in str(exc.value)
    with pytest.raises(SystemExit, match="not found"):
        recipe_overrides(tmp_path / "none.yaml")
