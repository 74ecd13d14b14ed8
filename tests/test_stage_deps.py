"""dvc.yaml's code deps are exactly the code each stage runs.

For every stage, the import closure of its ``stages/*.py`` script inside ``sparsegan/`` (every
``import`` and ``from ... import`` anywhere in a file, lazy ones too, and the packages'
``__init__.py`` on the way) must be covered by the stage's deps, and every code dep must be used:
a listed file is in the closure, a listed folder has all its ``.py`` files in it. A missing dep
means DVC would not re-run the stage after a change to code it runs; an extra one re-runs it for
nothing (scoring code re-training models). Files with nothing but a docstring are exempt.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PKG = "sparsegan"

def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None

def _imports(path: Path) -> set[str]:
    """Dotted names of the ``sparsegan`` modules a file imports (and their parent packages)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = list(rel[:-1])  # a module's package; for __init__.py, the package itself
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for name in found:
            if name == PKG or name.startswith(PKG + "."):
                parts = name.split(".")
                names.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return names

def _spec_modules() -> set[str]:
    """``sparsegan.models`` builds each model from the module its spec names (importlib):
    those modules are imports of ``sparsegan/models/__init__.py``."""
    from sparsegan.spec import MODEL_SPECS

    return {f"{PKG}.models.{s.module}" for s in MODEL_SPECS}


def closure(script: Path) -> set[Path]:
    seen: set[Path] = {script}
    todo = [script]
    while todo:
        path = todo.pop()
        names = _imports(path)
        if path == ROOT / PKG / "models" / "__init__.py":
            names |= _spec_modules()
        for name in names:
            f = _module_file(name)
            if f is not None and f not in seen:
                seen.add(f)
                todo.append(f)
    return seen

def _has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__") for n in body)

def _stages() -> list[tuple[str, str, list[str]]]:
    """(stage, script, code deps) from dvc.yaml (a foreach stage's template)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = []
    for name, st in spec.items():
        body = st.get("do", st)
        script = re.search(r"python (stages/\S+\.py)", body["cmd"]).group(1)
        deps = [d for d in body.get("deps", []) if isinstance(d, str)
                and d.split("/")[0] in (PKG, "stages")]
        out.append((name, script, deps))
    return out

@pytest.mark.parametrize("stage,script,deps", _stages(), ids=[s[0] for s in _stages()])
def test_code_deps_are_the_import_closure(stage, script, deps):
    used = {p for p in closure(ROOT / script) if _has_code(p) or p == ROOT / script}
    dep_paths = [ROOT / d for d in deps]
    missing = sorted(str(p.relative_to(ROOT)) for p in used
                     if not any(p == d or d in p.parents for d in dep_paths))
    assert not missing, f"dvc.yaml stage {stage}: add deps {missing} (imported by {script})"
    for d in dep_paths:
        files = sorted(d.rglob("*.py")) if d.is_dir() else [d]
        assert files, f"dvc.yaml stage {stage}: dep {d.relative_to(ROOT)} does not exist"
        unused = [str(f.relative_to(ROOT)) for f in files if f not in used and _has_code(f)]
        assert not unused, (f"dvc.yaml stage {stage}: dep {d.relative_to(ROOT)} lists "
                            f"{unused}, which {script} does not import")

def test_the_closure_follows_relative_and_lazy_imports():
    files = {str(p.relative_to(ROOT)) for p in closure(ROOT / "stages" / "train.py")}
    assert "sparsegan/models/sparse_gan.py" in files  # via sparsegan.models' build_detector
    assert "sparsegan/data/dataset.py" in files  # the batch loader train.py runs
    assert "sparsegan/report.py" not in files
    # scoring is not a training dependency: a change to a score re-scores, never re-trains
    assert "sparsegan/anomaly.py" not in files and "sparsegan/scoring.py" not in files


def test_each_train_stage_lists_exactly_the_params_its_model_reads():
    from sparsegan.spec import MODELS, TRAIN_READS

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    trains = {name[len("train_"):]: st for name, st in spec.items() if name.startswith("train_")}
    assert sorted(trains) == sorted(MODELS)
    for model, st in trains.items():
        assert st["cmd"] == f"python stages/train.py {model} ${{item.seed}}"
        assert st["matrix"] == {"seed": "${seeds}"}
        assert st["params"] == ["runtime", f"preprocess.variant.{model}", *TRAIN_READS[model]]
        # its own processed variant, not the other one: a change there cannot re-train it
        assert st["deps"][-1] == f"data/processed/${{preprocess.variant.{model}}}"
        assert not any(d.startswith("data/") for d in st["deps"][:-1])
        assert st["outs"] == [f"models/{model}/s${{item.seed}}"]
    # lambda_sp is read by sparse_gan's training alone, lambda_adv by the two adversarial ones
    readers = {m for m, st in trains.items() if "train.lambda_sp" in st["params"]}
    assert readers == {"sparse_gan"}
    assert {m for m, st in trains.items() if "train.lambda_adv" in st["params"]} == {
        "pix2pix", "sparse_gan"}
    # scoring knobs are nobody's training param
    assert not any(p.startswith("score") for st in trains.values() for p in st["params"])


def test_the_stages_written_from_the_spec_have_not_drifted(tmp_path):
    """dvc.yaml's train_<model> and score stages are what ``python -m sparsegan.spec`` writes
    from sparsegan/spec.py: editing either alone fails here."""
    from sparsegan.spec import write_dvc_yaml

    copy = tmp_path / "dvc.yaml"
    copy.write_text((ROOT / "dvc.yaml").read_text())
    assert not write_dvc_yaml(copy), "dvc.yaml drifted from sparsegan/spec.py: run " \
                                     "`python -m sparsegan.spec`"


def test_scoring_runs_per_model_and_seed_and_rows_per_row():
    from sparsegan.spec import MODELS

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert spec["score"]["matrix"] == {"model": list(MODELS), "seed": "${seeds}"}
    assert spec["score"]["params"] == ["runtime", "score"]
    for stage in ("calibrate", "evaluate"):
        assert spec[stage]["foreach"] == "${rows}"
        assert "rows.${key}" in spec[stage]["do"]["params"]  # its own row: a new row runs alone
        assert "rows" not in spec[stage]["do"]["params"]


@pytest.mark.parametrize("stage", ["score", "calibrate", "evaluate", "report"])
def test_what_runs_after_training_never_imports_the_trainer(stage):
    """Scoring, calibration, evaluation, the report (and the serving and predict code they
    import) load models through sparsegan/checkpoint.py: a change to the training loop or to
    the distribution code re-trains, but never re-scores for nothing."""
    files = {str(p.relative_to(ROOT)) for p in closure(ROOT / "stages" / f"{stage}.py")}
    assert "sparsegan/train.py" not in files and "sparsegan/distributed.py" not in files
    for module in ("predict", "serving", "screening"):
        files = {str(p.relative_to(ROOT)) for p in closure(ROOT / PKG / f"{module}.py")}
        assert "sparsegan/train.py" not in files and "sparsegan/distributed.py" not in files


@pytest.mark.parametrize("stage", sorted(p.stem for p in (ROOT / "stages").glob("*.py")))
def test_a_stage_runs_the_code_of_its_own_checkout(tmp_path, stage):
    """DVC hashes the code of the checkout a stage runs in (``dvc exp run --temp``: a copy of
    the repository), so the stage must import that copy, not the package installed from
    another checkout: a copy whose ``sparsegan`` says where it is loaded from."""
    import os
    import shutil
    import subprocess
    import sys

    for name in ("sparsegan", "stages"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    init = tmp_path / PKG / "__init__.py"
    init.write_text(init.read_text() + "\nimport sys\nprint('sparsegan from', __file__, "
                    "file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, f"stages/{stage}.py", "x", "y", "z", "w"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert f"sparsegan from {tmp_path / PKG / '__init__.py'}" in proc.stderr, proc.stderr[-2000:]
