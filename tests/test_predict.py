"""The screening command ``sparsegan predict`` on a tiny untrained-but-saved detector."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsegan.data.dataset import to_float
from sparsegan.data.preprocess import load_gray, read_gray
from sparsegan.models import build_detector
from sparsegan.params import ModelParams, Params, PreprocessParams
from sparsegan.predict import main, overlay_image, render_overlay
from sparsegan.train import config_hash, model_file

SIZE = 32
REAL_DATA = {"source": "folder", "folder": "/data/oct", "n_train": 12, "fingerprint": "x"}


def scan(w: int, h: int, seed: int) -> np.ndarray:
    """An OCT-like uint8 B-scan: bright wavy bands over speckle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    band = 128 + 100 * np.sin(2 * np.pi * (y / h * 3 + 0.1 * np.sin(2 * np.pi * x / w) + seed))
    return np.clip(band + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """models/sparse_gan/model.pt saved as train_variant saves it (no params.yaml anywhere: the
    model file describes itself) and a calibration.json whose phi splits the good test images."""
    root = tmp_path_factory.mktemp("repo")
    params = Params(model=ModelParams(base_channels=4))
    torch.manual_seed(0)
    detector = build_detector("sparse_gan", params, SIZE).eval()
    (root / "models" / "sparse_gan").mkdir(parents=True)
    torch.save(model_file("sparse_gan", params, SIZE, config_hash("sparse_gan", params, SIZE),
                          detector.state_dict(), REAL_DATA),
               root / "models" / "sparse_gan" / "model.pt")

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
    with torch.no_grad():
        x = to_float(np.stack([load_gray(p, SIZE) for p in good.values()])[:, None])
        expected = detector.score(x).score.numpy()
    low, mid, _ = np.sort(expected)
    phi = float((low + mid) / 2)  # two images above phi, one below
    calib = root / "reports" / "variants" / "sparse_gan"
    calib.mkdir(parents=True)
    (calib / "calibration.json").write_text(json.dumps({"phi": phi, "criterion": "accuracy"}))
    return {"root": root, "scans": scans, "phi": phi,
            "expected": dict(zip(good, expected.tolist()))}


def run(repo, *inputs, variant="sparse_gan", extra=(), out="preds"):
    root = repo["root"]
    argv = ["predict", "--variant", variant, "--models", str(root / "models"),
            "--calibration", str(root / "reports" / "variants"), "--out", str(root / out),
            "--batch-size", "2", "--device", "cpu", *extra, *map(str, inputs)]
    return main(argv)


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_folder_with_good_and_bad_files(repo, capsys):
    code = run(repo, repo["scans"])
    err = capsys.readouterr().err
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
    code = run(repo, repo["root"] / "nope.png", repo["scans"] / "gray1.jpeg", out="preds_missing")
    assert code == 1
    assert "nope.png: no such file or folder" in capsys.readouterr().err
    assert len(read_rows(repo["root"] / "preds_missing" / "predictions.csv")) == 1


@pytest.mark.parametrize("case,needle", [
    ("variant", "unknown variant 'sparse'"),
    ("model", "dvc repro train@pix2pix_latent"),
    ("calibration", "dvc repro calibrate@sparse_gan"),
    ("old model", "from before model files described themselves"),
])
def test_usage_errors_exit_2_with_one_line(repo, tmp_path, capsys, case, needle):
    root = repo["root"]
    argv = {"variant": dict(variant="sparse"), "model": dict(variant="pix2pix_latent")}.get(case, {})
    if case in ("variant", "model"):
        code = run(repo, repo["scans"], **argv)
    else:
        models, calib = root / "models", root / "reports" / "variants"
        if case == "calibration":
            calib = tmp_path / "empty"
        else:  # a model.pt of the weights-only layout of earlier versions
            models = tmp_path / "models"
            (models / "sparse_gan").mkdir(parents=True)
            old = torch.load(root / "models" / "sparse_gan" / "model.pt", weights_only=True)
            torch.save({k: old[k] for k in ("variant", "image_size", "config", "model")},
                       models / "sparse_gan" / "model.pt")
        code = main(["predict", "--variant", "sparse_gan", "--models", str(models),
                     "--calibration", str(calib),
                     "--out", str(tmp_path / "out"), str(repo["scans"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_argparse_errors_return_2(capsys):
    assert main(["predict", "--variant", "sparse_gan"]) == 2  # no --out, no INPUT
    assert main([]) == 2
    assert "usage: sparsegan" in capsys.readouterr().err


def test_module_entry_point_exit_status(repo):
    proc = subprocess.run([sys.executable, "-m", "sparsegan.predict", "predict", "--variant",
                           "nope", "--out", str(repo["root"] / "x"), "a.png"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown variant 'nope'" in proc.stderr


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


def test_variant_without_aam_uses_the_difference_map_and_16bit_input(repo, tmp_path, capsys):
    params = Params(model=ModelParams(base_channels=4))
    torch.manual_seed(1)
    detector = build_detector("autoencoder", params, SIZE).eval()
    (tmp_path / "models" / "autoencoder").mkdir(parents=True)
    torch.save(model_file("autoencoder", params, SIZE, config_hash("autoencoder", params, SIZE),
                          detector.state_dict(), REAL_DATA),
               tmp_path / "models" / "autoencoder" / "model.pt")
    (tmp_path / "cal" / "autoencoder").mkdir(parents=True)
    (tmp_path / "cal" / "autoencoder" / "calibration.json").write_text(json.dumps({"phi": 0.0}))
    deep = (scan(80, 60, 7).astype(np.uint16) * 16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    code = main(["predict", "--variant", "autoencoder", "--models", str(tmp_path / "models"),
                 "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "out"), "--device", "cpu", str(tmp_path / "deep.png")])
    assert code == 0, capsys.readouterr().err
    (row,) = read_rows(tmp_path / "out" / "predictions.csv")
    gray = load_gray(tmp_path / "deep.png", SIZE)
    # stretched from its own 0..4080 range: neither near black nor saturated
    assert gray.max() > 200 and gray.min() < 60 and (gray == 255).mean() < 0.1
    with torch.no_grad():
        out = detector.score(to_float(gray[None, None]))
    assert "aam" not in out.maps
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
    corner filling the model was trained with (a white wedge is filled only for such a model)."""
    root = repo["root"]
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "params.yaml").exists()
    img = scan(90, 70, 1)
    img[:12, :30] = 255  # a registration corner
    Image.fromarray(img).save(tmp_path / "corner.png")
    scores = {}
    for fill in (False, True):
        params = Params(model=ModelParams(base_channels=4),
                        preprocess=PreprocessParams(fill_corners=fill))
        torch.manual_seed(0)
        detector = build_detector("sparse_gan", params, SIZE).eval()
        models = tmp_path / f"models{int(fill)}"
        (models / "sparse_gan").mkdir(parents=True)
        torch.save(model_file("sparse_gan", params, SIZE, "x", detector.state_dict(), REAL_DATA),
                   models / "sparse_gan" / "model.pt")
        out = tmp_path / f"out{int(fill)}"
        code = main(["predict", "--variant", "sparse_gan", "--models", str(models),
                     "--calibration", str(root / "reports" / "variants"), "--out", str(out),
                     "--device", "cpu", "corner.png"])
        assert code == 0, capsys.readouterr().err
        (row,) = read_rows(out / "predictions.csv")
        with torch.no_grad():
            x = to_float(load_gray(tmp_path / "corner.png", SIZE, fill)[None, None])
            assert float(row["score"]) == pytest.approx(float(detector.score(x).score[0]),
                                                        rel=1e-5)
        scores[fill] = float(row["score"])
    assert scores[False] != scores[True]


def test_a_model_trained_on_synthetic_scans_says_so_once(repo, tmp_path, capsys):
    root = repo["root"]
    state = torch.load(root / "models" / "sparse_gan" / "model.pt", weights_only=True)
    state["data"] = {"source": "synthetic", "n_train": 2400}
    (tmp_path / "models" / "sparse_gan").mkdir(parents=True)
    torch.save(state, tmp_path / "models" / "sparse_gan" / "model.pt")
    code = main(["predict", "--variant", "sparse_gan", "--models", str(tmp_path / "models"),
                 "--calibration", str(root / "reports" / "variants"), "--out",
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
    state = torch.load(repo["root"] / "models" / "sparse_gan" / "model.pt", weights_only=True)
    detector = build_detector("sparse_gan", Params(model=ModelParams(base_channels=4)), SIZE)
    detector.load_state_dict(state["model"])
    detector.eval()
    with torch.no_grad():
        x = to_float(np.stack([gray_from_array(f, SIZE) for f in vol])[:, None])
        expected = detector.score(x).score.numpy()
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
    """sparse_gan gives the AAM and the residual map: the default draws the residual one."""
    from sparsegan.predict import map_name

    maps = {"difference": 0, "aam": 0, "aam_residual": 0}
    assert map_name("auto", maps) == "aam_residual" and map_name("aam", maps) == "aam"
    assert map_name("auto", {"difference": 0}) == "difference"
    a = run(repo, repo["scans"] / "gray1.jpeg", out="preds_res")
    b = run(repo, repo["scans"] / "gray1.jpeg", out="preds_aam", extra=("--map", "aam"))
    assert a == b == 0
    with Image.open(repo["root"] / "preds_res/overlays/gray1.jpeg.png") as x, \
            Image.open(repo["root"] / "preds_aam/overlays/gray1.jpeg.png") as y:
        assert not np.array_equal(np.asarray(x), np.asarray(y))


def test_patient_level_decisions_group_by_name_folder_and_dicom_series(repo, tmp_path, capsys):
    """Patients from OCT2017 names, a folder per patient and a DICOM series; the patient score
    is the validation-chosen aggregation of its scans' scores, decided at the patient phi."""
    root = repo["root"]
    calib = tmp_path / "cal" / "sparse_gan"
    calib.mkdir(parents=True)
    saved = json.loads((root / "reports/variants/sparse_gan/calibration.json").read_text())
    saved["patient"] = {"aggregation": "max", "phi": repo["phi"]}
    (calib / "calibration.json").write_text(json.dumps(saved))
    scans = tmp_path / "in"
    (scans / "p7").mkdir(parents=True)
    for k, seed in enumerate((21, 22)):
        Image.fromarray(scan(90, 70, seed)).save(scans / f"CNV-1234-{k + 1}.jpeg", quality=90)
        Image.fromarray(scan(90, 70, seed + 10)).save(scans / "p7" / f"b{k}.png")
    Image.fromarray(scan(90, 70, 40)).save(scans / "alone.png")
    _dicom(scans / "vol.dcm", np.stack([scan(80, 60, s).astype(np.uint16) for s in (1, 2)]))
    code = main(["predict", "--variant", "sparse_gan", "--models", str(root / "models"),
                 "--calibration", str(tmp_path / "cal"), "--out", str(tmp_path / "out"),
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


def test_auto_map_follows_the_calibrated_choice(repo, tmp_path):
    root = repo["root"]
    calib = tmp_path / "cal" / "sparse_gan"
    calib.mkdir(parents=True)
    saved = json.loads((root / "reports/variants/sparse_gan/calibration.json").read_text())
    (calib / "calibration.json").write_text(json.dumps({**saved, "map": "aam"}))
    common = ["predict", "--variant", "sparse_gan", "--models", str(root / "models"),
              "--calibration", str(tmp_path / "cal"), "--device", "cpu",
              str(repo["scans"] / "gray1.jpeg")]
    assert main([*common, "--out", str(tmp_path / "auto")]) == 0
    assert main([*common, "--out", str(tmp_path / "aam"), "--map", "aam"]) == 0
    with Image.open(tmp_path / "auto/overlays/gray1.jpeg.png") as a, \
            Image.open(tmp_path / "aam/overlays/gray1.jpeg.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
