"""The screening model as an MLflow model: pyfunc, Model Registry, REST serving.

:class:`ScreeningModel` is an ``mlflow.pyfunc.PythonModel`` whose artifacts are the trained
``model.pt`` (weights and plain data, loaded with ``weights_only``) and a JSON config (row,
trained model, score, seed, the scoring knobs, phi, the patient rule, the map drawn); no pickle of our classes. Its input is a DataFrame with a
column ``image``: each value a B-scan file's bytes in base64 (what a REST client sends) or a path
to the file; any size and mode, converted exactly as in training
(:func:`sparsegan.data.preprocess.load_gray`). Its output has per image ``score``, ``phi``,
``decision`` (``disease`` when score > phi, eq. 5) and ``map_png`` (the localising map at the
model's resolution, min-max normalised, as a base64 8-bit PNG: the map with the best validation
pixel AUROC, the calibration's ``map``; without masks the residual activation map for the latent
score, else the difference map).

:func:`log_screening_model` logs it into the active run and registers it as
``sparse-gan-oct-<row>`` (one registered model per row, one version per seed and pipeline run,
tagged ``seed``); :func:`set_champion` gives the alias ``champion`` to the row with the best mean
*validation* AUC over its seeds, on the version of its best validation seed. Then::

    mlflow models serve -m models:/sparse-gan-oct-autoencoder@champion --env-manager local -p 5001
    sparsegan predict --model-uri models:/sparse-gan-oct-autoencoder@champion --out preds/ scans/
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

REGISTERED_PREFIX = "sparse-gan-oct-"
CONFIG = "screening.json"
# The output columns, in order, with their MLflow types: the one list predict and signature read.
OUTPUTS = (("score", "double"), ("phi", "double"), ("decision", "string"), ("map_png", "string"))


def registered_name(row: str) -> str:
    return REGISTERED_PREFIX + row


def screening_config(calibration: dict, map_name: str) -> dict:
    """The JSON config logged beside the weights, from one seed's calibration of a row
    (:func:`sparsegan.metrics.calibrate_row`)."""
    rule = calibration.get("patient")
    return {**{k: calibration[k] for k in ("row", "model", "score", "seed", "score_params")},
            "phi": float(calibration["phi"]),
            "criterion": calibration.get("criterion"), "map": map_name,
            "patient": None if rule is None else {"aggregation": rule["aggregation"],
                                                  "phi": float(rule["phi"])}}


def _image_file(value: str, tmp: Path, k: int) -> Path:
    """A path as given, or base64 file bytes written to a temporary file."""
    if len(value) < 4096 and os.path.isfile(value):
        return Path(value)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {k}: neither an existing file nor base64 file bytes") from None
    path = tmp / f"image{k}"
    path.write_bytes(data)
    return path


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class ScreeningModel(_pyfunc_base()):
    """See the module docstring."""

    def load_context(self, context) -> None:
        from .train import load_trained

        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        weights = Path(context.artifacts["weights"])
        self.trained = load_trained(weights.parent, model=self.config["model"])
        self.warned = False

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch
        from PIL import Image

        from .data.dataset import to_float
        from .data.preprocess import SkipImage, load_gray
        from .params import parse_params
        from .scoring import score_batch

        m, cfg = self.trained, self.config
        if m.data.get("source") == "synthetic" and not getattr(self, "warned", True):
            self.warned = True  # once per loaded model
            logging.getLogger("sparsegan.serving").warning(
                "this screening model was trained on synthetic scans only (%s normal training "
                "scans of the embedded generator); its scores and phi are not validated on real "
                "scans. Train on yours: dvc exp run -S data.source=folder -S data.folder=<tree>",
                m.data.get("n_train", "?"))
        fill = m.params.preprocess.fill_corners
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            images = []
            for k, value in enumerate(model_input["image"].tolist()):
                try:
                    images.append(load_gray(_image_file(str(value), Path(tmp), k), m.image_size,
                                            fill))
                except SkipImage as exc:
                    raise ValueError(f"image {k}: {exc}") from None
        torch.manual_seed(m.seed)  # as in the score stage
        knobs = parse_params({"score": cfg["score_params"]}).score
        out = score_batch(m.detector, to_float(np.stack(images)[:, None]), knobs)[cfg["score"]]
        heat = out.maps[cfg["map"]].float().numpy()[:, 0]
        for score, h in zip(out.score.float().numpy(), heat):
            lo, hi = float(h.min()), float(h.max())
            h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
            png = io.BytesIO()
            Image.fromarray(np.rint(h * 255).astype(np.uint8)).save(png, "PNG")
            rows.append((float(score), cfg["phi"], "disease" if score > cfg["phi"] else "normal",
                         base64.b64encode(png.getvalue()).decode()))
        return pd.DataFrame(rows, columns=[name for name, _ in OUTPUTS])


def default_map(score: str) -> str:
    """The map a reader is shown when calibration had no lesion masks to choose one on: the
    residual activation map for the latent score, else the difference map."""
    return "aam_residual" if score == "latent" else "difference"


def signature():
    """The screening model's input and output columns (module docstring): written down, not
    inferred by running the model on an example."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUTS]))


def log_screening_model(row: str, model_dir: Path, calibration: dict,
                        example_image: Path | None = None):
    """Log the pyfunc screening model of ``row`` (``model_dir`` holds the trained model of the
    calibration's seed) into the active run and register it as a version of
    ``sparse-gan-oct-<row>``, tagged with the seed; returns the ``ModelInfo``."""
    import mlflow
    import pandas as pd
    import torch

    from .train import load_trained

    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / CONFIG
        shown = calibration.get("map") or default_map(calibration["score"])
        config.write_text(json.dumps(screening_config(calibration, shown), indent=1))
        artifacts = {"weights": str(model_dir / "model.pt"), "config": str(config)}
        input_example = None
        if example_image is not None:  # MLflow loads the logged model and runs it on this
            input_example = pd.DataFrame(
                {"image": [base64.b64encode(Path(example_image).read_bytes()).decode()]})
        load_trained(model_dir, model=calibration["model"])  # a bad file fails here, named
        info = mlflow.pyfunc.log_model(
            name="screening", python_model=ScreeningModel(), artifacts=artifacts,
            code_paths=[str(Path(__file__).resolve().parent)], signature=signature(),
            input_example=input_example, registered_model_name=registered_name(row),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}", "numpy", "pandas", "pillow",
                              "scipy", "pyyaml"])
        if info.registered_model_version is not None:
            mlflow.MlflowClient().set_model_version_tag(
                registered_name(row), str(info.registered_model_version), "seed",
                str(calibration["seed"]))
        return info


def set_champion(val_aucs: dict[str, dict[int, float]], client=None) -> tuple[str, int] | None:
    """Alias ``champion`` on the row with the best mean validation AUC over its seeds
    (``{row: {seed: val AUC}}``; the test split never chooses), on the latest version of its
    seed with the best validation AUC; returns ``(row, seed)``, or None when none is registered."""
    import mlflow

    client = client or mlflow.MlflowClient()
    for row in sorted(val_aucs, key=lambda r: -float(np.mean(list(val_aucs[r].values())))):
        versions = client.search_model_versions(f"name = '{registered_name(row)}'")
        for seed in sorted(val_aucs[row], key=lambda s: -val_aucs[row][s]):
            mine = [v for v in versions if v.tags.get("seed") == str(seed)]
            if mine:
                latest = max(mine, key=lambda v: int(v.version))
                client.set_registered_model_alias(registered_name(row), "champion",
                                                  latest.version)
                return row, seed
    return None


def resolve_model_uri(uri: str) -> tuple[Path, dict]:
    """``(folder holding model.pt, screening config)`` of an MLflow model URI
    (``models:/<name>@champion``, ``runs:/...``), downloaded from the tracking store."""
    import mlflow

    from .tracking import open_experiment, tracking_uri

    open_experiment(tracking_uri())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    weights = next(local.rglob("model.pt"), None)
    config = next(local.rglob(CONFIG), None)
    if weights is None or config is None:
        raise FileNotFoundError(f"{uri}: not a screening model of this pipeline (no model.pt "
                                f"and {CONFIG} among its artifacts)")
    return weights.parent, json.loads(config.read_text())
