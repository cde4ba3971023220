"""Inside the arm64 root: each bundle verified and loaded as the agent does, its test vectors
replayed, and its predictions on the host's rows compared with what the x86-64 agent and
scikit-learn answered; then an in-process Agent (numba sketches included) timed."""
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

t0 = time.perf_counter()
from edge_agent.agent import Agent  # noqa: E402
from edge_agent.bundle import load_public_key, read_bundle  # noqa: E402
from edge_agent.config import load_config  # noqa: E402
from edge_agent.model import BundleModel  # noqa: E402

import_s = time.perf_counter() - t0
bundles, config_path = Path(sys.argv[1]), Path(sys.argv[2])
assert platform.machine() == "aarch64", platform.machine()
trusted = [load_public_key(bundles / "keys" / "edgefleet.pub")]
out: dict = {"machine": platform.machine(), "import_s": round(import_s, 2), "bundles": {}}
ok = True
for name in ("logreg", "rf20", "vibration"):
    path = bundles / f"{name}-1.0.0.edgebundle"
    bundle = read_bundle(path, trusted)
    model = BundleModel.from_bundle(bundle, intra_op_threads=1, inter_op_threads=1)
    t = time.perf_counter()
    failures = model.replay_test_vectors(bundle.manifest.test_vectors)
    replay_s = time.perf_counter() - t
    exp = np.load(bundles / f"{name}-expected.npz")
    pred = model.predict(exp["X"].astype(np.float64))
    d_agent = float(np.max(np.abs(pred.probabilities - exp["agent_proba"])))
    d_sk = float(np.max(np.abs(pred.probabilities - exp["sklearn_proba"])))
    labels_same = int(np.sum(pred.labels.astype(str) == exp["agent_labels"]))
    good = not failures and d_agent <= 1e-5 and d_sk <= 1e-4 and labels_same == len(exp["X"])
    ok &= good
    out["bundles"][name] = {
        "test_vectors": len(bundle.manifest.test_vectors), "failed": len(failures),
        "first_failure": failures[0].reason if failures else None,
        "replay_s": round(replay_s, 2), "rows": len(exp["X"]),
        "max_diff_vs_x86_agent": d_agent, "max_diff_vs_sklearn": d_sk,
        "labels_equal_x86": labels_same, "ok": good}

# the whole agent in-process (verify, install, replay, numba fold, SQLite) on the logreg config
config = load_config(config_path)
t = time.perf_counter()
agent = Agent(config, start_writer=False, start_sync=False)
out["agent_init_s"] = round(time.perf_counter() - t, 2)
X = np.load(bundles / "logreg-expected.npz")["X"].astype(np.float64)
try:
    t = time.perf_counter()
    first = agent.predict(X[0])
    out["first_predict_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    t = time.perf_counter()
    agent.flush()
    out["first_flush_s"] = round(time.perf_counter() - t, 2)  # the first sketch fold
    t = time.perf_counter()
    for i in range(0, len(X), 1024):
        agent.predict(X[i:i + 1024])
    agent.flush()
    dt = time.perf_counter() - t
    out["batch_rows_per_s_in_process"] = int(len(X) / dt)
    t = time.perf_counter()
    for row in X[:300]:
        agent.predict(row)
    out["single_row_us"] = int((time.perf_counter() - t) / 300 * 1e6)
    from edge_agent import sketching
    aot = sketching._KERNELS.aot()
    out["sketch_fold"] = f"ahead-of-time {aot.path.name}" if aot else "numba JIT"
finally:
    agent.close()
# the sketch kernel: the ahead-of-time build (when warmup made one) must give the JIT's bits;
# counts must equal the x86-64 agent's, moments within rounding (FMA contraction may differ)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sketch_data import fold, layout_and_values  # noqa: E402

layout, values, ends = layout_and_values()
x86 = np.load(bundles / "sketch-x86.npz")
aot = sketching._KERNELS.aot()
for dt in ("float64", "float32"):
    v = values.astype(dt)
    jit = fold("jit", layout, v, ends)
    same = {"result": list(jit[0]) == x86[f"{dt}_res"].tolist(),
            "counts": bool(np.array_equal(jit[1], x86[f"{dt}_counts"])),
            "missing": bool(np.array_equal(jit[2], x86[f"{dt}_missing"]))}
    m, mx = jit[3], x86[f"{dt}_moments"]
    fin = np.isfinite(mx)  # an empty feature's min/max are +-inf
    same["non_finite"] = bool(np.array_equal(m[~fin], mx[~fin], equal_nan=True))
    rel = float(np.max(np.abs(m[fin] - mx[fin]) / np.maximum(1.0, np.abs(mx[fin]))))
    entry = {"jit_vs_x86_equal": same, "jit_vs_x86_moments_max_rel_diff": rel}
    good = all(same.values()) and rel <= 1e-9
    if aot is not None:
        a = fold(aot, layout, v, ends)
        bits = a[0] == jit[0] and all(x.tobytes() == y.tobytes()
                                      for x, y in zip(a[1:], jit[1:], strict=True))
        entry["aot_bits_equal_jit"] = bits
        good &= bits
    entry["ok"] = good
    ok &= good
    out[f"sketch_{dt}"] = entry
out["ok"] = ok
print(json.dumps(out, indent=1))
sys.exit(0 if ok else 1)
