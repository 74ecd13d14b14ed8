"""The MLflow store resolves to the main repository, also from a DVC temp workspace / worktree."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sparsegan.tracking import flatten, tracking_uri
from sparsegan.params import parse_params


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True)


def test_default_store_is_main_repo_db_even_from_a_worktree(tmp_path, monkeypatch):
    main = tmp_path / "main"
    main.mkdir()
    _git(main, "init", "-q")
    _git(main, "commit", "-q", "--allow-empty", "-m", "x")
    _git(main, "worktree", "add", "-q", str(tmp_path / "exp"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path / "exp")
    assert tracking_uri() == f"sqlite:///{main.resolve() / 'mlflow.db'}"


def test_env_var_overrides_the_store(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri() == "http://127.0.0.1:5999"


def test_flatten_names_params_as_in_params_yaml():
    flat = flatten(parse_params({"train": {"lambda_sp": 7}}))
    assert flat["train.lambda_sp"] == 7.0 and flat["data.synthetic.seed"] == 0


def test_dvc_temp_experiment_workspace_logs_to_the_main_repo(tmp_path):
    from sparsegan.tracking import main_repo_root

    temp_ws = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp_ws.mkdir(parents=True)
    _git(temp_ws, "init", "-q")  # DVC gives the temp workspace a git repository of its own
    assert main_repo_root(temp_ws) == (tmp_path / "repo").resolve()
