"""The MLflow store resolves to the main repository, also from a DVC temp workspace / worktree."""

from __future__ import annotations

import subprocess
import sys
import time
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


def test_two_processes_creating_a_new_store_at_once_both_log(tmp_path):
    """``dvc queue start -j 2`` from a fresh clone: two stages open a store that does not exist
    yet at the same moment; both must create their run (MLflow's migration runs once)."""
    db = tmp_path / "mlflow.db"
    start = time.time() + 8  # both processes have imported mlflow by then
    code = ("import sys, time; import mlflow; from sparsegan.tracking import start_run; "
            f"time.sleep(max(0, {start} - time.time())); "
            "run = start_run(sys.argv[1]); mlflow.end_run()")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code, f"p{i}"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("sparse-gan-oct")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    names = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id]))
    assert names == ["p0", "p1"]
