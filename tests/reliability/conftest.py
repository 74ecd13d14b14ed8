"""The reliability suite's bookkeeping: what each test tried, and whether any file was lost.

``ledger`` (session): tests count the inputs they try (``ledger.inputs(n)``) and the faults they
inject (``ledger.faults(n)``). ``guard`` (per test): ``guard.protect(path, ...)`` hashes every
file under the paths the test's "user" made (images, CSVs, params, checkpoints...) and, at
teardown, checks that each of those contents still exists, at its place or, if the pipeline moved
it aside (a checkpoint of other params), anywhere under the test's tmp_path. A missing content is
a lost file: the test fails, and the count goes into the summary line printed at the end:

    reliability: N inputs tried, M faults injected, files lost: 0
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # reliability_helpers


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Ledger:
    n_inputs: int = 0
    n_faults: int = 0
    n_protected: int = 0
    lost: list[str] = field(default_factory=list)
    tests: int = 0

    def inputs(self, n: int = 1) -> None:
        self.n_inputs += n

    def faults(self, n: int = 1) -> None:
        self.n_faults += n


LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return LEDGER


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store (creating one takes seconds: do it once)."""
    from mlflow.tracking import MlflowClient

    from sparsegan.tracking import EXPERIMENT

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").create_experiment(EXPERIMENT)
    return path


@pytest.fixture
def mlflow_uri(tmp_path, mlflow_db_template, monkeypatch) -> str:
    """``sqlite:///<tmp_path>/mlflow.db`` (a copy of the template), also set as
    MLFLOW_TRACKING_URI for this test."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_db_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


class Guard:
    def __init__(self, root: Path, ledger: Ledger):
        self.root, self.ledger = root, ledger
        self.files: dict[Path, str] = {}

    def protect(self, *paths: Path) -> None:
        for p in map(Path, paths):
            for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
                self.files[f] = _digest(f)

    def lost(self) -> list[str]:
        missing = {f: d for f, d in self.files.items() if not (f.is_file() and _digest(f) == d)}
        if not missing:
            return []
        present = {_digest(f) for f in self.root.rglob("*") if f.is_file()}  # moved, not lost?
        return [str(f) for f, d in missing.items() if d not in present]


@pytest.fixture
def guard(tmp_path: Path, ledger: Ledger):
    g = Guard(tmp_path, ledger)
    yield g
    lost = g.lost()
    ledger.n_protected += len(g.files)
    ledger.lost += lost
    ledger.tests += 1
    assert not lost, f"files lost: {lost}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if LEDGER.tests or LEDGER.n_inputs or LEDGER.n_faults:
        terminalreporter.write_line(
            f"reliability: {LEDGER.n_inputs} inputs tried, {LEDGER.n_faults} faults injected, "
            f"files lost: {len(LEDGER.lost)} (of {LEDGER.n_protected} protected files)")
