"""The CLI turns every refusal into one clear line and a non-zero exit, writing nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edgefleet", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def workdir(tmp_path: Path, keypair: Any) -> Path:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 3))
    y = (X[:, 0] > 0).astype(int)
    np.savez(tmp_path / "train.npz", X=X[:200], y=y[:200])
    np.savez(tmp_path / "holdout.npz", X=X[200:], y=y[200:])
    np.savez(tmp_path / "nolabels.npz", X=X[200:])
    joblib.dump(LogisticRegression().fit(X[:200], y[:200]), tmp_path / "model.joblib")
    joblib.dump(LogisticRegression(), tmp_path / "unfitted.joblib")
    (tmp_path / "garbage.joblib").write_bytes(b"not a pickle")
    shutil.copy(keypair.private_path, tmp_path / "k.key")
    (tmp_path / "out").mkdir()
    return tmp_path


def _compile(workdir: Path, model: str = "model.joblib", holdout: str = "holdout.npz",
             key: str = "k.key") -> subprocess.CompletedProcess[str]:
    return _run("compile", model, "--train", "train.npz", "--holdout", holdout, "--name", "m",
                "--version", "1.0.0", "--key", key, "-o", "out", cwd=workdir)


@pytest.mark.parametrize(("case", "expected"), [
    ({"model": "unfitted.joblib"}, "LogisticRegression is not fitted"),
    ({"model": "garbage.joblib"}, "is not a readable joblib file"),
    ({"model": "missing.joblib"}, "does not exist"),
    ({"holdout": "nolabels.npz"}, "labels are missing"),
    ({"key": "missing.key"}, "cannot read signing key"),
    ({"key": "train.npz"}, "not an unencrypted PEM private key"),
])
def test_compile_refusals_are_one_line(workdir: Path, case: dict[str, str],
                                       expected: str) -> None:
    """Each bad input exits 1 with a single 'error:' line naming the problem; no bundle."""
    proc = _compile(workdir, **case)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert list((workdir / "out").iterdir()) == []


def test_compile_inspect_verify(workdir: Path, keypair: Any, other_keypair: Any) -> None:
    """A good compile writes a bundle that verifies with its key and not with another."""
    proc = _compile(workdir)
    assert proc.returncode == 0, proc.stderr
    bundle = workdir / "out" / "m-1.0.0.edgebundle"
    ok = _run("bundle", "verify", str(bundle), "--trusted-key", str(keypair.public_path),
              cwd=workdir)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: m 1.0.0")
    bad = _run("bundle", "verify", str(bundle), "--trusted-key",
               str(other_keypair.public_path), cwd=workdir)
    assert bad.returncode == 1 and "does not verify" in bad.stderr
    shown = _run("bundle", "inspect", str(bundle), "--trusted-key", str(keypair.public_path),
                 cwd=workdir)
    assert shown.returncode == 0 and f"verified, key {keypair.key_id}" in shown.stdout
    truncated = workdir / "t.edgebundle"
    truncated.write_bytes(bundle.read_bytes()[:100])
    t = _run("bundle", "inspect", str(truncated), cwd=workdir)
    assert t.returncode == 1 and "truncated" in t.stderr


def test_keys_generate(tmp_path: Path) -> None:
    """`keys generate` writes a 0600 private key and refuses to overwrite without --force."""
    first = _run("keys", "generate", "--out-dir", "k", cwd=tmp_path)
    assert first.returncode == 0 and (tmp_path / "k" / "edgefleet.pub").exists()
    assert (tmp_path / "k" / "edgefleet.key").stat().st_mode & 0o777 == 0o600
    again = _run("keys", "generate", "--out-dir", "k", cwd=tmp_path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    forced = _run("keys", "generate", "--out-dir", "k", "--force", cwd=tmp_path)
    assert forced.returncode == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """A bad CLI argument is a usage error (exit 2) naming the option."""
    proc = _run("compile", "x.joblib", "--train", "a.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "--holdout" in proc.stderr
