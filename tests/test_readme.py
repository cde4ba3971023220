"""The README's commands work as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier

ROOT = Path(__file__).resolve().parent.parent


def _compile_section_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Compiling a model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.startswith("edgefleet ")]


def test_readme_compile_commands_run(tmp_path: Path) -> None:
    """Every command of the README's 'Compiling a model' block succeeds in order."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(450, 4))
    frame = pd.DataFrame(X, columns=["rms", "peak", "kurt", "temp"])
    frame["label"] = (X[:, 0] + X[:, 1] > 0).astype(int)
    frame.iloc[:300].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[300:].to_csv(tmp_path / "holdout.csv", index=False)
    model = RandomForestClassifier(n_estimators=10, random_state=0)
    model.fit(frame.iloc[:300].drop(columns="label"), frame["label"].iloc[:300])
    joblib.dump(model, tmp_path / "model.joblib")
    commands = _compile_section_commands()
    assert len(commands) == 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = []
    for command in commands:
        argv = [sys.executable, "-m", "edgefleet", *shlex.split(command)[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stderr}"
        outputs.append(proc.stdout)
    assert "parity max diff" in outputs[1]
    assert "signature   verified" not in outputs[2]  # inspect without a key does not verify
    assert "parity      passed" in outputs[2]
    assert outputs[3].startswith("ok: vibration 1.0.0")
