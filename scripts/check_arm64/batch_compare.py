"""The batch output against what the x86-64 agent answered for the same rows."""
import csv
import sys

import numpy as np

exp = np.load(sys.argv[1])
with open(sys.argv[2], newline="") as f:
    rows = list(csv.DictReader(f))
proba = np.array([[float(r["p_0"]), float(r["p_1"])] for r in rows])
labels = [r["label"] for r in rows]
diff = float(np.max(np.abs(proba - exp["agent_proba"]))) if len(rows) == len(exp["X"]) else None
same = sum(a == b for a, b in zip(labels, exp["agent_labels"].tolist(), strict=False))
print(f"rows {len(rows)} of {len(exp['X'])}, max |p - p_x86| {diff}, labels equal {same}")
sys.exit(0 if diff is not None and diff <= 1e-6 and same == len(rows) else 1)
