"""The screening command ``sparsegan predict`` on tiny trained, calibrated rows."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sparsegan.data.dataset import to_float
from sparsegan.data.preprocess import load_gray, read_gray
from sparsegan.metrics import calibrate_row
from sparsegan.models import build_detector
from sparsegan.params import DataParams, ModelParams, Params, RuntimeParams, TrainParams
from sparsegan.predict import main, overlay_image, render_overlay
from sparsegan.scoring import score_batch
from sparsegan.train import train_model

SIZE = 32
SEEDS = (2, 10)  # by name "s10" sorts before "s2": the default seed must be the lowest number
PARAMS = Params(seeds=SEEDS, data=DataParams(source="folder", folder="/data/oct", image_size=SIZE),
                model=ModelParams(base_channels=4),
                train=TrainParams(epochs=1, batch_size=4), runtime=RuntimeParams(device="cpu"))


def scan(w: int, h: int, seed: int) -> np.ndarray:
    """An OCT-like uint8 B-scan: bright wavy bands over speckle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    band = 128 + 100 * np.sin(2 * np.pi * (y / h * 3 + 0.1 * np.sin(2 * np.pi * x / w) + seed))
    return np.clip(band + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)


def processed(root: Path) -> Path:
    """A tiny ``data/processed`` with 8 normal training scans of SIZE x SIZE."""
    out = root / "data" / "processed"
    out.mkdir(parents=True)
    np.save(out / "train.npy", np.stack([scan(SIZE, SIZE, 100 + i) for i in range(8)])[:, None])
    pd.DataFrame({"path": [f"raw/{i}.jpeg" for i in range(8)], "label": 0, "class": "NORMAL",
                  "patient": [str(i) for i in range(8)], "mask": ""}
                 ).to_csv(out / "train.csv", index=False)
    return out


def train(root: Path, model: str, seed: int, params: Params = PARAMS) -> Path:
    """``models/<model>/s<seed>/model.pt`` as the train stage writes it; returns its folder."""
    where = Path(model) / f"s{seed}"
    train_model(model, seed, params, root / "data" / "processed", root / "models" / where,
                root / "checkpoints" / where, log_mlflow=False)
    return root / "models" / where


def detector_of(model_pt: Path, model: str, params: Params = PARAMS):
    """The detector of a model.pt rebuilt by hand (not with the loader predict uses)."""
    state = torch.load(model_pt, weights_only=True)
    detector = build_detector(model, params, SIZE)
    detector.load_state_dict(state["model"])
    return detector.eval()


def row_scores(detector, images: list[np.ndarray], score: str) -> np.ndarray:
    """The ``score`` of uint8 SIZE x SIZE scans."""
    with torch.no_grad():
        return score_batch(detector, to_float(np.stack(images)[:, None]))[score].score.numpy()


def calibrate(cal_root: Path, row: str, phis: dict[int, float], params: Params = PARAMS,
              **extra) -> Path:
    """``<cal_root>/<row>/calibration/s<seed>.json`` as the calibrate stage writes them (from
    validation scores of the row's model and score, in ``<cal_root>-scores`` with the score
    settings), phi then set to ``phis[seed]`` and the keys of ``extra`` added; returns the
    folder."""
    model, score = params.rows[row]
    scores_root = cal_root.parent / f"{cal_root.name}-scores"
    for seed in params.seeds:
        folder = scores_root / model / f"s{seed}" / score
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"label": [0, 0, 0, 1, 1, 1], "score": [0.1, 0.3, 0.2, 0.4, 0.6, 0.5]}
                     ).to_csv(folder / "val.csv", index=False)
        (folder.parent / "settings.json").write_text(json.dumps(  # as the score stage writes it
            {"model": model, "seed": seed, "score": {}}))
    out = cal_root / row / "calibration"
    calibrate_row(row, params, scores_root, out)
    for seed, phi in phis.items():
        path = out / f"s{seed}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "phi": phi, **extra}))
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """``models/sparse_gan/s<seed>/model.pt`` of two training seeds, written by ``train_model``
    (no params.yaml anywhere: the model file describes itself), and under ``reports/rows`` the
    calibrations of the rows sparse_gan (both seeds; phi of seed 2 puts two of the three good
    scans above it, that of seed 10 one), sparse_gan_image (the same trained model, its image
    score) and pix2pix_latent (whose model pix2pix is not trained)."""
    root = tmp_path_factory.mktemp("repo")
    processed(root)
    for seed in SEEDS:
        train(root, "sparse_gan", seed)

    scans = root / "scans"
    (scans / "sub").mkdir(parents=True)
    Image.fromarray(scan(90, 70, 1)).save(scans / "gray1.jpeg", quality=90)
    Image.fromarray(scan(120, 100, 2)).save(scans / "sub" / "gray2.jpg", quality=90)
    rgb = np.stack([scan(64, 48, 3), scan(64, 48, 4), scan(64, 48, 5)], axis=2)
    Image.fromarray(rgb).save(scans / "rgb.png")  # mode RGB
    Image.fromarray(scan(256, 256, 6)).save(root / "full.jpeg", quality=95)
    data = (root / "full.jpeg").read_bytes()
    (scans / "truncated.jpeg").write_bytes(data[:len(data) // 2])
    (scans / "fake.jpg").write_text("this is not an image\n")
    (scans / "notes.txt").write_text("a text file in the folder\n")

    good = {"gray1.jpeg": scans / "gray1.jpeg", "gray2.jpg": scans / "sub" / "gray2.jpg",
            "rgb.png": scans / "rgb.png"}
    images = [load_gray(p, SIZE) for p in good.values()]
    expected, phis, image_scores = {}, {}, {}
    for seed in SEEDS:
        detector = detector_of(root / "models" / "sparse_gan" / f"s{seed}" / "model.pt",
                               "sparse_gan")
        latent = row_scores(detector, images, "latent")
        expected[seed] = dict(zip(good, latent.tolist()))
        low, mid, high = np.sort(latent)
        phis[seed] = float((low + mid) / 2) if seed == SEEDS[0] else float((mid + high) / 2)
        image_scores[seed] = dict(zip(good, row_scores(detector, images, "image").tolist()))
    cal = root / "reports" / "rows"
    calibrate(cal, "sparse_gan", phis)
    calibrate(cal, "sparse_gan_image", {seed: 0.0 for seed in SEEDS})
    calibrate(cal, "pix2pix_latent", {})
    return {"root": root, "scans": scans, "cal": cal, "phi": phis[SEEDS[0]], "phis": phis,
            "expected": expected[SEEDS[0]], "by_seed": expected, "image": image_scores}


def run(repo, *inputs, row="sparse_gan", extra=(), out="preds"):
    root = repo["root"]
    argv = ["predict", "--row", row, "--models", str(root / "models"),
            *calibration(repo["cal"]), "--out", str(root / out),
            "--batch-size", "2", "--device", "cpu", *extra, *map(str, inputs)]
    return main(argv)


def calibration(folder) -> list[str]:
    """predict's options for a calibration folder made by :func:`calibrate` (its scores and
    score settings beside it, in ``<folder>-scores``)."""
    return ["--calibration", str(folder), "--scores", f"{folder}-scores"]


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def model_pt(repo, seed=SEEDS[0], model="sparse_gan") -> Path:
    return repo["root"] / "models" / model / f"s{seed}" / "model.pt"


def test_folder_with_good_and_bad_files(repo, capsys):
    code = run(repo, repo["scans"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 1
    rows = read_rows(repo["root"] / "preds" / "predictions.csv")
    assert list(rows[0]) == ["file", "frame", "patient", "score", "phi", "decision", "overlay"]
    by_name = {r["file"].replace("\\", "/").rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name) == {"gray1.jpeg", "gray2.jpg", "rgb.png"}
    for name, row in by_name.items():
        score, phi = float(row["score"]), float(row["phi"])
        assert np.isfinite(score)
        assert phi == pytest.approx(repo["phi"])
        assert score == pytest.approx(repo["expected"][name], rel=1e-4)  # batching changes nothing
        assert row["decision"] == ("disease" if score > phi else "normal")
        overlay = repo["root"] / "preds" / row["overlay"]
        with Image.open(overlay) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            with Image.open(repo["scans"] / ("sub/" if name == "gray2.jpg" else "") / name) as src:
                assert im.size == src.size  # drawn at the scan's own resolution
    assert sorted(r["decision"] for r in rows) == ["disease", "disease", "normal"]
    assert by_name["gray2.jpg"]["overlay"] == "overlays/scans/sub/gray2.jpg.png"
    # the bad files are named, with their reason; the text file in the folder is mentioned
    assert "truncated.jpeg: truncated image" in err
    assert "fake.jpg: not an image" in err
    assert "notes.txt" in err and "ignored" in err
    assert "gray1.jpeg" not in err
    assert f"scored with sparse_gan s{SEEDS[0]}" in captured.out  # the default: lowest seed


def test_explicit_good_files_exit_0_and_overlay_shows_the_map(repo, capsys):
    code = run(repo, repo["scans"] / "rgb.png", repo["scans"] / "gray1.jpeg", out="preds_ok")
    assert code == 0, capsys.readouterr().err
    rows = read_rows(repo["root"] / "preds_ok" / "predictions.csv")
    assert [r["file"].rsplit("/", 1)[-1] for r in rows] == ["rgb.png", "gray1.jpeg"]
    assert [r["overlay"] for r in rows] == ["overlays/rgb.png.png", "overlays/gray1.jpeg.png"]
    with Image.open(repo["root"] / "preds_ok" / rows[1]["overlay"]) as im:
        pixels = np.asarray(im)
    gray = read_gray(repo["scans"] / "gray1.jpeg")
    assert pixels.shape == gray.shape + (3,)
    assert not (pixels == gray[..., None]).all()  # coloured, not the plain scan


def test_missing_input_is_a_failure_but_others_are_scored(repo, capsys):
    root = repo["root"]
    code = main(["predict", "--variant", "sparse_gan", "--models", str(root / "models"),  # alias
                 *calibration(repo["cal"]), "--out", str(root / "preds_missing"),
                 "--device", "cpu", str(root / "nope.png"), str(repo["scans"] / "gray1.jpeg")])
    assert code == 1
    assert "nope.png: no such file or folder" in capsys.readouterr().err
    (row,) = read_rows(repo["root"] / "preds_missing" / "predictions.csv")
    assert float(row["score"]) == pytest.approx(repo["expected"]["gray1.jpeg"], rel=1e-4)


def test_seed_picks_that_seeds_model_and_calibration(repo, capsys):
    """``--seed 10``: the model of models/sparse_gan/s10 and the phi of s10.json; the default is
    the lowest calibrated seed, 2 (not s10, which sorts first by name)."""
    inputs = [repo["scans"] / "gray1.jpeg", repo["scans"] / "sub" / "gray2.jpg",
              repo["scans"] / "rgb.png"]
    assert run(repo, *inputs, out="preds_s10", extra=("--seed", str(SEEDS[1]))) == 0
    assert f"scored with sparse_gan s{SEEDS[1]}" in capsys.readouterr().out
    assert run(repo, *inputs, out="preds_s2", extra=("--seed", str(SEEDS[0]))) == 0
    assert run(repo, *inputs, out="preds_default") == 0
    got = {}
    for name in ("s10", "s2", "default"):
        rows = read_rows(repo["root"] / f"preds_{name}" / "predictions.csv")
        got[name] = {Path(r["file"]).name: r for r in rows}
    for seed, name in ((SEEDS[1], "s10"), (SEEDS[0], "s2"), (SEEDS[0], "default")):
        for file, row in got[name].items():
            assert float(row["score"]) == pytest.approx(repo["by_seed"][seed][file], rel=1e-4)
            assert float(row["phi"]) == pytest.approx(repo["phis"][seed])
            assert row["decision"] == ("disease" if float(row["score"]) > repo["phis"][seed]
                                       else "normal")
    assert sorted(r["decision"] for r in got["s10"].values()) == ["disease", "normal", "normal"]
    assert got["default"] == got["s2"]
    # two trained models, not one: the seeds' scores differ
    assert all(got["s10"][f]["score"] != got["s2"][f]["score"] for f in got["s2"])


def test_the_row_names_the_score_of_the_trained_model(repo, capsys):
    """sparse_gan_image is the image-level score of the same trained sparse_gan model: its own
    scores and phi, and (no residual activation map) the difference map by default."""
    gray1 = repo["scans"] / "gray1.jpeg"
    assert run(repo, gray1, row="sparse_gan_image", out="preds_image") == 0, \
        capsys.readouterr().err
    assert run(repo, gray1, row="sparse_gan_image", out="preds_image_diff",
               extra=("--map", "difference")) == 0
    (row,) = read_rows(repo["root"] / "preds_image" / "predictions.csv")
    assert float(row["score"]) == pytest.approx(repo["image"][SEEDS[0]]["gray1.jpeg"], rel=1e-4)
    assert float(row["score"]) != pytest.approx(repo["expected"]["gray1.jpeg"], rel=1e-3)
    assert float(row["phi"]) == 0.0 and row["decision"] == "disease"
    with Image.open(repo["root"] / "preds_image" / row["overlay"]) as a, \
            Image.open(repo["root"] / "preds_image_diff" / row["overlay"]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert run(repo, gray1, row="sparse_gan_image", out="preds_image_aam",
               extra=("--map", "aam")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this row gives only difference" in err[0]


def test_unknown_row_is_a_one_line_usage_error(repo, tmp_path, capsys):
    for flag in ("--row", "--variant"):
        code = main(["predict", flag, "sparse", "--models", str(repo["root"] / "models"),
                     *calibration(repo["cal"]), "--out", str(tmp_path / "out"),
                     "--device", "cpu", str(repo["scans"])])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert "unknown row 'sparse'" in err[0]
        # it names the rows that are calibrated there, to pick from
        assert "pix2pix_latent, sparse_gan, sparse_gan_image" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing scored


def _old_model(repo, tmp_path, fmt):
    """models/sparse_gan/s<seed>/model.pt in the layout of format 1 (weights only) or 2 (one file
    per variant, the params inside)."""
    state = torch.load(model_pt(repo), weights_only=True)
    models = tmp_path / "models"
    (models / "sparse_gan" / f"s{SEEDS[0]}").mkdir(parents=True)
    old = {"variant": "sparse_gan", "image_size": SIZE, "config": "x", "model": state["model"]}
    if fmt == 2:
        old.update(format=2, params=state["params"], data=state["data"])
    torch.save(old, models / "sparse_gan" / f"s{SEEDS[0]}" / "model.pt")
    return models


@pytest.mark.parametrize("case,needle", [
    ("model", "no trained model; run `dvc repro train_pix2pix`"),
    ("calibration", "dvc repro calibrate@sparse_gan"),
    ("seed", "s7.json: no calibrated phi; run `dvc repro calibrate@sparse_gan`"),
    ("old calibration", "not a calibration of this version; re-run `dvc repro calibrate@"),
    ("old model folder", "no trained model; run `dvc repro train_sparse_gan`"),
    ("format 1 model", "a model file of an older layout (format 1"),
    ("format 2 model", "a model file of an older layout (format 2"),
    ("other model", "holds model 'autoencoder', not 'sparse_gan'"),
])
def test_usage_errors_exit_2_with_one_line(repo, tmp_path, capsys, case, needle):
    root = repo["root"]
    models, calib, row, extra = root / "models", repo["cal"], "sparse_gan", []
    if case == "model":
        row = "pix2pix_latent"  # calibrated, but models/pix2pix/s2 does not exist
    elif case == "calibration":
        calib = tmp_path / "empty"
    elif case == "seed":
        extra = ["--seed", "7"]
    elif case == "old calibration":  # the calibration.json of the per-variant layout
        calib = tmp_path / "cal"
        (calib / "sparse_gan" / "calibration").mkdir(parents=True)
        (calib / "sparse_gan" / "calibration" / f"s{SEEDS[0]}.json").write_text(
            json.dumps({"phi": 0.1, "criterion": "accuracy"}))
    elif case == "old model folder":  # models/<variant>/model.pt, no seed folder
        models = tmp_path / "models"
        (models / "sparse_gan").mkdir(parents=True)
        shutil.copy(model_pt(repo), models / "sparse_gan" / "model.pt")
    elif case.startswith("format"):
        models = _old_model(repo, tmp_path, int(case.split()[1]))
    else:  # a model.pt of another model where the calibration's model should be
        models = tmp_path / "models"
        (models / "sparse_gan" / f"s{SEEDS[0]}").mkdir(parents=True)
        state = torch.load(model_pt(repo), weights_only=True)
        torch.save({**state, "name": "autoencoder"},
                   models / "sparse_gan" / f"s{SEEDS[0]}" / "model.pt")
    code = main(["predict", "--row", row, "--models", str(models), *calibration(calib),
                 *extra, "--out", str(tmp_path / "out"), str(repo["scans"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_argparse_errors_return_2(capsys):
    assert main(["predict", "--row", "sparse_gan"]) == 2  # no --out, no INPUT
    assert main(["predict", "--row", "sparse_gan", "--seed", "one", "--out", "x", "a.png"]) == 2
    assert main([]) == 2
    assert "usage: sparsegan" in capsys.readouterr().err


def test_module_entry_point_exit_status(repo, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsegan.predict", "predict", "--row",
                           "nope", "--out", str(tmp_path / "x"), "a.png"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**__import__("os").environ,
                               "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2 and "no calibrated row; run `dvc repro calibrate@nope`" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_overlay_image_blends_colormap_over_gray():
    gray = np.full((4, 4), 100, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 5.0  # normalised to 1 there, 0 elsewhere
    out = overlay_image(gray, heat, alpha=0.5, cmap="jet")
    import matplotlib
    hot = np.array(matplotlib.colormaps["jet"](1.0)[:3])
    cold = np.array(matplotlib.colormaps["jet"](0.0)[:3])
    np.testing.assert_allclose(out[0, 0], np.rint((0.5 * 100 / 255 + 0.5 * hot) * 255), atol=1)
    np.testing.assert_allclose(out[3, 3], np.rint((0.5 * 100 / 255 + 0.5 * cold) * 255), atol=1)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert (overlay_image(gray, heat, alpha=0.0) == 100).all()


def test_row_without_aam_uses_the_difference_map_and_16bit_input(repo, tmp_path, capsys):
    """The autoencoder row (image score): only the difference map."""
    processed(tmp_path)
    folder = train(tmp_path, "autoencoder", SEEDS[0])
    detector = detector_of(folder / "model.pt", "autoencoder")
    calibrate(tmp_path / "cal", "autoencoder", {SEEDS[0]: 0.0},
              Params(seeds=(SEEDS[0],), model=PARAMS.model))
    deep = (scan(80, 60, 7).astype(np.uint16) * 16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    code = main(["predict", "--row", "autoencoder", "--models", str(tmp_path / "models"),
                 *calibration(tmp_path / "cal"), "--out", str(tmp_path / "out"),
                 "--device", "cpu", str(tmp_path / "deep.png")])
    assert code == 0, capsys.readouterr().err
    (row,) = read_rows(tmp_path / "out" / "predictions.csv")
    gray = load_gray(tmp_path / "deep.png", SIZE)
    # stretched from its own 0..4080 range: neither near black nor saturated
    assert gray.max() > 200 and gray.min() < 60 and (gray == 255).mean() < 0.1
    with torch.no_grad():
        out = score_batch(detector, to_float(gray[None, None]))["image"]
    assert set(out.maps) == {"difference"}
    assert float(row["score"]) == pytest.approx(float(out.score[0]), rel=1e-5)
    assert row["decision"] == "disease"  # phi 0: any reconstruction error is above it
    with Image.open(tmp_path / "out" / row["overlay"]) as im:
        pixels = np.asarray(im)
    full = read_gray(tmp_path / "deep.png")  # the scan itself, 80x60, stretched as in training
    expected = render_overlay(full, out.maps["difference"][0, 0].numpy(), float(row["score"]),
                              0.0, "disease")
    assert pixels.shape == (60, 80, 3) and np.abs(pixels.astype(int) - expected).max() <= 1


def test_predict_needs_no_params_yaml_and_uses_the_models_preprocessing(repo, tmp_path,
                                                                        monkeypatch, capsys):
    """Run from a folder without params.yaml: everything comes from model.pt, including the
    corner filling the model was trained with (a white wedge is filled only for such a model):
    the same weights, stored once as trained on the raw variant and once on the filled one."""
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "params.yaml").exists()
    img = scan(90, 70, 1)
    img[:12, :30] = 255  # a registration corner
    Image.fromarray(img).save(tmp_path / "corner.png")
    detector = detector_of(model_pt(repo), "sparse_gan")
    scores = {}
    for fill in (False, True):
        state = torch.load(model_pt(repo), weights_only=True)
        assert state["params"]["preprocess"] == {"variant": {"sparse_gan": "raw"}}
        state["params"]["preprocess"]["variant"]["sparse_gan"] = "filled" if fill else "raw"
        models = tmp_path / f"models{int(fill)}"
        (models / "sparse_gan" / f"s{SEEDS[0]}").mkdir(parents=True)
        torch.save(state, models / "sparse_gan" / f"s{SEEDS[0]}" / "model.pt")
        out = tmp_path / f"out{int(fill)}"
        code = main(["predict", "--row", "sparse_gan", "--models", str(models),
                     *calibration(repo["cal"]), "--out", str(out),
                     "--device", "cpu", "corner.png"])
        assert code == 0, capsys.readouterr().err
        (row,) = read_rows(out / "predictions.csv")
        x = load_gray(tmp_path / "corner.png", SIZE, fill)
        assert float(row["score"]) == pytest.approx(float(row_scores(detector, [x], "latent")[0]),
                                                    rel=1e-5)
        scores[fill] = float(row["score"])
    assert scores[False] != scores[True]


def test_a_model_trained_on_synthetic_scans_says_so_once(repo, tmp_path, capsys):
    state = torch.load(model_pt(repo), weights_only=True)
    assert state["data"]["source"] == "folder"  # what train_model recorded
    state["data"] = {"source": "synthetic", "n_train": 2400}
    (tmp_path / "models" / "sparse_gan" / f"s{SEEDS[0]}").mkdir(parents=True)
    torch.save(state, tmp_path / "models" / "sparse_gan" / f"s{SEEDS[0]}" / "model.pt")
    code = main(["predict", "--row", "sparse_gan", "--models", str(tmp_path / "models"),
                 *calibration(repo["cal"]), "--out",
                 str(tmp_path / "out"), "--device", "cpu", str(repo["scans"] / "gray1.jpeg"),
                 str(repo["scans"] / "sub" / "gray2.jpg")])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("trained on synthetic scans") == 1 and "2400 normal training scans" in err
    assert "-S data.source=folder" in err
    code = run(repo, repo["scans"] / "gray1.jpeg", out="preds_real_model")
    assert code == 0 and "synthetic" not in capsys.readouterr().err


def _dicom(path, frames, photometric="MONOCHROME2", sop=None):
    """A DICOM Part 10 file written with pydicom: ``frames`` uint8/uint16 (F, rows, cols) or
    (rows, cols, 3) for colour."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from sparsegan.data.dicom import OPHTHALMIC_TOMOGRAPHY

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop or OPHTHALMIC_TOMOGRAPHY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OPT"
    ds.SeriesInstanceUID = generate_uid()
    if frames is not None:
        colour = photometric == "RGB"
        ds.Rows, ds.Columns = (frames.shape[0], frames.shape[1]) if colour else frames.shape[1:]
        if not colour:
            ds.NumberOfFrames = frames.shape[0]
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        bits = frames.dtype.itemsize * 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, 12 if bits == 16 else 8, (11 if bits == 16 else 7)
        ds.PixelRepresentation = 0
        ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_volume_frames_are_b_scans_scored_as_images(repo, tmp_path, capsys):
    """A 3-frame 12-bit Ophthalmic Tomography volume: three rows (frames 1-3), each scored as
    that frame converted like a 16-bit image file; MONOCHROME1 is inverted first; an explicitly
    named DICOM without the .dcm suffix is recognised by its preamble."""
    from sparsegan.data.preprocess import gray_from_array

    vol = np.stack([scan(80, 60, s).astype(np.uint16) * 16 for s in (11, 12, 13)])
    _dicom(tmp_path / "vol.dcm", vol)
    _dicom(tmp_path / "inverted", (4095 - vol[:1]).astype(np.uint16), "MONOCHROME1")
    code = run(repo, tmp_path / "vol.dcm", tmp_path / "inverted", out="preds_dicom")
    assert code == 0, capsys.readouterr().err
    rows = read_rows(repo["root"] / "preds_dicom" / "predictions.csv")
    assert [(Path(r["file"]).name, r["frame"]) for r in rows] == [
        ("vol.dcm", "1"), ("vol.dcm", "2"), ("vol.dcm", "3"), ("inverted", "1")]
    detector = detector_of(model_pt(repo), "sparse_gan")
    expected = row_scores(detector, [gray_from_array(f, SIZE) for f in vol], "latent")
    got = [float(r["score"]) for r in rows]
    np.testing.assert_allclose(got[:3], expected, rtol=1e-5)
    assert got[3] == pytest.approx(expected[0], rel=1e-5)  # inverted back: the same scan
    assert len({r["overlay"] for r in rows}) == 4
    assert (repo["root"] / "preds_dicom" / "overlays" / "vol.dcm.f002.png").is_file()


def test_dicom_that_is_not_grayscale_image_data_is_a_named_error(repo, tmp_path, capsys):
    rgb = np.stack([scan(64, 48, 3), scan(64, 48, 4), scan(64, 48, 5)], axis=2)
    _dicom(tmp_path / "colour.dcm", rgb, "RGB")
    _dicom(tmp_path / "report.dcm", None, sop="1.2.840.10008.5.1.4.1.1.88.11")  # an SR document
    (tmp_path / "fake.dcm").write_text("not dicom at all\n")
    code = run(repo, tmp_path / "colour.dcm", tmp_path / "report.dcm", tmp_path / "fake.dcm",
               repo["scans"] / "gray1.jpeg", out="preds_bad_dicom")
    err = capsys.readouterr().err
    assert code == 1
    assert "colour.dcm: DICOM RGB data, not grayscale B-scans" in err
    assert "report.dcm: DICOM without image data" in err
    assert "fake.dcm: unreadable DICOM" in err
    assert len(read_rows(repo["root"] / "preds_bad_dicom" / "predictions.csv")) == 1


def test_overlay_upsamples_the_map_onto_the_scan_and_writes_the_decision():
    scan_ = np.full((40, 100), 50, np.uint8)
    heat = np.zeros((8, 8))
    heat[6:, 6:] = 1.0  # bottom-right
    out = render_overlay(scan_, heat, 0.5, 0.1, "disease", alpha=0.5)
    assert out.shape == (40, 100, 3)
    hot = np.array(__import__("matplotlib").colormaps["jet"](1.0)[:3])
    np.testing.assert_allclose(out[-1, -1], np.rint((0.5 * 50 / 255 + 0.5 * hot) * 255), atol=1)
    assert out[-1, 0, 2] > out[-1, 0, 0]  # bottom-left: cold (blue) part of the map
    assert (out[:3, :30] == 0).all(axis=-1).any()  # the text box in the top-left corner
    side = render_overlay(scan_, heat, 0.5, 0.1, "normal", side_by_side=True)
    assert side.shape == (40, 200, 3) and (side[-1, :100] == 50).all()  # plain scan on the left


def test_map_choice_residual_by_default_aam_on_request(repo, capsys):
    """sparse_gan's latent score gives the AAM and the residual map: the default draws the
    residual one."""
    from sparsegan.predict import map_name

    maps = {"difference": 0, "aam": 0, "aam_residual": 0}
    assert map_name("auto", maps) == "aam_residual" and map_name("aam", maps) == "aam"
    assert map_name("auto", {"difference": 0}) == "difference"
    assert map_name("auto", maps, "aam") == "aam"  # the calibrated choice, when the score has it
    assert map_name("auto", {"difference": 0}, "aam") == "difference"
    a = run(repo, repo["scans"] / "gray1.jpeg", out="preds_res")
    b = run(repo, repo["scans"] / "gray1.jpeg", out="preds_aam", extra=("--map", "aam"))
    c = run(repo, repo["scans"] / "gray1.jpeg", out="preds_res2", extra=("--map", "aam_residual"))
    assert a == b == c == 0
    with Image.open(repo["root"] / "preds_res/overlays/gray1.jpeg.png") as x, \
            Image.open(repo["root"] / "preds_aam/overlays/gray1.jpeg.png") as y, \
            Image.open(repo["root"] / "preds_res2/overlays/gray1.jpeg.png") as z:
        assert not np.array_equal(np.asarray(x), np.asarray(y))
        assert np.array_equal(np.asarray(x), np.asarray(z))


def _copy_calibration(repo, tmp_path, **changes) -> Path:
    """A calibration folder holding the sparse_gan row's seed-2 calibration with ``changes``."""
    calib = tmp_path / "cal" / "sparse_gan" / "calibration"
    calib.mkdir(parents=True)
    name = f"s{SEEDS[0]}.json"
    saved = json.loads((repo["cal"] / "sparse_gan" / "calibration" / name).read_text())
    (calib / name).write_text(json.dumps({**saved, **changes}))
    shutil.copytree(f"{repo['cal']}-scores", tmp_path / "cal-scores")
    return tmp_path / "cal"


def test_patient_level_decisions_group_by_name_folder_and_dicom_series(repo, tmp_path, capsys):
    """Patients from OCT2017 names, a folder per patient and a DICOM series; the patient score
    is the validation-chosen aggregation of its scans' scores, decided at the scans' phi."""
    root = repo["root"]
    cal = _copy_calibration(repo, tmp_path, patient={"aggregation": "max"})
    scans = tmp_path / "in"
    (scans / "p7").mkdir(parents=True)
    for k, seed in enumerate((21, 22)):
        Image.fromarray(scan(90, 70, seed)).save(scans / f"CNV-1234-{k + 1}.jpeg", quality=90)
        Image.fromarray(scan(90, 70, seed + 10)).save(scans / "p7" / f"b{k}.png")
    Image.fromarray(scan(90, 70, 40)).save(scans / "alone.png")
    _dicom(scans / "vol.dcm", np.stack([scan(80, 60, s).astype(np.uint16) for s in (1, 2)]))
    code = main(["predict", "--row", "sparse_gan", "--models", str(root / "models"),
                 *calibration(cal), "--out", str(tmp_path / "out"),
                 "--device", "cpu", str(scans)])
    assert code == 0, capsys.readouterr().err
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    patients = read_rows(tmp_path / "out" / "patients.csv")
    by_patient: dict[str, list[float]] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], []).append(float(r["score"]))
    assert {k: len(v) for k, v in by_patient.items()} == {
        "1234": 2, "in/p7": 2, str(scans / "alone.png"): 1,
        next(k for k in by_patient if k.startswith("series ")): 2}
    assert len(patients) == 4
    for p in patients:
        assert int(p["scans"]) == len(by_patient[p["patient"]])
        assert float(p["score"]) == pytest.approx(max(by_patient[p["patient"]]))
        assert p["decision"] == ("disease" if float(p["score"]) > repo["phi"] else "normal")


def test_without_a_patient_rule_there_is_no_patients_csv(repo, capsys):
    """The fixture's calibration had no validation patients: a note, no patients.csv."""
    saved = json.loads((repo["cal"] / "sparse_gan" / "calibration" / f"s{SEEDS[0]}.json")
                       .read_text())
    assert "patient" not in saved
    assert run(repo, repo["scans"] / "gray1.jpeg", out="preds_no_patients") == 0
    assert "has no patient rule" in capsys.readouterr().err
    assert not (repo["root"] / "preds_no_patients" / "patients.csv").exists()


def test_auto_map_follows_the_calibrated_choice(repo, tmp_path):
    root = repo["root"]
    cal = _copy_calibration(repo, tmp_path, map="aam")
    common = ["predict", "--row", "sparse_gan", "--models", str(root / "models"),
              *calibration(cal), "--device", "cpu", str(repo["scans"] / "gray1.jpeg")]
    assert main([*common, "--out", str(tmp_path / "auto")]) == 0
    assert main([*common, "--out", str(tmp_path / "aam"), "--map", "aam"]) == 0
    assert main([*common, "--out", str(tmp_path / "res"), "--map", "aam_residual"]) == 0
    with Image.open(tmp_path / "auto/overlays/gray1.jpeg.png") as a, \
            Image.open(tmp_path / "aam/overlays/gray1.jpeg.png") as b, \
            Image.open(tmp_path / "res/overlays/gray1.jpeg.png") as c:
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))
