"""Point 6, tracking: an unreachable MLFLOW_TRACKING_URI is reported within seconds, before any
training work, with the URI and how to fall back to the local store (unset the variable)."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from reliability_helpers import error_line, files_under, make_processed, run_stage, write_params
from sparsegan.params import load_params
from sparsegan.tracking import TrackingError, check_tracking
from sparsegan.train import train_model


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_closed_port_fails_fast_in_the_stage_before_any_work(tmp_path, guard, ledger):
    repo = tmp_path / "repo"
    write_params(repo)
    make_processed(repo, n_train=16)
    guard.protect(repo)
    before = files_under(repo)
    uri = f"http://127.0.0.1:{_closed_port()}"
    ledger.faults()
    tic = time.monotonic()
    res = run_stage("train", "sparse_gan", "0", cwd=repo, MLFLOW_TRACKING_URI=uri)
    seconds = time.monotonic() - tic
    assert res.returncode == 2
    line = error_line(res.stderr)
    assert f"MLFLOW_TRACKING_URI={uri} is not reachable" in line
    assert "unset MLFLOW_TRACKING_URI" in line and "mlflow.db" in line
    assert "nothing was trained" in line
    assert seconds < 30  # the interpreter and torch import included; the check itself: below
    assert files_under(repo) == before  # no checkpoint, no model: nothing started


def test_check_is_quick_and_names_the_fallback(monkeypatch, tmp_path, ledger):
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ledger.faults()
    tic = time.monotonic()
    with pytest.raises(TrackingError, match="unset MLFLOW_TRACKING_URI to log to the local store"):
        check_tracking()
    assert time.monotonic() - tic < 5
    # train_model checks first: no data is even read (the folder does not exist)
    with pytest.raises(TrackingError):
        train_model("autoencoder", 0, load_params(write_params(tmp_path)), tmp_path / "nowhere",
                    tmp_path / "models", tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints").exists()


def test_silent_server_times_out(monkeypatch, ledger):
    """A host that accepts the connection but never answers: the timeout bounds the wait."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        ledger.faults()
        tic = time.monotonic()
        with pytest.raises(TrackingError, match="not reachable"):
            check_tracking(timeout=0.5)
        assert time.monotonic() - tic < 3


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


def test_reachable_server_and_local_store_pass(monkeypatch, tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{srv.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert check_tracking() == uri
    finally:
        srv.shutdown()
        srv.server_close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_tracking()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}")
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking()
