"""`edgefleet agent` commands end to end: run + SIGTERM, status, drift, batch, warmup."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import make_classification_data

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(tmp_path: Path, keypair: Any, bundle: Path, port: int = 0,
                  window: float = 300) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'device_id = "cli-test"\ndata_dir = "{tmp_path / "data"}"\n'
        f'trusted_keys = ["{keypair.public_path}"]\nbundle = "{bundle}"\n'
        f"[http]\nport = {port}\n[telemetry]\nwindow_seconds = {window}\n"
        "flush_interval_seconds = 0.1\n")
    return cfg


def _cli(*args: str, cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300, **kw)


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def test_run_serves_and_sigterm_flushes(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """`agent run` serves over HTTP; SIGTERM stops it cleanly with every request recorded."""
    port = _free_port()
    cfg = _write_config(tmp_path, keypair, small_bundle.path, port=port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "agent", "run", "-c", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/v2/health/ready", 60)
        X, _ = make_classification_data(n=600, d=6, seed=11)
        for x in X[:25]:
            out = _post(base + "/v1/predict", {"inputs": {f"f{i}": float(x[i]) for i in range(6)}})
            assert out["label"] in ("0", "1")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "serving small 1.2.0" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    status = _cli("status", "-c", str(cfg), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "small 1.2.0" in status.stdout
    line = next(ln for ln in status.stdout.splitlines() if ln.split()[2:3] == ["small"])
    assert line.split()[4] == "25"  # requests in the window, all flushed at SIGTERM
    horizon = next(ln for ln in status.stdout.splitlines() if ln.startswith("predictions"))
    assert horizon.startswith("predictions 25 logged (keep_predictions 1000000), since ")
    assert horizon.endswith("ago): feedback reaches that far back")


def test_run_refuses_when_nothing_verifies(tmp_path: Path, keypair: Any,
                                           small_bundle: Any) -> None:
    """`agent run` with only a bad bundle exits 1 naming why, instead of serving nothing."""
    bad = tmp_path / "bad.edgebundle"
    bad.write_bytes(small_bundle.path.read_bytes()[:500])
    cfg = _write_config(tmp_path, keypair, bad)
    proc = _cli("run", "-c", str(cfg), cwd=tmp_path)
    assert proc.returncode == 1
    assert "nothing to serve" in proc.stderr and "truncated" in proc.stderr


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    """A config with an unknown key fails with one line naming the key."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text('data_dir = "/tmp/x"\ntrusted_keys = ["/k.pub"]\nprot = 1\n')
    proc = _cli("status", "-c", str(cfg), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: config key prot = 1: Extra inputs are not permitted"]


def test_batch_csv_and_drift_table(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """`agent batch` scores a CSV in chunks (passing other columns through), and `agent drift`
    then shows a shifted feature as drifted and the others as ok."""
    X, _ = make_classification_data(n=600, d=6, seed=11)  # the bundle's own distribution
    X = X[400:].copy()
    X[:, 2] += 3.0  # a shifted sensor
    src = tmp_path / "in.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row_id", *[f"f{i}" for i in range(6)]])
        for k, x in enumerate(X):
            w.writerow([f"r{k}", *("" if (k == 3 and i == 0) else f"{v:.6f}"
                                   for i, v in enumerate(x))])
    cfg = _write_config(tmp_path, keypair, small_bundle.path)
    out = tmp_path / "out.csv"
    proc = _cli("batch", str(src), "-o", str(out), "-c", str(cfg), "--chunk-rows", "500",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with out.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["row_id", "prediction_id", "label", "p_0", "p_1"]
    assert len(rows) == len(X) + 1 and rows[4][0] == "r3"
    # r3 lacks f0 and this pipeline has no imputer: served (NaN scores), the rest are sane
    assert rows[4][3] == "nan"
    assert all(abs(float(r[3]) + float(r[4]) - 1) < 1e-5 for r in rows[1:] if r[0] != "r3")
    drift = _cli("drift", "-c", str(cfg), cwd=tmp_path)
    assert drift.returncode == 0, drift.stderr
    lines = drift.stdout.splitlines()
    assert lines[1].split()[:4] == ["feature", "rows", "missing", "outside"]
    assert lines[-1].startswith("missing: rows without a value; outside: values beyond")
    table = {ln.split()[0]: ln.split() for ln in lines[2:-2]}
    verdicts = {name: cells[-1] for name, cells in table.items()}
    assert verdicts["f2"] == "DRIFT"
    assert verdicts["f0"] == "ok" and verdicts["f4"] == "ok"
    # r3's missing f0 is 1 of the 200 rows; the shifted sensor lies past its training maximum
    assert table["f0"][1:3] == ["199", "0.5%"] and table["f4"][2] == "0"
    edges = small_bundle.manifest.baseline.features[2].edges
    beyond = float(np.mean((X[:, 2] < edges[0]) | (X[:, 2] > edges[-1])))
    assert beyond > 0.2  # the shift is large enough for this to say something
    assert float(table["f2"][3].rstrip("%")) / 100 == pytest.approx(beyond, abs=0.006)


def test_batch_reports_bad_cells(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """A text cell in a numeric column names the row and column; no output is left behind."""
    src = tmp_path / "in.csv"
    src.write_text("f0,f1,f2,f3,f4,f5\n1,2,3,4,5,6\n1,2,hot,4,5,6\n")
    cfg = _write_config(tmp_path, keypair, small_bundle.path)
    out = tmp_path / "out.csv"
    proc = _cli("batch", str(src), "-o", str(out), "-c", str(cfg), cwd=tmp_path)
    assert proc.returncode == 1
    assert "row 3, column 'f2' = 'hot'" in proc.stderr
    assert not out.exists()


def test_batch_parquet(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """Parquet input is scored too when pyarrow is installed."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    X, _ = make_classification_data(n=600, d=6, seed=11)
    table = pa.table({f"f{i}": X[400:, i].astype(np.float64) for i in range(6)})
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    cfg = _write_config(tmp_path, keypair, small_bundle.path)
    proc = _cli("batch", str(src), "-o", str(tmp_path / "out.csv"), "-c", str(cfg),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 201


def test_warmup_fills_the_cache(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """`agent warmup` compiles the kernels into the data dir's numba cache."""
    cfg = _write_config(tmp_path, keypair, small_bundle.path)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "warmup", "-c", str(cfg)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "data" / "numba-cache"
    assert any(cache.rglob("*.nbi")), "no numba index files written"


def test_swap_commands_against_a_running_agent(tmp_path: Path, keypair: Any,
                                               small_bundle: Any, compile_fast: Any) -> None:
    """`agent stage|promote|commit|swap-status` drive the running daemon; a repeated id and a
    refused command say so."""
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification_data(n=600, d=6, seed=11)
    v2 = compile_fast(LogisticRegression(C=0.3).fit(X[:400], y[:400]), X, y, name="small",
                      version="1.5.0")
    port = _free_port()
    cfg = _write_config(tmp_path, keypair, small_bundle.path, port=port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", "agent", "run", "-c", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v2/health/ready", 60)
        staged = _cli("stage", str(v2.path), "-c", str(cfg), "--id", "st-1", cwd=tmp_path)
        assert staged.returncode == 0, staged.stderr
        assert "st-1: applied" in staged.stdout and "phase staged" in staged.stdout
        again = _cli("stage", str(v2.path), "-c", str(cfg), "--id", "st-1", cwd=tmp_path)
        assert "st-1: duplicate" in again.stdout
        early = _cli("commit", "-c", str(cfg), cwd=tmp_path)
        assert early.returncode == 1 and "refused" in early.stdout
        assert _cli("promote", "-c", str(cfg), cwd=tmp_path).returncode == 0
        out = _post(f"http://127.0.0.1:{port}/v1/predict",
                    {"inputs": {f"f{i}": float(X[450, i]) for i in range(6)}})
        assert out["model"]["version"] == "1.5.0"
        assert _cli("commit", "-c", str(cfg), cwd=tmp_path).returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    status = _cli("swap-status", "-c", str(cfg), cwd=tmp_path)
    assert "phase       committed" in status.stdout
    assert "blue        small 1.5.0" in status.stdout


def test_swap_status_shows_the_last_rollback_cause(tmp_path: Path, keypair: Any,
                                                   small_bundle: Any, compile_fast: Any) -> None:
    """After a rollback, `agent swap-status` names the phase, the slots and why it rolled back."""
    from sklearn.linear_model import LogisticRegression

    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.swap_events import Promote, Rollback, Stage

    X, y = make_classification_data(n=600, d=6, seed=11)
    v2 = compile_fast(LogisticRegression(C=0.2).fit(X[:400], y[:400]), X, y, name="small",
                      version="1.6.0")
    cfg = _write_config(tmp_path, keypair, small_bundle.path)
    with Agent(load_config(cfg, environ={}), start_writer=False) as agent:
        agent.swap.handle(Stage(id="s", source=str(v2.path)))
        agent.swap.handle(Promote(id="p"))
        agent.swap.handle(Rollback(id="r", reason="operator saw bad labels"))
    status = _cli("swap-status", "-c", str(cfg), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "phase       rolled_back" in status.stdout
    assert "blue        small 1.2.0" in status.stdout and "green       -" in status.stdout
    assert "operator saw bad labels" in status.stdout


@pytest.mark.parametrize(("seconds", "text"), [
    (-3, "0 s"), (45, "45 s"), (89, "89 s"), (90, "2 min"), (60 * 89, "89 min"),
    (5.24 * 3600, "5.2 h"), (47 * 3600, "47.0 h"), (3.1 * 86400, "3.1 days")])
def test_status_ages_read_in_the_largest_sensible_unit(seconds: float, text: str) -> None:
    from edge_agent.cli import _age

    assert _age(seconds) == text
