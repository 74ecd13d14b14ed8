"""The figures and reports/index.html on tiny fake inputs, and the page in headless Chromium.

Chromium (Debian's ``chromium`` package; ``.ci/install_chromium.sh`` installs it) is driven with
its own command line, no WebDriver: a copy of the page gets a small script that writes what it
sees (images loaded, table rows) into ``<pre id="result">``, and ``--dump-dom`` returns the DOM.
Without Chromium the browser test fails under CI (``CI=true``) and is skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sparsegan.evaluate import PAPER_TABLE1, seed_metrics, summarize_seeds
from sparsegan.figures import RowFiles, make_figures
from sparsegan.html_report import write_index
from sparsegan.metrics import calibrate_phi, detection_metrics

SIZE = 32
PER_CLASS = 4
CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
ROWS = ("autoencoder", "fanogan", "sparse_gan")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_processed(root: Path, rng: np.random.Generator
                    ) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    processed = root / "data" / "processed"
    processed.mkdir(parents=True)
    rows, images, masks = [], [], []
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cls in CLASSES:
        for k in range(PER_CLASS):
            img = (60 + 80 * np.exp(-((yy - 16 - 3 * np.sin(xx / 6)) / 4.0) ** 2)
                   + rng.normal(0, 12, (SIZE, SIZE)))
            mask = np.zeros((SIZE, SIZE), np.uint8)
            if cls != "NORMAL":
                cy, cx = rng.integers(10, 22, 2)
                mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = 1
                img = img + 90 * mask
            images.append(np.clip(img, 0, 255).astype(np.uint8)[None])
            masks.append(mask[None])
            rows.append({"path": f"raw/{cls}/{cls}-{k}.jpeg", "label": int(cls != "NORMAL"),
                         "class": cls, "patient": f"p{k}",
                         "mask": f"raw/masks/{cls}-{k}.png" if cls != "NORMAL" else ""})
    images, masks, index = np.stack(images), np.stack(masks), pd.DataFrame(rows)
    np.save(processed / "test.npy", images)
    np.save(processed / "test_masks.npy", masks)
    index.to_csv(processed / "test.csv", index=False)
    return images, index, masks


def _files(root: Path, row: str) -> RowFiles:
    """The row's files in the pipeline's layout (model = the row's name here, seed 0)."""
    row_dir = root / "reports" / "rows" / row
    return RowFiles(seed=0, scores=root / "scores" / row / "s0" / "score",
                    calibration=row_dir / "calibration" / "s0.json",
                    history=root / "models" / row / "s0" / "history.json",
                    roc=row_dir / "roc.csv", metrics=row_dir / "metrics.json",
                    processed=root / "data" / "processed")


def _fake_row(root: Path, row: str, images: np.ndarray, index: pd.DataFrame,
                  masks: np.ndarray, rng: np.random.Generator, separation: float) -> dict:
    files = _files(root, row)
    scores_dir, model_dir = files.scores, files.history.parent
    for d in (scores_dir, files.calibration.parent, model_dir):
        d.mkdir(parents=True)
    labels = index["label"].to_numpy()
    test_scores = labels * separation + rng.normal(0, 1, len(labels))
    index.assign(score=test_scores).to_csv(scores_dir / "test.csv", index=False)
    val_labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    val_scores = val_labels * separation + rng.normal(0, 1, 40)
    pd.DataFrame({"label": val_labels, "class": np.where(val_labels, "CNV", "NORMAL"),
                  "score": val_scores}).to_csv(scores_dir / "val.csv", index=False)
    recon = np.clip(images.astype(np.float32) - 80 * masks + rng.normal(0, 5, images.shape),
                    0, 255).astype(np.uint8)
    diff = (np.abs(images.astype(np.float32) - recon) / 127.5).astype(np.float16)
    maps = {"difference": diff, "reconstruction": recon}
    if row == "sparse_gan":
        aam = masks.astype(np.float32) + rng.uniform(0, 0.3, masks.shape)
        maps["aam"] = (aam / aam.max()).astype(np.float16)
    np.savez_compressed(scores_dir / "test_maps.npz", **maps)
    phi = calibrate_phi(val_labels, val_scores, "accuracy")
    calibration = {"phi": phi, "criterion": "accuracy",
                   "validation": detection_metrics(val_labels, val_scores, phi)}
    files.calibration.write_text(json.dumps(calibration))
    per_seed, roc = seed_metrics(scores_dir, calibration, masks)
    roc.assign(row=row, seed=0).to_csv(files.roc, index=False)
    metrics = summarize_seeds({0: per_seed})
    files.metrics.write_text(json.dumps(metrics, indent=1))
    if row == "fanogan":
        history = ([{"epoch": e, "phase": "gan", "loss_d": -1.0 / e, "loss_gp": 0.1 / e,
                     "loss_g": 0.5 / e, "images_per_s": 50.0} for e in (1, 2, 3)]
                   + [{"epoch": e, "phase": "encoder", "loss_izif": 1.0 / e,
                       "loss_image_mse": 0.6 / e, "images_per_s": 80.0} for e in (4, 5)])
    else:
        history = [{"epoch": e, "phase": "train", "loss_re": 1.0 / e, "loss_adv": 0.7,
                    "images_per_s": 60.0} for e in range(1, 5)]
    (model_dir / "history.json").write_text(json.dumps(history))
    return metrics


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    images, index, masks = _fake_processed(root, rng)
    metrics = {v: _fake_row(root, v, images, index, masks, rng, sep)
               for v, sep in zip(ROWS, (1.0, 2.0, 8.0))}
    figures = make_figures({v: _files(root, v) for v in ROWS}, root / "reports" / "figures")
    html_path = write_index(metrics, figures, root / "reports" / "index.html", PAPER_TABLE1,
                            provenance={"params hash": "abc123", "seed": 0,
                                        "git commit": "deadbeef"})
    return {"root": root, "metrics": metrics, "figures": figures, "html": html_path}


def test_figures_drawn_in_parallel_processes_are_the_serial_ones(report, tmp_path):
    root = report["root"]
    made = {w: make_figures({v: _files(root, v) for v in ROWS}, tmp_path / f"w{w}",
                            workers=w) for w in (1, 2)}
    assert [p.name for p in made[2]["sparse_gan"]] == ["scores.png", "losses.png", "gallery.png",
                                                       "gallery_errors.png"]
    for key, paths in made[1].items():
        assert [p.relative_to(tmp_path / "w1") for p in paths] == \
            [p.relative_to(tmp_path / "w2") for p in made[2][key]]
        for a, b in zip(paths, made[2][key]):
            assert a.read_bytes() == b.read_bytes(), a


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_every_figure_is_a_png(report):
    figures = report["figures"]
    assert [p.name for p in figures["overview"]] == ["roc.png"]
    for v in ROWS:
        assert [p.name for p in figures[v]] == ["scores.png", "losses.png", "gallery.png",
                                                "gallery_errors.png"]
    for paths in figures.values():
        for p in paths:
            assert p.is_file() and p.parent.is_relative_to(report["root"] / "reports" / "figures")
            w, h = _png_size(p)
            assert 300 <= w <= 2500 and 100 <= h <= 3000, (p, w, h)
            assert p.stat().st_size < 1_000_000, p
    # the PNG decodes to a picture with content, not a blank canvas
    from PIL import Image
    pixels = np.asarray(Image.open(figures["sparse_gan"][2]).convert("L"))
    assert pixels.std() > 20


def test_html_is_self_contained_with_one_table_row_per_row(report):
    text = report["html"].read_text()
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text), "non-embedded link"
    n_figures = sum(len(v) for v in report["figures"].values())
    assert text.count('<img src="data:image/png;base64,') == n_figures
    table1 = text.split('<table id="table1">')[1].split("</table>")[0]
    assert [re.findall(r'data-row="([^"]+)"', table1)] == [list(ROWS)]
    details = text.split('<table id="details">')[1].split("</table>")[0]
    assert details.count("data-row=") == len(ROWS)
    # ours beside the paper's, with the bootstrap interval where the metrics have one
    m = report["metrics"]["sparse_gan"]
    assert "Sparse-GAN" in table1 and "0.925" in table1
    assert f"[{m['test_auc_ci_low']:.3f}, {m['test_auc_ci_high']:.3f}]" in table1
    assert f"{report['metrics']['autoencoder']['test_auc']:.3f}" in table1
    for cls in ("CNV", "DME", "DRUSEN"):
        assert f"AUC {cls}" in details
    assert "pixel AUROC aam" in details and "pixel AUROC difference" in details
    assert "git commit: deadbeef" in text


def _chromium() -> str | None:
    """``$CHROMIUM`` when set (a path; a missing one means no browser), else chromium on PATH."""
    if os.environ.get("CHROMIUM"):
        path = os.environ["CHROMIUM"]
        return path if Path(path).is_file() else None
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var out = document.createElement("pre");
  out.id = "result";
  out.textContent = JSON.stringify({images: imgs.length, loaded: loaded,
    rows: document.querySelectorAll("#table1 tbody tr").length,
    table_rows: document.querySelectorAll("#table1 tr[data-row]").length});
  document.body.appendChild(out);
});
</script>"""


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--no-default-browser-check",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(profile)})


def test_page_renders_in_headless_chromium(request, tmp_path):
    binary = _chromium()
    if binary is None:
        message = ("Chromium is not installed (Debian package `chromium`; run "
                   ".ci/install_chromium.sh)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + ": required in CI")
        pytest.skip(message)
    report = request.getfixturevalue("report")
    html_path = report["html"]
    probe = tmp_path / "index_probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE + "</body>"))
    done = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no result from Chromium (rc {done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    n_figures = sum(len(v) for v in report["figures"].values())
    assert result == {"images": n_figures, "loaded": n_figures, "rows": len(ROWS),
                      "table_rows": len(ROWS)}

    shot = html_path.with_name("index_screenshot.png")
    done = _run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={shot}",
                         "--window-size=1280,2000", "--hide-scrollbars", html_path.as_uri())
    assert shot.is_file(), f"no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    assert _png_size(shot) == (1280, 2000)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10, "blank screenshot"


def test_roc_overlay_draws_the_seed_each_row_names(tmp_path, monkeypatch):
    """A row's roc.csv and metrics.json hold every seed: the overlay draws the curve and the
    operating point of ``RowFiles.seed`` and gives that seed's AUC; a row of one seed's flat files
    is drawn as it is; a row whose roc.csv is missing is left out."""
    import sparsegan.figures as figures_module
    from sparsegan.figures import roc_overlay

    saved = {}
    real_save = figures_module._save

    def keep(fig, out_png, **kw):
        saved["fig"] = fig
        return real_save(fig, out_png, **kw)

    monkeypatch.setattr(figures_module, "_save", keep)

    def files(row: str, seed: int) -> RowFiles:
        d = tmp_path / row
        d.mkdir(exist_ok=True)
        return RowFiles(seed=seed, scores=d / "scores", calibration=d / "calibration.json",
                        history=d / "history.json", roc=d / "roc.csv", metrics=d / "metrics.json")

    multi = files("sparse_gan", 1)
    pd.DataFrame({"fpr": [0, 0.5, 1, 0, 0.1, 1], "tpr": [0, 0.5, 1, 0, 0.9, 1],
                  "threshold": [9, 1, 0, 9, 1, 0], "seed": [0, 0, 0, 1, 1, 1]}).to_csv(
        multi.roc, index=False)
    multi.metrics.write_text(json.dumps({
        "test_auc": 0.7, "n_seeds": 2,
        "seeds": {"0": {"test_auc": 0.5, "test_sensitivity": 0.5, "test_specificity": 0.5},
                  "1": {"test_auc": 0.9, "test_sensitivity": 0.9, "test_specificity": 0.8}}}))
    flat = files("autoencoder", 1)
    pd.DataFrame({"fpr": [0, 0.3, 1], "tpr": [0, 0.6, 1]}).to_csv(flat.roc, index=False)
    flat.metrics.write_text(json.dumps({"test_auc": 0.654}))
    missing = files("fanogan", 1)

    out = roc_overlay({"sparse_gan": multi, "autoencoder": flat, "fanogan": missing},
                      tmp_path / "roc.png")
    assert _png_size(out)[0] >= 300
    ax = saved["fig"].axes[0]
    curves = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert set(curves) == {"chance", "sparse_gan (AUC 0.900)", "autoencoder (AUC 0.654)"}
    np.testing.assert_allclose(curves["sparse_gan (AUC 0.900)"].get_xdata(), [0, 0.1, 1])
    np.testing.assert_allclose(curves["sparse_gan (AUC 0.900)"].get_ydata(), [0, 0.9, 1])
    np.testing.assert_allclose(curves["autoencoder (AUC 0.654)"].get_xdata(), [0, 0.3, 1])
    points = [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.lines
              if line.get_marker() == "o"]
    assert points == [pytest.approx((0.2, 0.9))]  # seed 1's (1 - specificity, sensitivity)
    assert "seed 1" in ax.get_title()
