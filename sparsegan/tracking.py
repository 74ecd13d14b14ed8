"""MLflow tracking in a sqlite store at the main repository's root: one parent run per pipeline
run and set of params (named by the DVC experiment, else the commit) and under it one child run
per trained (model, seed), named e.g. ``sparse_gan s1 exp-ab12``, which gets the training curves
and the test metrics of every row scored from that model (``<row>.test_auc``, ...). The report
stage logs into the parent run.

``dvc exp run --temp/--queue`` runs stages in ``.dvc/tmp/exps/...``; a relative
``sqlite:///mlflow.db`` would be created there and lost, so the default store is resolved to the
main repository (git's common dir knows it). ``MLFLOW_TRACKING_URI`` overrides everything.

:func:`check_tracking` tells within seconds whether the store can be reached (an http(s) server
answers ``/health``, a sqlite file's folder exists), so that a wrong ``MLFLOW_TRACKING_URI`` stops a
training run before it starts rather than after hours; the message says how to fall back to the
local store (unset ``MLFLOW_TRACKING_URI``).

A new sqlite store is created, and the experiment selected, under a file lock beside the database
(``mlflow.db.lock``): two experiments started at once from a fresh clone (``dvc queue start -j
2``) would otherwise both run MLflow's schema migration and one would crash. The experiment is
tagged ``mlflow.experimentKind = custom_model_development``, but MLflow 3.17's UI keeps the
GenAI / model-training toggle in the browser and opens a fresh profile in the GenAI view
regardless (3.18.0 too, tried with its packages forced in); the URL parameter
``workflowType=machine_learning`` selects the model-training view, so :func:`ui_url` carries it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .params import load_params

EXPERIMENT = "sparse-gan-oct"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
CHECK_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached; the message says how to fall back."""


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def main_repo_root(cwd: Path | None = None) -> Path:
    """The main working tree's root, also from a DVC temp workspace or a git worktree.

    ``dvc exp run --temp/--queue`` runs in ``<repo>/.dvc/tmp/exps/<dir>`` with a git repository of
    its own, so the path says where the main repo is; a git worktree's common dir says it too."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    common = _git("-C", str(cwd), "rev-parse", "--path-format=absolute", "--git-common-dir")
    return Path(common).parent if common else cwd


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def _local_store() -> str:
    return f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def check_tracking(uri: str | None = None, timeout: float = CHECK_TIMEOUT_S) -> str:
    """Return the tracking URI if its store can be reached, else raise :class:`TrackingError`.

    http(s): one GET of ``<uri>/health`` with ``timeout`` seconds (any HTTP answer, even an error
    status, means a server is there; MLflow itself would retry a dead server for minutes).
    sqlite: the database file's folder must exist. Other schemes are left to MLflow."""
    uri = uri or tracking_uri()
    from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    where = "MLFLOW_TRACKING_URI=" + uri if from_env else "the tracking store " + uri
    fallback = (f"or unset MLFLOW_TRACKING_URI to log to the local store {_local_store()}"
                if from_env else "or set MLFLOW_TRACKING_URI to a reachable store")
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310
                pass
        except urllib.error.HTTPError:
            pass  # a server answered
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise TrackingError(f"{where} is not reachable ({reason}); nothing was trained. Start "
                                f"the MLflow server or fix the URI, {fallback}") from None
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is not None:
            folder = db.parent
            if not folder.is_dir():
                raise TrackingError(f"{where}: the folder {folder} does not exist; nothing was "
                                    f"trained. Create it or fix the URI, {fallback}")
    return uri


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested params dataclass -> {"train.lambda_sp": 50.0, ...}."""
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: ",".join(map(str, obj)) if isinstance(obj, tuple) else obj}


def _sqlite_path(uri: str) -> Path | None:
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    return Path(path).expanduser() if path and path != ":memory:" else None


def ui_url(experiment_id: str, port: int = 5000) -> str:
    """The ``mlflow ui`` page of the experiment's runs, in the model-training view."""
    return (f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning")


def open_experiment(uri: str):
    """Point MLflow at ``uri`` and select (creating if needed) our tagged experiment; for a sqlite
    store under a file lock, so that concurrent first uses create the store once."""
    import mlflow

    with _store_lock(_sqlite_path(uri)):
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(EXPERIMENT)
        if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            mlflow.set_experiment_tag(*EXPERIMENT_KIND)
    return experiment


def log_training_data(images, path: Path, source: str) -> None:
    """The training arrays as the active run's dataset input (name, source file, digest)."""
    import warnings

    import mlflow

    with warnings.catch_warnings():  # MLflow guesses a source type for the path and warns
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_numpy(images, source=str(Path(path).resolve()),
                                         name=f"train ({source})")
    mlflow.log_input(dataset, context="training")


PIPELINE_TAG = "sparsegan.pipeline"
PARAMS_TAG = "sparsegan.params"


def pipeline_name() -> str:
    """This pipeline run's name: the DVC experiment (``DVC_EXP_NAME``, set by ``dvc exp run``),
    else ``commit <short sha>`` (``dvc repro``), else ``workspace``."""
    exp = os.environ.get("DVC_EXP_NAME", "")
    if exp:
        return exp
    sha = _git("rev-parse", "--short", "HEAD")
    return f"commit {sha}" if sha else "workspace"


def params_fingerprint(path: Path = Path("params.yaml")) -> str:
    """8 hex digits of the params the pipeline runs on (the parsed file with its defaults filled
    in, flattened as the runs log them: comments, key order and a spelled-out default do not
    count); ``none`` without a params file."""
    if not path.is_file():
        return "none"
    text = json.dumps(flatten(load_params(path)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def pipeline_run_id() -> str:
    """The parent run of this pipeline run: the run tagged with its name *and* its params'
    fingerprint (MLflow refuses to change a logged param, so the same experiment name or commit
    re-run with other params, e.g. an edited ``params.yaml``, is another parent, named
    ``<name> params-<fingerprint>``). Created once, under the store's file lock, so that stages
    started at once create one."""
    from mlflow.tracking import MlflowClient

    uri = check_tracking()
    experiment = open_experiment(uri)
    name, fingerprint = pipeline_name(), params_fingerprint()
    db = _sqlite_path(uri)
    with _store_lock(db):
        client = MlflowClient()

        def search(extra: str = ""):
            return client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`{PIPELINE_TAG}` = '{name}'" + extra,
                                      max_results=1, order_by=["attributes.start_time ASC"])

        found = search(f" and tags.`{PARAMS_TAG}` = '{fingerprint}'")
        if found:
            return found[0].info.run_id
        run_name = f"{name} params-{fingerprint}" if search() else name
        run = client.create_run(experiment.experiment_id, run_name=run_name, tags={
            PIPELINE_TAG: name, PARAMS_TAG: fingerprint,
            "git_commit": _git("rev-parse", "HEAD") or "unknown",
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")})
        client.set_terminated(run.info.run_id)
        return run.info.run_id


def _store_lock(db: Path | None):
    """A file lock beside a sqlite store, or no lock for other stores."""
    from filelock import FileLock

    return FileLock(f"{db}.lock") if db else contextlib.nullcontext()


def start_run(model: str, seed: int, run_id: str | None = None):
    """Start (or, given ``run_id``, resume) the child run of (``model``, ``seed``) under this
    pipeline run's parent, tagged with model, seed, git commit and DVC experiment."""
    import mlflow

    if run_id:
        open_experiment(check_tracking())
        try:
            return mlflow.start_run(run_id=run_id)
        except Exception:  # the run lives in another store (e.g. restored from DVC's cache)
            pass
    parent = pipeline_run_id()
    name = pipeline_name()
    return mlflow.start_run(run_name=f"{model} s{seed} {name}", tags={
        "mlflow.parentRunId": parent, PIPELINE_TAG + ".child": name,
        "model": model, "seed": str(seed),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
    })


def start_pipeline_run():
    """Resume this pipeline run's parent run (the report stage logs there)."""
    import mlflow

    return mlflow.start_run(run_id=pipeline_run_id())
