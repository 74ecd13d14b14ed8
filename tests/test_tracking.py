"""The MLflow store resolves to the main repository, also from a DVC temp workspace / worktree;
one parent run per pipeline run, a child per (model, seed)."""

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
    flat = flatten(parse_params({"train": {"lambda_sp": 7}, "seeds": [0, 2]}))
    assert flat["train.lambda_sp"] == 7.0 and flat["data.synthetic.seed"] == 0
    assert flat["seeds"] == "0,2" and flat["rows.pix2pix_image"] == "pix2pix,image"


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
            "run = start_run(sys.argv[1], 0); mlflow.end_run()")
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
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1  # created once, under the lock
    children = sorted(r.info.run_name for r in runs if r is not parents[0])
    assert children == [f"p0 s0 {parents[0].info.run_name}", f"p1 s0 {parents[0].info.run_name}"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in runs if r is not parents[0])


def test_children_of_one_experiment_share_its_named_parent(tmp_path, monkeypatch):
    import mlflow

    from sparsegan.tracking import start_pipeline_run, start_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    ids = {}
    for exp_name in ("exp-ab12", "exp-cd34"):
        monkeypatch.setenv("DVC_EXP_NAME", exp_name)
        for model, seed in (("sparse_gan", 1), ("pix2pix", 0)):
            with start_run(model, seed) as run:
                mlflow.log_param("seed", seed)
                ids[(exp_name, model)] = run.info.run_id
        with start_pipeline_run() as parent:
            ids[exp_name] = parent.info.run_id
    client = mlflow.MlflowClient()
    for exp_name in ("exp-ab12", "exp-cd34"):
        parent = client.get_run(ids[exp_name])
        assert parent.info.run_name == exp_name and "mlflow.parentRunId" not in parent.data.tags
        child = client.get_run(ids[(exp_name, "sparse_gan")])
        assert child.info.run_name == f"sparse_gan s1 {exp_name}"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (child.data.tags["model"], child.data.tags["seed"]) == ("sparse_gan", "1")
        assert client.get_run(ids[(exp_name, "pix2pix")]).data.tags["mlflow.parentRunId"] == \
            parent.info.run_id
    assert ids["exp-ab12"] != ids["exp-cd34"]
    exp = client.get_experiment_by_name("sparse-gan-oct")
    assert len(client.search_runs([exp.experiment_id])) == 6  # 2 parents, 4 children


def test_the_same_experiment_name_with_other_params_is_another_parent(tmp_path, monkeypatch):
    """A study re-run under its name (or ``dvc repro`` at one commit after editing
    ``params.yaml``) logs its params to the parent: MLflow refuses to change a logged param, so
    other params get another parent, named apart; the same params (comments, key order and a
    spelled-out default aside) find their parent again."""
    import mlflow

    from sparsegan.tracking import start_pipeline_run, start_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_EXP_NAME", "synthetic")
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    parents, children = [], []
    for text in ("seeds: [0]\ndata: {synthetic: {train_normal: 2400}}\n",
                 "seeds: [0]\ndata: {synthetic: {train_normal: 1400}}\n",
                 "# the first again, one default spelled out\n"
                 "data: {synthetic: {train_normal: 2400}, image_size: 64}\nseeds: [0]\n"):
        params.write_text(text)
        with start_run("autoencoder", 0) as child:
            children.append(child.info.run_id)
        with start_pipeline_run() as parent:
            mlflow.log_params({"data.train_normal": text.split("train_normal: ")[1][:4]})
            parents.append(parent.info.run_id)
    assert parents[0] == parents[2] != parents[1]
    client = mlflow.MlflowClient()
    first, second = client.get_run(parents[0]), client.get_run(parents[1])
    assert first.info.run_name == "synthetic"
    assert second.info.run_name == f"synthetic params-{second.data.tags['sparsegan.params']}"
    assert (first.data.params["data.train_normal"], second.data.params["data.train_normal"]) == (
        "2400", "1400")
    assert [client.get_run(c).data.tags["mlflow.parentRunId"] for c in children] == parents


def test_without_a_dvc_experiment_the_parent_is_named_by_the_commit(tmp_path, monkeypatch):
    """`dvc repro` sets no DVC_EXP_NAME: the pipeline run is ``commit <short sha>`` (outside git
    ``workspace``); its children share that parent, and resuming a child (its run id from the
    training checkpoint) reopens it instead of starting another."""
    import mlflow

    from sparsegan.tracking import pipeline_name, pipeline_run_id, start_run

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    repo.mkdir()
    elsewhere.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "commit", "-q", "--allow-empty", "-m", "x")
    short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                           capture_output=True, check=True).stdout.strip()
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(elsewhere)
    assert pipeline_name() == "workspace"
    monkeypatch.chdir(repo)
    assert pipeline_name() == f"commit {short}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ids = []
    for model in ("autoencoder", "fanogan"):
        with start_run(model, 2) as run:
            ids.append(run.info.run_id)
    with start_run("autoencoder", 2, run_id=ids[0]) as resumed:
        assert resumed.info.run_id == ids[0]
    with start_run("anogan", 2, run_id="0" * 32) as fresh:  # a run id of another store
        ids.append(fresh.info.run_id)
    client = mlflow.MlflowClient()
    parent = pipeline_run_id()
    assert client.get_run(parent).info.run_name == f"commit {short}"
    assert len({*ids}) == 3
    for run_id, model in zip(ids, ("autoencoder", "fanogan", "anogan")):
        child = client.get_run(run_id)
        assert child.info.run_name == f"{model} s2 commit {short}"
        assert child.data.tags["mlflow.parentRunId"] == parent
    exp = client.get_experiment_by_name("sparse-gan-oct")
    assert len(client.search_runs([exp.experiment_id])) == 4  # 1 parent, 3 children
