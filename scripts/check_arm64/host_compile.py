"""Compile the arm64 check's bundles on the host (x86-64, the compiler extra) and write what the
device side compares against: a CSV of rows to score and the host agent's answers on them.

    python host_compile.py OUT_DIR
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from compiler.compile import CompileOptions, compile_bundle
from compiler.data import dataset_from_arrays
from compiler.preprocessing import WindowFeatures
from compiler.signing import generate_keys, load_private_key
from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.model import BundleModel

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
keys_dir = out / "keys"
key_path = keys_dir / "edgefleet.key"
if not key_path.exists():
    generate_keys(keys_dir)
key = load_private_key(key_path)
trusted = [load_public_key(keys_dir / "edgefleet.pub")]


def host_agent(path: Path) -> BundleModel:
    """The bundle as the x86-64 agent loads it: verified, then into onnxruntime."""
    return BundleModel.from_bundle(read_bundle(path, trusted))


# 16 features, as the agent benchmark's models: 4,000 rows to train, 1,000 held out for the
# parity gate, 5,000 for the device to score
X, y = make_classification(n_samples=10_000, n_features=16, n_informative=8, random_state=0)
X = X.astype(np.float32)
train = dataset_from_arrays(X[:4000], y[:4000])
holdout = dataset_from_arrays(X[4000:5000], y[4000:5000], require_labels=True)
opts = CompileOptions(latency_runs=20, resamples=100)
summary: dict[str, dict[str, object]] = {}
models = {
    "logreg": LogisticRegression(max_iter=1000).fit(X[:4000], y[:4000]),
    "rf20": RandomForestClassifier(n_estimators=20, max_depth=8, random_state=0)
    .fit(X[:4000], y[:4000]),
}


for name, model in models.items():
    t = time.perf_counter()
    res = compile_bundle(model, train, holdout, name=name, version="1.0.0", signing_key=key,
                         output=out, options=opts)
    summary[name] = {"bundle": res.path.name, "seconds": round(time.perf_counter() - t, 1),
                     "inputs": [f.name for f in res.manifest.inputs]}
    rows = X[5000:]
    names = [f.name for f in res.manifest.inputs]
    with (out / f"{name}-rows.csv").open("w") as f:
        f.write(",".join(names) + "\n")
        for r in rows:
            f.write(",".join(repr(float(v)) for v in r) + "\n")
    # what the rows' CSV text reads back as (float32 of the printed float64 of a float32: exact)
    pred = host_agent(res.path).predict(rows.astype(np.float64))
    np.savez(out / f"{name}-expected.npz", X=rows, sklearn_proba=model.predict_proba(rows),
             agent_proba=pred.probabilities, agent_labels=pred.labels.astype(str))

# numba preprocessing: WindowFeatures on 64-sample windows (tests/edge_agent/conftest.py's
# signal bundle), then StandardScaler + LogisticRegression
rng = np.random.default_rng(2)
n, length = 450, 64
t_ = np.arange(length)
ys = rng.integers(0, 2, n)
freq = np.where(ys == 1, 0.35, 0.05)[:, None]
amp = rng.uniform(0.2, 3.0, (n, 1))
Xs = amp * np.sin(2 * np.pi * freq * t_ + rng.uniform(0, 6.28, (n, 1)))
Xs = Xs + rng.normal(0, 0.05, Xs.shape)
sig = Pipeline([("feat", WindowFeatures(n_bands=4)), ("scale", StandardScaler()),
                ("clf", LogisticRegression())]).fit(Xs[:300], ys[:300])
t = time.perf_counter()
res = compile_bundle(sig, dataset_from_arrays(Xs[:300], ys[:300]),
                     dataset_from_arrays(Xs[300:], ys[300:], require_labels=True),
                     name="vibration", version="1.0.0", signing_key=key, output=out,
                     options=opts)
summary["vibration"] = {"bundle": res.path.name, "seconds": round(time.perf_counter() - t, 1),
                        "inputs": [f.name for f in res.manifest.inputs]}
pred = host_agent(res.path).predict(Xs[300:])
np.savez(out / "vibration-expected.npz", X=Xs[300:], sklearn_proba=sig.predict_proba(Xs[300:]),
         agent_proba=pred.probabilities, agent_labels=pred.labels.astype(str))
(out / "bundles.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))

# the sketch kernel's answer on fixed data (x86-64 JIT), for the device to compare with
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sketch_data import fold, layout_and_values  # noqa: E402

layout, values, ends = layout_and_values()
saved = {}
for dt in ("float64", "float32"):
    res, counts, missing, moments = fold("jit", layout, values.astype(dt), ends)
    saved |= {f"{dt}_res": np.array(res), f"{dt}_counts": counts, f"{dt}_missing": missing,
              f"{dt}_moments": moments}
np.savez(out / "sketch-x86.npz", **saved)
