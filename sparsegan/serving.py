"""The screening model as an MLflow model: pyfunc, Model Registry, REST serving.

:class:`ScreeningModel` is an ``mlflow.pyfunc.PythonModel`` whose artifacts are the trained
``model.pt`` (weights and plain data, loaded with ``weights_only``) and its screening config
(:func:`sparsegan.screening.screening_config`: row, trained model, score, seed, the score knobs
the score stage recorded, phi, the patient rule, the map drawn); no pickle of our classes. It
scores through :class:`sparsegan.screening.Screener`, as ``sparsegan predict`` does. Its input is a DataFrame with a
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

from .screening import CONFIG

REGISTERED_PREFIX = "sparse-gan-oct-"
# The output columns, in order, with their MLflow types: the one list predict and signature read.
OUTPUTS = (("score", "double"), ("phi", "double"), ("decision", "string"), ("map_png", "string"))


def registered_name(row: str) -> str:
    return REGISTERED_PREFIX + row


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
        from .checkpoint import load_trained
        from .screening import Screener

        config = json.loads(Path(context.artifacts["config"]).read_text())
        weights = Path(context.artifacts["weights"])
        self.screener = Screener(load_trained(weights.parent, model=config["model"]), config)
        self.warned = False

    def predict(self, context, model_input, params=None):
        import pandas as pd
        from PIL import Image

        from .data.preprocess import SkipImage

        screener = self.screener
        warning = screener.warning()
        if warning and not getattr(self, "warned", True):
            self.warned = True  # once per loaded model
            logging.getLogger("sparsegan.serving").warning("this screening model was %s", warning)
        with tempfile.TemporaryDirectory() as tmp:
            images = []
            for k, value in enumerate(model_input["image"].tolist()):
                try:
                    images.append(screener.load(_image_file(str(value), Path(tmp), k)))
                except SkipImage as exc:
                    raise ValueError(f"image {k}: {exc}") from None
        out = screener.score(np.stack(images))
        heat = out.maps[screener.config["map"]].float().numpy()[:, 0]
        rows = []
        for score, h in zip(out.score.float().numpy(), heat):
            lo, hi = float(h.min()), float(h.max())
            h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
            png = io.BytesIO()
            Image.fromarray(np.rint(h * 255).astype(np.uint8)).save(png, "PNG")
            rows.append((float(score), screener.phi, screener.decision(float(score)),
                         base64.b64encode(png.getvalue()).decode()))
        return pd.DataFrame(rows, columns=[name for name, _ in OUTPUTS])


def signature():
    """The screening model's input and output columns (module docstring): written down, not
    inferred by running the model on an example."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec(kind, name) for name, kind in OUTPUTS]))


def log_screening_model(model_dir: Path, config: dict, example_image: Path | None = None):
    """Log the pyfunc screening model of ``config`` (:func:`sparsegan.screening.screening_config`;
    ``model_dir`` holds the trained model of its seed) into the active run and register it as a
    version of ``sparse-gan-oct-<row>``, tagged with the seed; returns the ``ModelInfo``."""
    import mlflow
    import pandas as pd
    import torch

    from .checkpoint import load_trained

    model_dir, row = Path(model_dir), config["row"]
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / CONFIG
        config_file.write_text(json.dumps(config, indent=1))
        artifacts = {"weights": str(model_dir / "model.pt"), "config": str(config_file)}
        input_example = None
        if example_image is not None:  # MLflow loads the logged model and runs it on this
            input_example = pd.DataFrame(
                {"image": [base64.b64encode(Path(example_image).read_bytes()).decode()]})
        load_trained(model_dir, model=config["model"])  # a bad file fails here, named
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
                str(config["seed"]))
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
